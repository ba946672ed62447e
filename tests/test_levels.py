"""Grey levels computed once per stored value equal the per-pixel chain, bit for bit, for every kind of map."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxrmodel.imaging import levels
from cxrmodel.imaging.decode import decode_bytes, unused_bits_clean
from cxrmodel.imaging.levels import map_to_uint8, scale_to_uint8
from tests.imagegen import write_dicom


def _per_pixel(data: bytes, window: str | None = None) -> np.ndarray:
    """The display chain as RadLens ran it per pixel before the lookup (modality LUT, VOI or preset window,
    min..max to 8 bits, MONOCHROME1 inverted)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from cxrmodel.imaging.decode import WINDOW_PRESETS

    ds = pydicom.dcmread(io.BytesIO(data))
    arr = apply_modality_lut(ds.pixel_array, ds)
    invert = ds.PhotometricInterpretation == "MONOCHROME1"
    if window in WINDOW_PRESETS:
        centre, width = WINDOW_PRESETS[window]
        out = (np.clip((np.asarray(arr, dtype=np.float64) - (centre - width / 2)) / width, 0.0, 1.0) * 255.0
               ).astype(np.uint8)
        return 255 - out if invert else out
    if window != "full" and (("WindowCenter" in ds and "WindowWidth" in ds) or "VOILUTSequence" in ds):
        arr = apply_voi_lut(arr, ds, index=0)
    out = scale_to_uint8(arr)
    return 255 - out if invert else out


