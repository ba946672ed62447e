"""The real ViT-B/32 architecture with random weights (its speed is the real model's speed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from bench.common import VIT_B32, require

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "preprocessor_config.json")


def vit_b32_dir(out: Path, seed: int = 0) -> Path:
    """Save a randomly initialised ViT-B/32 CLIP with the real tokenizer/processor files (cached)."""
    from transformers import CLIPConfig, CLIPModel

    require(VIT_B32, "ViT-B/32 config")
    out = Path(out)
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig.from_pretrained(VIT_B32)).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (VIT_B32 / name).exists():
            shutil.copy2(VIT_B32 / name, out / name)
    return out
