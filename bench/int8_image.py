"""Is an int8 image tower on ONNX Runtime faster than RadLens's bf16 torch one on this CPU, and how close?

    python -m bench.int8_image [--batch 32 --batches 6 --images 256]

The ViT-B/32 architecture with random weights (the real model's cost), exported to ONNX in fp32, then
quantised by onnxruntime: dynamic int8 with per-channel weights (activations quantised per batch at run
time) and static int8 QDQ with per-channel weights (activations calibrated on 64 corpus images). Side by
side, one run, 2 threads each: model-only throughput on preprocessed batches, and against the fp32 torch
embeddings of the first `--images` shared-corpus images: min cosine and top-10 neighbour agreement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import cpu_kind, table

THREADS = 2


def corpus_pixels(preprocess, count: int) -> np.ndarray:
    import csv

    from PIL import Image

    from bench.common import CORPUS, require

    require(CORPUS / "manifest.csv", "dev corpus")
    with open(CORPUS / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:count]
    return preprocess.to_tensor([Image.open(CORPUS / r["file"]).convert("L") for r in rows]).numpy()


def top10_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    def neighbours(v):
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :10]

    a, b = neighbours(reference), neighbours(other)
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b, strict=True)]))


def export_and_quantize(model_dir: Path, pixels: np.ndarray, out: Path) -> tuple[Path, Path, Path]:
    """The image tower as fp32 ONNX, and its dynamic and static int8 quantisations (cached in `out`)."""
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from transformers import CLIPModel

    from cxrmodel.model.image_onnx import ImageTower
    from cxrmodel.model.tower_export import export_onnx

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"pixel_values": pixels[i : i + 16]} for i in range(0, 64, 16)])

        def get_next(self):
            return next(self.batches, None)

    onnx_fp32, dynamic, static = (out / f"image_{k}.onnx" for k in ("fp32", "int8_dynamic", "int8_static"))
    if not onnx_fp32.exists():
        export_onnx(ImageTower(CLIPModel.from_pretrained(model_dir)), {"pixel_values": torch.from_numpy(pixels[:2])},
                    onnx_fp32, {"pixel_values": {0: "batch"}})
    if not dynamic.exists():
        quantize_dynamic(str(onnx_fp32), str(dynamic), per_channel=True, weight_type=QuantType.QInt8)
    if not static.exists():
        quantize_static(str(onnx_fp32), str(static), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx_fp32, dynamic, static


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    import torch

    from bench.models import vit_b32_dir
    from cxrmodel.model.encoder import EncoderConfig, load_encoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench-out/int8"))
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = vit_b32_dir(args.out / "vitb32")
    fp32 = load_encoder(EncoderConfig(model=str(model_dir), precision="fp32", batch_size=args.batch))
    auto = load_encoder(EncoderConfig(model=str(model_dir), precision="auto", batch_size=args.batch))
    pixels = corpus_pixels(fp32.preprocess, args.images)

    onnx_fp32, dynamic, static = export_and_quantize(model_dir, pixels, args.out)

    def session(path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    runners = {
        "torch fp32 (transformers + RadLens fast paths)": lambda x: fp32.encode_pixels(torch.from_numpy(x)),
        "torch auto (bf16 matmuls, RadLens)": lambda x: auto.encode_pixels(torch.from_numpy(x)),
    }
    for name, path in (("ORT fp32", onnx_fp32), ("ORT int8 dynamic, per-channel", dynamic),
                       ("ORT int8 static QDQ, per-channel", static)):
        sess = session(path)
        runners[name] = lambda x, s=sess: s.run(None, {"pixel_values": x})[0]

    reference = np.concatenate([runners["torch fp32 (transformers + RadLens fast paths)"](pixels[i : i + args.batch])
                                for i in range(0, len(pixels), args.batch)])
    batch = pixels[: args.batch]
    times = {name: [] for name in runners}
    for _ in range(args.batches + 1):  # alternating; the first round warms up
        for name, run in runners.items():
            t0 = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - t0)
    rows = []
    base = None
    for name, run in runners.items():
        seconds = float(np.median(times[name][1:]))
        speed = args.batch / seconds
        base = base or speed
        out = np.concatenate([run(pixels[i : i + args.batch]) for i in range(0, len(pixels), args.batch)])
        out = out / np.linalg.norm(out, axis=1, keepdims=True)
        rows.append([name, speed, speed / base, float(np.min(np.sum(out * reference, axis=1))),
                     top10_agreement(reference, out)])
    print(f"CPU: {cpu_kind()}; onnxruntime {ort.__version__}, torch {torch.__version__}, {THREADS} threads")
    print(f"ViT-B/32 image tower (random weights), batch {args.batch}, median of {args.batches}; "
          f"agreement on {len(pixels)} corpus images vs torch fp32\n")
    print(table(["image tower", "img/s", "x torch fp32", "min cosine", "top-10 agreement"], rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
