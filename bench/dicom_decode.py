"""DICOM decoding as RadLens does it now against what it did before, side by side: the film read in place with
grey levels per stored value; the same after pydicom's copy and unused-bits pass on every file (before
`decode.stored_values`); and that with the per-pixel float64 chain too (before `cxrmodel.imaging.levels`).
Decode time per file, and `radlens index` over the same files (ViT-B/32 architecture). Then the same films as JPEG
Lossless (what archives hold most) and JPEG-LS: imagecodecs (`cxrmodel.imaging.dicom_codecs`) against GDCM, pydicom's
plugin.

    python -m bench.dicom_decode [--images 128 --rows 3000 --cols 2500 --rounds 2]

The films are generated 12-bit CR-like DICOMs with a rescale and a file window (what a PACS sends), written once
under --out. The "copied" rows force pydicom's correction; the per-pixel rows also make the lookup table too small
to use.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np

from bench.common import cpu_kind, table
from bench.indexing import naive_embed, neighbour_agreement, radlens_embed
from bench.models import vit_b32_dir
from cxrmodel.imaging import decode, dicom_codecs, levels
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


def write_lossless(paths: list[Path], folder: Path, jpeg_ls: bool = False) -> list[Path]:
    """The films re-encoded as JPEG Lossless, first-order prediction (transfer syntax ...70), or as lossless
    JPEG-LS (...80); cached."""
    import imagecodecs
    import pydicom
    from pydicom.encaps import encapsulate

    folder.mkdir(parents=True, exist_ok=True)
    out = [folder / p.name for p in paths]
    for src, dst in zip(paths, out, strict=True):
        if dst.exists():
            continue
        ds = pydicom.dcmread(src)
        if jpeg_ls:
            codestream = imagecodecs.jpegls_encode(ds.pixel_array)
            ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
        else:
            codestream = imagecodecs.jpeg8_encode(ds.pixel_array, lossless=True, predictor=1,
                                                  bitspersample=int(ds.BitsStored))
            ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
        ds.PixelData = encapsulate([codestream])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        ds.save_as(dst, enforce_file_format=True)
    return out


@contextlib.contextmanager
def with_gdcm():
    """Within it, compressed films go to pydicom's own plugin order (GDCM first), as before."""
    with mock.patch.object(dicom_codecs, "preferred_plugin", lambda *a: ""):
        yield


def lossless_decode_ms(paths: list[Path], rounds: int = 2) -> list[list]:
    """ms per compressed film, imagecodecs against GDCM, on one thread and on two (wall time per film)."""
    datas = [p.read_bytes() for p in paths[:8]]
    rows = []
    for name, mode in (("imagecodecs (now)", contextlib.nullcontext), ("GDCM", with_gdcm)):
        one, two = [], []
        for _ in range(rounds):
            with mode():
                start = time.perf_counter()
                for data in datas:
                    decode_bytes(data, "x.dcm")
                one.append(1000 * (time.perf_counter() - start) / len(datas))
                start = time.perf_counter()
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda data: decode_bytes(data, "x.dcm"), datas))
                two.append(1000 * (time.perf_counter() - start) / len(datas))
        rows.append([name, statistics.median(one), statistics.median(two)])
    return rows


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
def copied():
    """Within it, every film is copied out of the file's bytes and its unused bits corrected, as before."""
    with mock.patch.object(decode, "unused_bits_clean", lambda *a: False):
        yield


@contextlib.contextmanager
def per_pixel():
    """Within it, films are copied as before and grey levels computed per pixel, as before the lookup."""
    with copied(), mock.patch.object(levels, "MAX_TABLE", 0):
        yield


MODES = {"in place, lookup (now)": contextlib.nullcontext, "copied, lookup (before)": copied,
         "copied, per pixel (before the lookup)": per_pixel}


def decode_ms(paths: list[Path], rounds: int = 3) -> dict[str, float]:
    """Median ms per file of `decode_bytes` in each mode, alternating (files read beforehand)."""
    datas = [p.read_bytes() for p in paths[:16]]
    times: dict[str, list[float]] = {name: [] for name in MODES}
    for _ in range(rounds):
        for name, mode in MODES.items():
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
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-out/indexing"))
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_kind()}")
    model_dir = vit_b32_dir(args.out / "vit-b32")
    paths = write_films(args.out / f"dicom-{args.rows}x{args.cols}", args.images, args.rows, args.cols)
    ms = decode_ms(paths)
    print(table(["DICOM grey levels", f"decode ms per {args.rows}x{args.cols} file, one core"],
                [[name, value] for name, value in ms.items()]))
    naive, naive_s = naive_embed(model_dir, paths, open_image=naive_dicom)
    rates: dict[str, list[float]] = {name: [] for name in MODES}
    vectors = {}
    for round_ in range(args.rounds):  # the order turns each round: no mode always runs first, on a cold process
        for name in list(MODES)[:: 1 if round_ % 2 == 0 else -1]:
            with MODES[name]():
                vectors[name], summary = radlens_embed(model_dir, paths, args.out / "data-dicom", None, "auto")
            rates[name].append(len(paths) / summary.embed_seconds)
    naive_rate = len(paths) / naive_s
    mean = {name: statistics.fmean(r) for name, r in rates.items()}
    copied_rate, per_pixel_rate = mean["copied, lookup (before)"], mean["copied, per pixel (before the lookup)"]
    rows = [["naive (pydicom LUTs + min..max + CLIPProcessor + fp32)", f"{naive_rate:.1f}", 1.0,
             naive_rate / copied_rate, naive_rate / per_pixel_rate, 1.0]]
    rows += [[f"radlens index, {name}", " / ".join(f"{r:.1f}" for r in rates[name]), mean[name] / naive_rate,
              mean[name] / copied_rate, mean[name] / per_pixel_rate, neighbour_agreement(naive, vectors[name])]
             for name in MODES]
    print(table(["pipeline", "img/s (embedding phase), each round", "× naive", "× copied", "× per pixel",
                 "top-10 agreement with naive"], rows))
    first = next(iter(vectors.values()))
    same = all(np.array_equal(a, b) for other in vectors.values() for a, b in zip(first, other, strict=True))
    print(f"vectors identical in every mode: {same}")

    lossless = write_lossless(paths, args.out / f"dicom-{args.rows}x{args.cols}-jpeg-lossless")
    jpeg_ls = write_lossless(paths[:8], args.out / f"dicom-{args.rows}x{args.cols}-jpeg-ls", jpeg_ls=True)
    for name, files in (("JPEG Lossless", lossless), ("JPEG-LS lossless", jpeg_ls)):
        print(table([f"{name} decoder", "ms per film, one thread", "ms per film, two threads (wall)"],
                    lossless_decode_ms(files)))
    rows = []
    for name, mode in (("libjpeg-turbo (now)", contextlib.nullcontext), ("GDCM", with_gdcm)):
        with mode():
            got, summary = radlens_embed(model_dir, lossless, args.out / "data-dicom", None, "auto")
        rows.append([f"radlens index, JPEG Lossless, {name}", len(lossless) / summary.embed_seconds,
                     bool(np.array_equal(got, first))])
    print(table(["pipeline", "img/s (embedding phase)", "vectors identical to the uncompressed films'"], rows))
    print(f"libjpeg-turbo / GDCM, embedding phase: {rows[0][1] / rows[1][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
