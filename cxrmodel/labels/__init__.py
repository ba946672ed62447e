"""What the 14 labels mean and how they are scored: prompts, zero-shot scoring, applicability."""
