"""Compressed DICOM as PACS archives store it decodes to the pixels of the uncompressed file; what no installed
decoder reads gets one clear message naming the compression and what would read it."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cxrmodel.errors import ImageDecodeError
from cxrmodel.imaging.decode import decode_bytes
from tests.imagegen import write_dicom

LOSSLESS = ["JPEGLosslessProcess14", "JPEGLosslessProcess14_1", "JPEGLSLossless", "JPEG2000Lossless",
            "RLELossless"]


def _compress(src: Path, dst: Path, syntax: str) -> Path:
    """`src` re-encoded by GDCM in the named transfer syntax (as a PACS or dcmtk would store it)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return dst


def _film(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:160, :128]
    return (1500 + 900 * np.sin(x / 19) * np.cos(y / 23) + rng.normal(0, 60, y.shape)).clip(0, 4095).astype(np.uint16)


@pytest.mark.parametrize("syntax", LOSSLESS)
def test_lossless_compressed_films_decode_to_the_uncompressed_pixels(syntax, tmp_path):
    import pydicom

    raw = write_dicom(tmp_path / "raw.dcm", _film(), WindowCenter=1600, WindowWidth=2200)
    packed = _compress(raw, tmp_path / "packed.dcm", syntax)
    assert pydicom.dcmread(packed, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
    want = np.asarray(decode_bytes(raw.read_bytes(), "raw.dcm").image)
    assert np.array_equal(np.asarray(decode_bytes(packed.read_bytes(), "packed.dcm").image), want)


def test_compressed_films_decode_on_threads_as_the_indexer_runs_them(tmp_path):
    files = [_compress(write_dicom(tmp_path / f"raw{i}.dcm", _film(i)), tmp_path / f"ll{i}.dcm",
                       "JPEGLosslessProcess14_1").read_bytes() for i in range(4)]
    want = [np.asarray(decode_bytes(data, "x.dcm").image) for data in files]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda data: np.asarray(decode_bytes(data, "x.dcm").image), files * 6))
    assert all(np.array_equal(g, want[i % 4]) for i, g in enumerate(got))


@pytest.mark.skipif(importlib.util.find_spec("libjpeg") is not None, reason="pylibjpeg-libjpeg reads it")
def test_a_compression_no_installed_decoder_reads_is_named_with_what_would_read_it():
    import pydicom

    twelve_bit_jpeg = Path(pydicom.__file__).parent / "data" / "test_files" / "JPEG-lossy.dcm"
    with pytest.raises(ImageDecodeError) as err:
        decode_bytes(twelve_bit_jpeg.read_bytes(), "film.dcm")
    message = str(err.value)
    assert message.startswith("film.dcm: its pixel data is compressed as JPEG Extended")
    assert "12-bit" in message and "pip install pylibjpeg" in message and "GDCM does not support" in message
    assert "Traceback" not in message
