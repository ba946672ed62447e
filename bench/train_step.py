"""LoRA training step throughput (img/s): RadLens's loop vs the naive fp32 loop, ViT-B/32 architecture.

    python -m bench.train_step [--batch 32] [--steps 6]

Both train the same peft LoRA (q_proj, v_proj, r=8) with the same symmetric InfoNCE loss on the same
pre-decoded batch, so only the step itself is compared: forward, backward, optimiser.
Naive: fp32 everything. RadLens: `cxrmodel.train`'s step (bf16 autocast where the CPU has it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import table
from bench.models import vit_b32_dir
from cxrmodel.encoder import choose_dtype, features
from cxrmodel.lora import LoraSettings, apply_lora
from cxrmodel.train import contrastive_loss

CAPTIONS = ["PA chest radiograph with cardiomegaly", "lateral chest x-ray", "axial CT of the chest",
            "MRI of the brain with a tumour"]


def _model(model_dir: Path):
    from transformers import AutoTokenizer, CLIPModel

    torch.manual_seed(0)
    model = apply_lora(CLIPModel.from_pretrained(model_dir), LoraSettings())
    return model, AutoTokenizer.from_pretrained(model_dir)


def run(model_dir: Path, batch: int, steps: int, autocast_dtype: torch.dtype) -> float:
    """Median img/s over `steps` optimiser steps (after one warm-up step)."""
    model, tokenizer = _model(model_dir)
    model.train()
    base = model.get_base_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    pixels = torch.randn(batch, 3, 224, 224)
    text = tokenizer([CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(batch)], padding=True,
                     return_tensors="pt")
    text = {k: v for k, v in text.items() if k in ("input_ids", "attention_mask")}
    use = autocast_dtype != torch.float32
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=use):
            img = features(model.get_image_features(pixel_values=pixels))
            txt = features(model.get_text_features(**text))
        loss = contrastive_loss(img, txt, base.logit_scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("bench-out/indexing"))
    args = parser.parse_args(argv)
    model_dir = vit_b32_dir(args.out / "vit-b32")
    dtype = choose_dtype("auto", torch.device("cpu"))
    naive = run(model_dir, args.batch, args.steps, torch.float32)
    ours = run(model_dir, args.batch, args.steps, dtype)
    print(table(["loop", "img/s", "speed-up"], [["naive fp32", naive, 1.0],
                                               [f"radlens ({str(dtype).replace('torch.', '')} autocast)", ours,
                                                ours / naive]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
