"""DICOM grey levels per stored value (`cxrmodel.imaging.levels`) against the per-pixel float64 chain RadLens ran
before, side by side: decode time per file, and `radlens index` over the same files (ViT-B/32 architecture).

    python -m bench.dicom_decode [--images 128 --rows 3000 --cols 2500]

The films are generated 12-bit CR-like DICOMs with a rescale and a file window (what a PACS sends), written once
under --out. The per-pixel rows force the old path by making the lookup table too small to use.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

from bench.common import cpu_kind, table
from bench.indexing import naive_embed, neighbour_agreement, radlens_embed
from bench.models import vit_b32_dir
from cxrmodel.imaging import levels
from cxrmodel.imaging.decode import decode_bytes


def write_films(folder: Path, count: int, rows: int, cols: int, seed: int = 0) -> list[Path]:
    """12-bit CR-like DICOMs with a rescale and a window (cached)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"cr{i:05d}.dcm" for i in range(count)]
    if all(p.exists() for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols] / max(rows, cols)
    for path in paths:
        img = 600 + 900 * yy + rng.normal(0, 40, (rows, cols))
        for _ in range(rng.integers(3, 8)):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3)
            img += rng.uniform(300, 1500) * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
        ds.Rows, ds.Columns, ds.PhotometricInterpretation, ds.SamplesPerPixel = rows, cols, "MONOCHROME2", 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 3000
        ds.PixelData = np.clip(img, 0, 4095).astype(np.uint16).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
    return paths


def naive_dicom(path: Path):
    """How a user reads a DICOM film first: pydicom, its modality and VOI LUTs, min..max to 8 bits, RGB."""
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-9) * 255
    return Image.fromarray(arr.astype(np.uint8)).convert("RGB")


@contextlib.contextmanager
def per_pixel():
    """Within it, grey levels are computed per pixel, as before the lookup."""
    with mock.patch.object(levels, "MAX_TABLE", 0):
        yield


def decode_ms(paths: list[Path], rounds: int = 3) -> dict[str, float]:
    """Median ms per file of `decode_bytes`, the lookup and per pixel alternating (files read beforehand)."""
    datas = [p.read_bytes() for p in paths[:16]]
    times: dict[str, list[float]] = {"lookup": [], "per pixel": []}
    for _ in range(rounds):
        for name, mode in (("lookup", contextlib.nullcontext), ("per pixel", per_pixel)):
            with mode():
                start = time.perf_counter()
                for data in datas:
                    decode_bytes(data, "x.dcm")
                times[name].append(1000 * (time.perf_counter() - start) / len(datas))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--cols", type=int, default=2500)
    parser.add_argument("--out", type=Path, default=Path("bench-out/indexing"))
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_kind()}")
    model_dir = vit_b32_dir(args.out / "vit-b32")
    paths = write_films(args.out / f"dicom-{args.rows}x{args.cols}", args.images, args.rows, args.cols)
    ms = decode_ms(paths)
    print(table(["DICOM grey levels", f"decode ms per {args.rows}x{args.cols} file, one core"],
                [[name, value] for name, value in ms.items()]))
    naive, naive_s = naive_embed(model_dir, paths, open_image=naive_dicom)
    rows = [["naive (pydicom LUTs + min..max + CLIPProcessor + fp32)", len(paths) / naive_s, len(paths) / naive_s,
             1.0]]
    vectors = {}
    for name, mode in (("lookup", contextlib.nullcontext), ("per pixel (before)", per_pixel)):
        with mode():
            vectors[name], summary = radlens_embed(model_dir, paths, args.out / "data-dicom", None, "auto")
        rows.append([f"radlens index, levels {name}", len(paths) / summary.seconds,
                     len(paths) / summary.embed_seconds, neighbour_agreement(naive, vectors[name])])
    same = all(np.array_equal(a, b) for a, b in zip(vectors["lookup"], vectors["per pixel (before)"], strict=True))
    print(table(["pipeline", "img/s (run)", "img/s (embedding)", "× naive (embedding)", "× per pixel (embedding)",
                 "top-10 agreement with naive"],
                [[r[0], r[1], r[2], r[2] * naive_s / len(paths), r[2] / rows[2][2], r[3]] for r in rows]))
    print(f"vectors identical: {same}; top-10 agreement "
          f"{neighbour_agreement(vectors['per pixel (before)'], vectors['lookup']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
