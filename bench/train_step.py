"""LoRA training step throughput (img/s): RadLens's loop vs the naive fp32 loop, ViT-B/32 architecture.

    python -m bench.train_step [--batch 32] [--steps 6]

Both train the same peft LoRA (q_proj, v_proj, r=8) with the same symmetric InfoNCE loss on the same
pre-decoded batch, so only the step itself is compared: forward, backward, optimiser.
Naive: fp32 everything, transformers' defaults. RadLens: `cxrmodel.training.train`'s step -- bf16 autocast where
the CPU has it, and the exact shortcuts of `cxrmodel.model.fastpath` (class-token-only last image layer,
the faster attention kernel for the device).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import cpu_kind, table
from bench.models import vit_b32_dir
from cxrmodel.model.encoder import choose_dtype, features
from cxrmodel.model.fastpath import apply_fastpaths
from cxrmodel.model.lora import LoraSettings, apply_lora
from cxrmodel.training.train import contrastive_loss

CAPTIONS = ["PA chest radiograph with cardiomegaly", "lateral chest x-ray", "axial CT of the chest",
            "MRI of the brain with a tumour"]


def _model(model_dir: Path, radlens: bool):
    from transformers import AutoTokenizer, CLIPModel

    torch.manual_seed(0)
    model = apply_lora(CLIPModel.from_pretrained(model_dir), LoraSettings())
    if radlens:
        apply_fastpaths(model, torch.device("cpu"))
    return model, AutoTokenizer.from_pretrained(model_dir)


def make_step(model_dir: Path, batch: int, autocast_dtype: torch.dtype, radlens: bool) -> Callable[[], None]:
    """One loop's optimiser step (forward, backward, AdamW) on a fixed batch, warmed up once."""
    model, tokenizer = _model(model_dir, radlens)
    model.train()
    base = model.get_base_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    text = tokenizer([CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(batch)], padding=True,
                     return_tensors="pt")
    text = {k: v for k, v in text.items() if k in ("input_ids", "attention_mask")}
    use = autocast_dtype != torch.float32

    def step() -> None:
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=use):
            img = features(model.get_image_features(pixel_values=pixels))
            txt = features(model.get_text_features(**text))
        loss = contrastive_loss(img, txt, base.logit_scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return step


def compare(steps: dict[str, Callable[[], None]], batch: int, rounds: int) -> dict[str, float]:
    """Median img/s of each loop, their steps interleaved round by round (so drift hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("bench-out/indexing"))
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_kind()}")  # every speed figure names the machine kind it was measured on
    model_dir = vit_b32_dir(args.out / "vit-b32")
    dtype = choose_dtype("auto", torch.device("cpu"))
    ours_name = f"radlens ({str(dtype).replace('torch.', '')} autocast + fastpaths)"
    rates = compare({"naive fp32": make_step(model_dir, args.batch, torch.float32, radlens=False),
                     ours_name: make_step(model_dir, args.batch, dtype, radlens=True)}, args.batch, args.steps)
    naive = rates["naive fp32"]
    print(table(["loop", "img/s", "speed-up"], [[name, rate, rate / naive] for name, rate in rates.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
