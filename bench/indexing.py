"""Indexing throughput: `radlens index` vs the pipeline a user would write, side by side in one run.

    python -m bench.indexing [--images 512] [--size 1024] [--out bench-out/indexing]

Both read the same N generated grayscale PNGs (decode included) with the real ViT-B/32 architecture.
Naive: PIL -> CLIPProcessor -> CLIPModel.get_image_features, fp32, batch 32, one process.
RadLens: the full `index` run (decoding, bf16, DB rows, zero-shot scores, FAISS file, ONNX query tower).
Each RadLens run is reported twice: over the whole run, and over its embedding phase alone (decode, model,
rows and scores of every file: the rate a large run converges to), since the run's one-off costs (planning,
the FAISS file, exporting the query tower) weigh on a 512-image run as they would not on 100,000 images.
The naive pipeline has only an embedding phase. Also reports how well the two embedding sets agree: mean
overlap of each image's top-10 neighbours.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

from bench.common import cpu_kind, table
from bench.models import vit_b32_dir
from cxrmodel.imaging.preprocess import ImagePreprocess


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """Radiograph-like grayscale PNGs: smooth anatomy-like blobs, a gradient, film noise (cached)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:05d}.png" for i in range(count)]
    if all(p.exists() for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    for path in paths:
        radiograph(rng, (size, size)).save(path)
    return paths


def radiograph(rng: np.random.Generator, size: tuple[int, int], blobs: int | None = None) -> Image.Image:
    """One radiograph-like 8-bit film of `size` (width, height): a gradient, film noise and `blobs` smooth
    anatomy-like blobs (3 to 7 drawn from `rng` when None)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = 40 + 60 * yy + rng.normal(0, 6, (h, w))
    for _ in range(rng.integers(3, 8) if blobs is None else blobs):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3)
        img += rng.uniform(30, 120) * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L")


def as_jpeg(paths: list[Path], folder: Path, quality: int = 95) -> list[Path]:
    """The same images as baseline JPEGs (cached): the format of most large CXR archives."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        target = folder / f"{path.stem}.jpg"
        if not target.exists():
            Image.open(path).save(target, "JPEG", quality=quality)
        out.append(target)
    return out


def corpus_images(folder: Path, count: int, size: int) -> list[Path]:
    """The shared corpus's real images, upscaled to size x size grayscale PNGs (cached)."""
    from bench.common import CORPUS, require

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(p for p in (require(CORPUS, "shared corpus") / "images").rglob("*") if p.is_file())[:count]
    paths = []
    for i, src in enumerate(sources):
        path = folder / f"real{i:05d}.png"
        if not path.exists():
            Image.open(src).convert("L").resize((size, size), Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def naive_embed(model_dir: Path, paths: list[Path], batch: int = 32,
                open_image=lambda path: Image.open(path).convert("RGB")) -> tuple[np.ndarray, float]:
    """What a user would write first (`open_image`: how they read a file); returns (unit vectors, seconds)."""
    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(model_dir)
    model = CLIPModel.from_pretrained(model_dir).eval()
    t0 = time.perf_counter()
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            images = [open_image(p) for p in paths[start : start + batch]]
            inputs = processor(images=images, return_tensors="pt")
            feats = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            out.append(torch.nn.functional.normalize(feats, dim=-1).numpy())
    return np.concatenate(out), time.perf_counter() - t0


def radlens_embed(model_dir: Path, paths: list[Path], data_dir: Path, workers: int | None,
                  precision: str, engine: str = "local", actors: int = 1, decode: str = "auto"):
    """`radlens index` as a user runs it; returns (vectors in path order, its IndexSummary)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from cxrmodel.model.encoder import EncoderConfig, load_encoder
    from indexer.pipeline import IndexJob, run_index
    from indexer.schedule import ScheduleConfig
    from indexer.store import EmbeddingRow, ImageRow, default_db_url, open_db

    if data_dir.exists():
        shutil.rmtree(data_dir)
    encoder = load_encoder(EncoderConfig(model=str(model_dir), precision=precision))
    ray = None
    if engine == "ray":
        from indexer.ray_engine import RayConfig

        ray = RayConfig(actors=actors, cpus_per_actor=1)
    job = IndexJob(sources=[str(paths[0].parent)], data_dir=data_dir, progress=False,
                   workers=workers, engine=engine, ray=ray, decode=ScheduleConfig(plan=decode))
    summary = run_index(job, encoder)
    db = open_db(default_db_url(data_dir))
    with Session(db) as s:
        rows = dict(s.execute(select(ImageRow.path, EmbeddingRow.vector)
                              .join(EmbeddingRow, EmbeddingRow.image_id == ImageRow.id)).all())
    db.dispose()
    return np.stack([np.frombuffer(rows[str(p.resolve())], "<f4") for p in paths]), summary


def neighbour_agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each row's top-k neighbours (self excluded) under two embeddings."""
    def topk(x):
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]
    from indexer.compressed import recall_at_k

    return recall_at_k(topk(b), topk(a), k)


@contextlib.contextmanager
def full_jpeg_decode():
    """Within it, a model asks for pixels no JPEG can be decoded reduced to (`ImagePreprocess.decode_side`):
    every JPEG decodes in full, as RadLens did before its one model-input decode. In-process decoding only."""
    with mock.patch.object(ImagePreprocess, "decode_side", property(lambda self: 1 << 30)):
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--source", choices=("generated", "corpus"), default="generated",
                        help="generated radiograph-like images, or the shared corpus upscaled to --size")
    parser.add_argument("--format", choices=("png", "jpeg"), default="png",
                        help="store the images as PNG or as JPEG (quality 95)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/indexing"))
    parser.add_argument("--decode", default="",
                        help="also run `radlens index --decode PLAN` (auto precision) for each comma-separated PLAN, "
                             "e.g. turns,ahead,ahead:1:1,auto (auto measures its way to a plan from 4096 files)")
    parser.add_argument("--ray-actors", type=int, default=0,
                        help="also run `radlens index --engine ray` on a local Ray with this many embedding actors")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_kind()}")  # every speed figure names the machine kind it was measured on
    model_dir = vit_b32_dir(args.out / "vit-b32")
    paths = make_images(args.out / f"images-{args.size}", args.images, args.size) if args.source == "generated" \
        else corpus_images(args.out / f"corpus-{args.size}", args.images, args.size)
    if args.format == "jpeg":
        paths = as_jpeg(paths, args.out / f"{paths[0].parent.name}-jpeg")
    print(f"{len(paths)} {args.source} {args.format.upper()} images of {args.size}x{args.size}, ViT-B/32 "
          f"architecture, torch threads {torch.get_num_threads()}")
    naive, naive_s = naive_embed(model_dir, paths)
    n = len(paths)
    rows = [["naive (PIL + CLIPProcessor + fp32, batch 32)", n / naive_s, 1.0, n / naive_s, 1.0, 0.0, 1.0]]

    def add(name: str, vectors: np.ndarray, summary) -> None:
        rows.append([name, n / summary.seconds, naive_s / summary.seconds, n / summary.embed_seconds,
                     naive_s / summary.embed_seconds, summary.seconds - summary.embed_seconds,
                     neighbour_agreement(naive, vectors)])

    ours, ours_summary = radlens_embed(model_dir, paths, args.out / "data", args.workers, "auto")
    add("radlens index --precision fp32", *radlens_embed(model_dir, paths, args.out / "data-fp32", args.workers,
                                                         "fp32"))
    add("radlens index (auto: bf16, fast paths, --decode auto)", ours, ours_summary)
    if args.workers is None:  # the default against one decode process running beside the model
        add("radlens index --workers 1 (auto, a decode process beside)",
            *radlens_embed(model_dir, paths, args.out / "data-procs", 1, "auto"))
    if args.format == "jpeg":  # side by side: the same run, each JPEG decoded in full for the model as before
        with full_jpeg_decode():
            add("radlens index (auto), JPEGs decoded in full (before the model view)",
                *radlens_embed(model_dir, paths, args.out / "data-full-jpeg", 0, "auto"))
    plans = [plan.strip() for plan in args.decode.split(",") if plan.strip()]
    for plan in plans:
        vectors, summary = radlens_embed(model_dir, paths, args.out / "data-decode", 0, "auto", decode=plan)
        add(f"radlens index --decode {plan}", vectors, summary)
        print(f"--decode {plan}: {summary.decode_plan}")
    if args.ray_actors:
        add(f"radlens index --engine ray (local Ray, {args.ray_actors} actor(s), bf16)",
            *radlens_embed(model_dir, paths, args.out / "data-ray", args.workers, "auto", "ray", args.ray_actors))
    print(table(["pipeline", "img/s (run)", "speed-up (run)", "img/s (embedding)", "speed-up (embedding)",
                 "one-off s", "top-10 agreement"], rows))
    print(f"one-off s: the run's seconds outside its embedding phase; of the auto run's "
          f"{ours_summary.seconds - ours_summary.embed_seconds:.1f} s, {ours_summary.tower_seconds:.1f} s exported "
          f"the ONNX query tower")
    cos = np.sum(naive * ours, axis=1)
    print(f"auto run: {ours_summary.decode_plan}")
    print(f"cosine(naive, radlens bf16) per image: min {cos.min():.4f}, median {np.median(cos):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
