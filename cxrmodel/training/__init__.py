"""Learning from image-caption pairs: pairs files, LoRA/scratch training, retrieval evaluation."""
