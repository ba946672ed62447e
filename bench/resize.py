"""Block averaging before the bicubic resize (`ImagePreprocess.reducing_gap`, now) against resampling the whole
image (before), side by side: resize ms per image at several sizes, `radlens index` over large DICOM films and PNGs
both ways in alternating rounds, and how far the model's input and embeddings move -- for the ViT-B/32 architecture
(random weights) and for the bundled radlens-mini (trained).

    python -m bench.resize [--films 128 --pngs 256 --rounds 2]

The DICOM films are bench.dicom_decode's (12-bit CR, 3000 x 2500), the PNGs bench.indexing's (2048 x 2048), both
generated once under --out; the radlens-mini check also resizes the shared corpus's first NIH films to 2539 x 3050.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from bench.common import CORPUS, cpu_kind, table
from bench.dicom_decode import naive_dicom, write_films
from bench.indexing import make_images, naive_embed, neighbour_agreement, radiograph, radlens_embed
from bench.models import vit_b32_dir
from cxrmodel.imaging.preprocess import ImagePreprocess
from cxrmodel.model.bundled import bundled_model_dir

SIZES = [(1024, 1024), (2048, 2048), (2500, 3000), (3480, 4240)]


@contextlib.contextmanager
def full_resize():
    """Within it, every resize resamples the whole image (`reducing_gap=None`), as RadLens did before."""
    resize = ImagePreprocess.resize

    def whole(self, *args, **kwargs):
        return resize(dataclasses.replace(self, reducing_gap=None), *args, **kwargs)

    with mock.patch.object(ImagePreprocess, "resize", whole):
        yield


MODES = {"blocks, then bicubic (now)": contextlib.nullcontext, "bicubic from the full image (before)": full_resize}


def film(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A radiograph-like 8-bit film with five blobs (`bench.indexing.radiograph`)."""
    return radiograph(np.random.default_rng(seed), size, blobs=5)


def resize_ms(preprocess: ImagePreprocess, image: Image.Image, repeat: int = 7) -> float:
    """Best of `repeat` timings of one resize, in ms."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        preprocess.resize(image)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def resize_rows(models: dict[str, ImagePreprocess]) -> list[list]:
    """Per model and size: the block factor, ms now / before, and the mean and max |pixel diff| at the input."""
    rows = []
    for size in SIZES:
        image = film(size)
        for name, preprocess in models.items():
            whole = dataclasses.replace(preprocess, reducing_gap=None)
            factor = int(min(size) / preprocess.output_size[0] / preprocess.reducing_gap) or 1
            diff = np.abs(np.asarray(preprocess.resize(image), float) - np.asarray(whole.resize(image), float))
            now, before = resize_ms(preprocess, image), resize_ms(whole, image)
            rows.append([f"{size[0]}x{size[1]}", name, factor, now, before, before / now, diff.mean(), diff.max()])
    return rows


def index_rows(model_dir: Path, name: str, paths: list[Path], data_dir: Path, rounds: int, open_image=None):
    """`radlens index` (auto) in both modes, alternating; rows of img/s per round, ratio, agreement with naive."""
    naive, _ = naive_embed(model_dir, paths, **({"open_image": open_image} if open_image else {}))
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    vectors = {}
    for round_ in range(rounds):  # the order turns each round: neither mode always runs first
        for mode in list(MODES)[:: 1 if round_ % 2 == 0 else -1]:
            with MODES[mode]():
                vectors[mode], summary = radlens_embed(model_dir, paths, data_dir, None, "auto")
            rates[mode].append(len(paths) / summary.embed_seconds)
    now, before = (statistics.fmean(rates[mode]) for mode in MODES)
    cos = np.sum(vectors[next(iter(MODES))] * vectors[list(MODES)[1]], axis=1)
    rows = [[name, mode, " / ".join(f"{r:.1f}" for r in rates[mode]), statistics.fmean(rates[mode]) / before,
             neighbour_agreement(naive, vectors[mode])] for mode in MODES]
    return rows, now / before, cos


def mini_rows(count: int) -> list[list]:
    """radlens-mini (trained), fp32: cosine between the two modes' embeddings of large films."""
    from cxrmodel.model.encoder import EncoderConfig, load_encoder

    encoder = load_encoder(EncoderConfig(model="radlens-mini", precision="fp32"))
    sets = {f"{count} NIH films resized to 2539x3050": [
                Image.open(p).convert("L").resize((2539, 3050), Image.Resampling.BICUBIC)
                for p in sorted((CORPUS / "images" / "nih").glob("*.png"))[:count]],
            f"{count} generated films 2500x3000": [film((2500, 3000), seed) for seed in range(count)]}
    rows = []
    for name, images in sets.items():
        now = encoder.encode_images([encoder.preprocess.resize(im) for im in images])
        with full_resize():
            before = encoder.encode_images([encoder.preprocess.resize(im) for im in images])
        cos = np.sum(now * before, axis=1)
        rows.append([name, f"{cos.min():.6f}", f"{np.median(cos):.6f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--films", type=int, default=128, help="3000 x 2500 DICOM films to index")
    parser.add_argument("--pngs", type=int, default=256, help="2048 x 2048 PNGs to index")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-out/indexing"))
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_kind()}")
    model_dir = vit_b32_dir(args.out / "vit-b32")
    models = {"ViT-B/32 (224)": ImagePreprocess.from_pretrained(model_dir),
              "radlens-mini (64)": ImagePreprocess.from_pretrained(bundled_model_dir())}
    print(table(["image", "model", "block factor", "ms now", "ms before", "×", "mean |pixel diff|",
                 "max |pixel diff|"], resize_rows(models)))
    films = write_films(args.out / "dicom-3000x2500", args.films, 3000, 2500)
    pngs = make_images(args.out / "images-2048", args.pngs, 2048)
    rows, notes = [], []
    for name, paths, data_dir, opener in ((f"{len(films)} DICOM 3000x2500", films, "data-resize-dicom", naive_dicom),
                                          (f"{len(pngs)} PNG 2048x2048", pngs, "data-resize-png", None)):
        got, ratio, cos = index_rows(model_dir, name, paths, args.out / data_dir, args.rounds, opener)
        rows += got
        notes.append(f"{name}: now / before {ratio:.2f}x; cosine between the modes' vectors min {cos.min():.6f}, "
                     f"median {np.median(cos):.6f}")
    print(table(["images", "resize", "img/s (embedding phase), each round", "× before",
                 "top-10 agreement with naive"], rows))
    print("\n".join(notes))
    print(table(["radlens-mini, fp32", "cosine now vs before: min", "median"], mini_rows(24)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
