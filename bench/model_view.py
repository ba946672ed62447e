"""How far the model's view of a JPEG (a reduced DCT decode, `DecodedImage.model_input`) is from a full decode
and resize, per model: pixels at the model's input and embedding cosines, with and without the resize reading
the reduced decode in the full image's geometry.

    python -m bench.model_view [--films 24] [--film-size 2539x3050] [--models radlens-mini,vit-b32]

Reads the shared corpus: its JPEGs as they are, and its first NIH PNG films upscaled and saved as JPEG q95.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import CORPUS, require, table
from bench.models import vit_b32_dir
from cxrmodel.imaging.decode import decode_bytes


def corpus_jpegs() -> list[bytes]:
    """The shared corpus's own JPEG files."""
    return [p.read_bytes() for p in sorted(CORPUS.rglob("*.jpg"))]


def films_as_jpeg(count: int, size: tuple[int, int]) -> list[bytes]:
    """The corpus's first PNG films, resized to `size` and saved as JPEG quality 95 (in memory)."""
    out = []
    for path in sorted(CORPUS.rglob("*.png"))[:count]:
        buf = io.BytesIO()
        Image.open(path).convert("L").resize(size, Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def compare(encoder, datas: list[bytes]) -> list:
    """[scales, mean |pixel diff|, min cos, median cos, min cos without the box, median without] for one set."""
    pp = encoder.preprocess
    full = [pp.resize(decode_bytes(d, "x.jpg").image) for d in datas]
    views = [decode_bytes(d, "x.jpg", model_side=pp.decode_side) for d in datas]
    exact = [v.model_input(pp) for v in views]
    unboxed = [pp.resize(v.image) for v in views]
    diff = np.mean([np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
                    for a, b in zip(full, exact, strict=True)])
    ref = encoder.encode_images(full)
    cos = (ref * encoder.encode_images(exact)).sum(1)
    cos_unboxed = (ref * encoder.encode_images(unboxed)).sum(1)
    scales = "/".join(f"1/{s}" for s in sorted({v.reduced_by for v in views}))
    return [scales, f"{diff:.2f}", *(f"{v:.5f}" for v in (cos.min(), np.median(cos), cos_unboxed.min(),
                                                           np.median(cos_unboxed)))]


def main(argv: list[str] | None = None) -> int:
    from cxrmodel.model.encoder import EncoderConfig, load_encoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--films", type=int, default=24)
    parser.add_argument("--film-size", default="2539x3050", help="WIDTHxHEIGHT of the films saved as JPEG")
    parser.add_argument("--models", default="radlens-mini,vit-b32",
                        help="comma-separated: radlens-mini, vit-b32 (the architecture, random weights), or a path")
    parser.add_argument("--out", type=Path, default=Path("bench-out/indexing"))
    args = parser.parse_args(argv)
    require(CORPUS, "shared corpus")
    width, height = (int(v) for v in args.film_size.lower().split("x"))
    sets = {"corpus JPEGs": corpus_jpegs(),
            f"films as {width}x{height} JPEG": films_as_jpeg(args.films, (width, height))}
    rows = []
    for model in args.models.split(","):
        path = str(vit_b32_dir(args.out / "vit-b32")) if model == "vit-b32" else model
        encoder = load_encoder(EncoderConfig(model=path, precision="fp32"))
        for name, datas in sets.items():
            rows.append([model, f"{name} ({len(datas)})", *compare(encoder, datas)])
    print(table(["model", "images", "scale", "mean |pixel diff|", "cos min", "cos median", "no box: min",
                 "no box: median"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
