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
from tests.imagegen import film12, transcode_dicom, write_dicom


@pytest.mark.parametrize("syntax", ["JPEG2000Lossless", "RLELossless"])  # JPEG Lossless, JPEG-LS: FAST below
def test_lossless_compressed_films_decode_to_the_uncompressed_pixels(syntax, tmp_path):
    """What pydicom's own plugins decode (Pillow, GDCM, its RLE) gives the uncompressed file's pixels."""
    import pydicom

    raw = write_dicom(tmp_path / "raw.dcm", film12(), WindowCenter=1600, WindowWidth=2200)
    packed = transcode_dicom(raw, tmp_path / "packed.dcm", syntax)
    assert pydicom.dcmread(packed, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
    want = np.asarray(decode_bytes(raw.read_bytes(), "raw.dcm").image)
    assert np.array_equal(np.asarray(decode_bytes(packed.read_bytes(), "packed.dcm").image), want)


def test_compressed_films_decode_on_threads_as_the_indexer_runs_them(tmp_path):
    files = [transcode_dicom(write_dicom(tmp_path / f"raw{i}.dcm", film12(i)), tmp_path / f"ll{i}.dcm",
                       "JPEGLosslessProcess14_1").read_bytes() for i in range(4)]
    want = [np.asarray(decode_bytes(data, "x.dcm").image) for data in files]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda data: np.asarray(decode_bytes(data, "x.dcm").image), files * 6))
    assert all(np.array_equal(g, want[i % 4]) for i, g in enumerate(got))


def _encapsulated(raw: Path, dst: Path, codestream: bytes, syntax: str) -> Path:
    """`raw`'s header with `codestream` as its one compressed frame, in transfer syntax `syntax`."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(raw)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.save_as(dst, enforce_file_format=True)
    return dst


FILMS = {  # (stored values, write_dicom attributes)
    "12-bit CR": (lambda: film12(), {"WindowCenter": 1600, "WindowWidth": 2200}),
    "signed 16-bit CT": (lambda: (film12().astype(np.int32) * 3 - 4000).astype(np.int16).view(np.uint16),
                         {"Modality": "CT", "PixelRepresentation": 1, "BitsStored": 16, "HighBit": 15,
                          "RescaleIntercept": -24, "RescaleSlope": 1, "WindowCenter": 40, "WindowWidth": 400}),
    "8-bit": (lambda: (film12() // 16).astype(np.uint16), {"BitsStored": 8, "HighBit": 7}),
}
FAST = {"JPEGLosslessProcess14": "jpeg8_decode", "JPEGLosslessProcess14_1": "jpeg8_decode",
        "JPEGLSLossless": "jpegls_decode"}


@pytest.mark.parametrize("film", list(FILMS))
@pytest.mark.parametrize("syntax", list(FAST))
def test_grey_jpeg_and_jpeg_ls_are_decoded_by_imagecodecs_and_gdcm_alike(syntax, film, tmp_path, monkeypatch):
    """The fast plugin decodes them (not GDCM, two to five times slower); when it fails, GDCM gives the same
    pixels. Signed CT goes through pydicom's sign handling after the plugin, as after any other."""
    import imagecodecs

    values, attrs = FILMS[film]
    raw = write_dicom(tmp_path / "raw.dcm", values(), **attrs)
    data = transcode_dicom(raw, tmp_path / "packed.dcm", syntax).read_bytes()
    want = np.asarray(decode_bytes(raw.read_bytes(), "raw.dcm").image)
    assert want.std() > 10  # a film with contrast: a misread sign or bit depth could not match it
    calls = []
    real = getattr(imagecodecs, FAST[syntax])
    monkeypatch.setattr(imagecodecs, FAST[syntax], lambda *a, **k: calls.append(1) or real(*a, **k))
    assert np.array_equal(np.asarray(decode_bytes(data, "x.dcm").image), want) and calls

    def broken(*a, **k):
        raise RuntimeError("codec failure")

    monkeypatch.setattr(imagecodecs, FAST[syntax], broken)
    assert np.array_equal(np.asarray(decode_bytes(data, "x.dcm").image), want)


def test_near_lossless_jpeg_ls_decodes_within_its_bound(tmp_path):
    import imagecodecs
    import pydicom

    from cxrmodel.imaging.decode import stored_values

    film = film12()
    raw = write_dicom(tmp_path / "raw.dcm", film)
    near = _encapsulated(raw, tmp_path / "near.dcm", imagecodecs.jpegls_encode(film, level=3),
                         pydicom.uid.JPEGLSNearLossless)
    assert np.abs(stored_values(pydicom.dcmread(near)).astype(np.int32) - film).max() <= 3


def test_twelve_bit_jpeg_extended_decodes_to_the_film_within_its_loss(tmp_path):
    """GDCM and Pillow refuse 12-bit JPEG Extended (old CR archives): libjpeg-turbo reads it."""
    import imagecodecs
    import pydicom

    from cxrmodel.imaging.decode import stored_values

    film = film12()
    raw = write_dicom(tmp_path / "raw.dcm", film)
    codestream = imagecodecs.jpeg8_encode(film, level=95, bitspersample=12)
    assert b"\xff\xc1" in codestream  # SOF1: extended sequential, DICOM's JPEG Extended (Process 2 and 4)
    lossy = _encapsulated(raw, tmp_path / "lossy.dcm", codestream, pydicom.uid.JPEGExtended12Bit)
    ds = pydicom.dcmread(lossy)
    error = np.abs(stored_values(ds).astype(np.int32) - film)
    assert error.max() <= 16 and error.mean() < 2
    decoded = decode_bytes(lossy.read_bytes(), "lossy.dcm")
    assert decoded.image.size == (film.shape[1], film.shape[0])


@pytest.mark.skipif(importlib.util.find_spec("openjpeg") is not None, reason="pylibjpeg-openjpeg reads it")
def test_a_compression_no_installed_decoder_reads_is_named_with_what_would_read_it(tmp_path):
    """HTJ2K (no decoder installed by default) gets one line: the compression, each plugin's reason, the fix."""
    import pydicom

    raw = write_dicom(tmp_path / "raw.dcm", film12())
    htj2k = _encapsulated(raw, tmp_path / "htj2k.dcm", b"\xff\x4f\xff\x51" + bytes(64), pydicom.uid.HTJ2K)
    with pytest.raises(ImageDecodeError) as err:
        decode_bytes(htj2k.read_bytes(), "film.dcm")
    message = str(err.value)
    assert message.startswith("film.dcm: its pixel data is compressed as High-Throughput JPEG 2000")
    assert "pip install pylibjpeg" in message and "requires" in message and "\n" not in message


def test_a_codestream_claiming_more_pixels_than_its_header_is_refused_before_allocation(tmp_path):
    """The header's size passes the pixel limit; a forged JPEG frame inside must not pick its own buffer size."""
    import tracemalloc

    import imagecodecs
    import pydicom

    film = film12()[:64, :48]
    codestream = bytearray(imagecodecs.jpeg8_encode(film, lossless=True, predictor=1, bitspersample=12))
    sof = codestream.find(b"\xff\xc3")
    codestream[sof + 5 : sof + 9] = (8000).to_bytes(2, "big") * 2  # claims 8000 x 8000: 128 MB of samples
    raw = write_dicom(tmp_path / "raw.dcm", film)
    data = _encapsulated(raw, tmp_path / "bomb.dcm", bytes(codestream), pydicom.uid.JPEGLosslessSV1).read_bytes()
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError) as err:
            decode_bytes(data, "bomb.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024
    assert "could not be decoded" in str(err.value) and "may be damaged" in str(err.value)