def _film(shape=(192, 160), lo=300, hi=3800, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    smooth = (np.sin(x / 17) + np.cos(y / 23) + 2) / 4
    return (lo + (hi - lo) * smooth + rng.normal(0, 30, shape)).clip(lo, hi).astype(np.int64)


def _voi_sequence(zigzag: bool):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    ramp = np.arange(4096)
    table = (ramp % 1024) * 60 if zigzag else ramp * 16  # zigzag: a map that turns
    item.add_new(0x00283006, "US", [int(v) for v in table])  # LUT Data
    return [item]


CASES = {
    "12-bit, no window": ({}, None),
    "12-bit, file window": ({"WindowCenter": 2000, "WindowWidth": 2500}, None),
    "MONOCHROME1, file window": ({"WindowCenter": 1800, "WindowWidth": 1000, "photometric": "MONOCHROME1"}, None),
    "full range despite a window": ({"WindowCenter": 1800, "WindowWidth": 1000}, "full"),
    "rescale slope 0.37": ({"RescaleSlope": 0.37, "RescaleIntercept": 12.5, "WindowCenter": 700,
                            "WindowWidth": 600}, None),
    "sigmoid window": ({"WindowCenter": 2000, "WindowWidth": 900, "VOILUTFunction": "SIGMOID"}, None),
    "VOI LUT sequence": ({"VOILUTSequence": "ramp"}, None),
    "VOI LUT sequence that turns": ({"VOILUTSequence": "zigzag"}, None),
    "CT in HU, file window": ({"ct": True, "WindowCenter": 40, "WindowWidth": 400}, None),
    "CT in HU, lung preset": ({"ct": True}, "lung"),
    "CT in HU, bone preset, MONOCHROME1": ({"ct": True, "photometric": "MONOCHROME1"}, "bone"),
    "flat image": ({"flat": True}, None),
    "flat image, MONOCHROME1": ({"flat": True, "photometric": "MONOCHROME1"}, None),
    "narrow values far from 0": ({"narrow": True, "WindowCenter": 3100, "WindowWidth": 200}, None),
}


def _case_file(case: str, tmp_path) -> tuple[bytes, str | None]:
    attrs, window = dict(CASES[case][0]), CASES[case][1]
    photometric = attrs.pop("photometric", "MONOCHROME2")
    pixels = _film()
    if attrs.pop("flat", False):
        pixels[:] = 1234
    if attrs.pop("narrow", False):
        pixels = _film(lo=3000, hi=3300)
    if attrs.pop("ct", False):  # signed, -1024..3071 HU after the intercept
        pixels = _film(lo=-1000, hi=2000)
        attrs.update(Modality="CT", PixelRepresentation=1, BitsStored=16, HighBit=15, RescaleSlope=1,
                     RescaleIntercept=-24)
    if "VOILUTSequence" in attrs:
        attrs["VOILUTSequence"] = _voi_sequence(attrs["VOILUTSequence"] == "zigzag")
    data = write_dicom(tmp_path / "x.dcm", pixels.astype(np.int16 if pixels.min() < 0 else np.uint16),
                       photometric, **attrs).read_bytes()
    return data, window


@pytest.mark.parametrize("case", list(CASES))
def test_dicom_levels_by_value_equal_the_per_pixel_chain(case, tmp_path, monkeypatch):
    data, window = _case_file(case, tmp_path)
    expected = _per_pixel(data, window)
    calls = []
    real = levels._map_by_value
    monkeypatch.setattr(levels, "_map_by_value", lambda *a: calls.append(1) or real(*a))
    got = np.asarray(decode_bytes(data, "x.dcm", window=window).image)
    assert calls, "the lookup was not used: the comparison would prove nothing"
    assert got.dtype == np.uint8 and np.array_equal(got, expected)


def test_the_per_pixel_path_reads_the_file_in_place_too(tmp_path, monkeypatch):
    """Where no lookup is made, pydicom's LUTs get the read-only view of the file's bytes: same levels."""
    monkeypatch.setattr(levels, "MAX_TABLE", 0)
    for case in CASES:
        data, window = _case_file(case, tmp_path)
        assert np.array_equal(np.asarray(decode_bytes(data, "x.dcm", window=window).image),
                              _per_pixel(data, window)), case


@pytest.mark.parametrize(("values", "stored", "clean"), [
    (np.array([0, 4095], np.uint16), 12, True), (np.array([0, 4096], np.uint16), 12, False),
    (np.array([-2048, 2047], np.int16), 12, True), (np.array([-2049, 0], np.int16), 12, False),
    (np.array([0, 2048], np.int16), 12, False), (np.array([0, 65535], np.uint16), 16, True),
])
def test_unused_bits_are_clean_only_when_the_correction_would_change_nothing(values, stored, clean):
    from pydicom.pixels.decoders.base import _correct_unused_bits

    class Runner:  # what pydicom's correction reads of its runner
        bits_allocated, bits_stored = 16, stored

        @staticmethod
        def get_option(name, default=None):
            return default

    assert unused_bits_clean(values, stored, 16) is clean
    assert np.array_equal(_correct_unused_bits(values.copy(), Runner), values) is clean


def test_a_map_that_turns_is_scaled_over_the_values_the_image_holds():
    """Values the image does not hold may map beyond its own min..max: they must not set the scale."""
    arr = np.tile(np.array([10, 20, 30], dtype=np.uint16), 400).reshape(40, 30)
    def turns(v):
        return np.where(v == 15, 1e6, v.astype(np.float64))  # 15 is not in the image
    assert np.array_equal(map_to_uint8(arr, turns), scale_to_uint8(turns(arr)))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_sixteen_bit_raster_images_scale_as_before(dtype):
    pixels = _film(lo=0, hi=60000).astype(dtype) if dtype == np.uint16 else _film(lo=-5000, hi=9000).astype(dtype)
    im = Image.fromarray(pixels.astype(np.uint16)) if dtype == np.uint16 else Image.fromarray(pixels, mode="I")
    buf = io.BytesIO()
    im.save(buf, format="PNG" if dtype == np.uint16 else "TIFF")
    got = np.asarray(decode_bytes(buf.getvalue(), "x.png" if dtype == np.uint16 else "x.tif").image)
    assert np.array_equal(got, scale_to_uint8(np.asarray(im, dtype=np.float64)))


def test_wide_or_float_images_take_the_per_pixel_path(monkeypatch):
    monkeypatch.setattr(levels, "_map_by_value", lambda *a: pytest.fail("looked up"))
    wide = np.arange(64 * 64, dtype=np.int32).reshape(64, 64) * 1000  # range far beyond its pixel count
    assert np.array_equal(map_to_uint8(wide), scale_to_uint8(wide))
    floats = np.linspace(-3, 7, 4096).reshape(64, 64)
    assert np.array_equal(map_to_uint8(floats), scale_to_uint8(floats))


def test_overlay_bits_above_bits_stored_are_masked_as_pydicom_masks_them(tmp_path):
    """Bits above Bits Stored (old overlays) must not reach the grey levels: the file decodes as its clean twin."""
    film = _film().astype(np.uint16)
    dirty = film.copy()
    dirty[40:90, 30:120] |= 1 << 14  # an overlay in an unused bit
    attrs = {"WindowCenter": 2000, "WindowWidth": 2500}
    clean = decode_bytes(write_dicom(tmp_path / "clean.dcm", film, **attrs).read_bytes(), "c.dcm")
    data = write_dicom(tmp_path / "dirty.dcm", dirty, **attrs).read_bytes()
    assert np.array_equal(np.asarray(decode_bytes(data, "d.dcm").image), np.asarray(clean.image))
    assert np.array_equal(np.asarray(decode_bytes(data, "d.dcm").image), _per_pixel(data))


def test_signed_values_not_sign_extended_decode_as_pydicom_corrects_them(tmp_path):
    values = _film(lo=-1000, hi=1500).astype(np.int16)
    attrs = {"PixelRepresentation": 1, "WindowCenter": 200, "WindowWidth": 2000}
    extended = write_dicom(tmp_path / "ext.dcm", values.view(np.uint16), **attrs).read_bytes()
    packed = write_dicom(tmp_path / "packed.dcm", values.view(np.uint16) & 0x0FFF, **attrs).read_bytes()
    want = np.asarray(decode_bytes(extended, "e.dcm").image)
    assert np.array_equal(want, _per_pixel(extended))
    assert np.array_equal(np.asarray(decode_bytes(packed, "p.dcm").image), want)


def test_a_clean_film_is_read_in_place_and_only_its_first_frame_decoded(tmp_path, monkeypatch):
    """No copy and no unused-bits pass where the bits are already clean; one frame of a multi-frame file."""
    import pydicom.pixels
    from pydicom.pixels.decoders import base

    frames = np.stack([_film(seed=s) for s in range(3)]).astype(np.uint16)
    data = write_dicom(tmp_path / "mf.dcm", frames).read_bytes()
    want = _per_pixel(write_dicom(tmp_path / "one.dcm", frames[0]).read_bytes())
    monkeypatch.setattr(base, "_correct_unused_bits", lambda *a, **k: pytest.fail("corrected a clean film"))
    decoded_shapes = []
    real = pydicom.pixels.pixel_array
    monkeypatch.setattr(pydicom.pixels, "pixel_array",
                        lambda *a, **k: decoded_shapes.append(real(*a, **k).shape) or real(*a, **k))
    assert np.array_equal(np.asarray(decode_bytes(data, "mf.dcm").image), want)
    assert decoded_shapes == [frames.shape[1:]]
