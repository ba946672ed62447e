"""`radlens train` on large JPEGs: the model's reduced view of each JPEG (`DecodedImage.model_input`) against
decoding it in full as before, one epoch each, alternating, ViT-B/32 architecture (random weights).

    python -m bench.train_decode [--pairs 256 --size 2048 --rounds 3]

Unlike `bench.train_step` (one pre-decoded batch), this times whole epochs: the loader's decode workers
share the cores with the training step, so a cheaper decode shows up in the step rate.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import shutil
import statistics
import sys
from pathlib import Path

from bench.common import cpu_kind, table
from bench.indexing import as_jpeg, full_jpeg_decode, make_images
from bench.models import vit_b32_dir


def write_pairs(paths: list[Path], target: Path) -> Path:
    """A pairs CSV: each image with a caption (17 distinct ones, so InfoNCE has something to tell apart)."""
    with open(target, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i, path in enumerate(paths):
            writer.writerow([str(path.resolve()), f"a frontal chest radiograph, case type {i % 17}"])
    return target


def epoch_rate(model_dir: Path, pairs: Path, out: Path) -> float:
    """Images per second of one LoRA epoch, as `radlens train` reports it."""
    from cxrmodel.model.encoder import EncoderConfig
    from cxrmodel.training.train import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(pairs=str(pairs), out=out, encoder=EncoderConfig(model=str(model_dir)), epochs=1,
                      val_fraction=0.0, augment=False, progress=False)
    return train(cfg, log=lambda _line: None).metrics["images_per_second"][0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-out/indexing"))
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_kind()}")
    model_dir = vit_b32_dir(args.out / "vit-b32")
    images = as_jpeg(make_images(args.out / f"images-{args.size}", args.pairs, args.size),
                     args.out / f"images-{args.size}-jpeg")
    pairs = write_pairs(images, args.out / f"pairs-{args.size}-jpeg.csv")
    rates: dict[str, list[float]] = {"model view": [], "full decode (before)": []}
    for rnd in range(args.rounds):
        for name, decode in (("model view", contextlib.nullcontext), ("full decode (before)", full_jpeg_decode)):
            with decode():
                rates[name].append(epoch_rate(model_dir, pairs, args.out / "train-decode"))
            print(f"round {rnd + 1}: {name} {rates[name][-1]:.1f} img/s", flush=True)
    base = statistics.median(rates["full decode (before)"])
    print(table(["JPEG decode for training", "img/s per round", "median img/s", "× full decode"],
                [[name, " / ".join(f"{r:.1f}" for r in got), statistics.median(got), statistics.median(got) / base]
                 for name, got in rates.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
