"""Image input: every raster mode, DICOM display pipeline, and the one clear error type."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxrmodel.errors import ImageDecodeError
from cxrmodel.imaging.decode import ImageLimits, decode_bytes, file_facts, load_image
from tests.imagegen import gray_image, png_bytes, write_dicom


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("RGB", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"),
                                      ("LA", "PNG"), ("CMYK", "JPEG"), ("RGB", "TIFF"), ("RGB", "BMP"),
                                      ("1", "PNG"), ("I;16", "PNG"), ("I;16", "TIFF"), ("F", "TIFF")])
def test_raster_modes_decode_to_8bit_gray_or_rgb(mode, fmt):
    base = Image.fromarray(np.linspace(0, 255, 40 * 30).reshape(30, 40).astype(np.uint8)).convert("RGB")
    if mode == "I;16":
        im = Image.fromarray((np.linspace(0, 4095, 40 * 30).reshape(30, 40)).astype(np.uint16))
    elif mode == "F":
        im = Image.fromarray(np.linspace(-5, 5, 40 * 30).reshape(30, 40).astype(np.float32))
    else:
        im = base.convert(mode)
    decoded = decode_bytes(_encode(im, fmt), name=f"x.{fmt.lower()}")
    assert decoded.image.mode in ("L", "RGB")
    assert (decoded.width, decoded.height) == (40, 30)
    assert decoded.rgb().mode == "RGB"
    arr = np.asarray(decoded.image)
    assert arr.dtype == np.uint8 and arr.max() > arr.min()  # content survived, full range used


def test_16bit_png_is_scaled_min_to_max():
    im = Image.fromarray(np.array([[1000, 2000], [3000, 4000]], dtype=np.uint16))
    arr = np.asarray(decode_bytes(png_bytes(im)).image)
    assert arr.min() == 0 and arr.max() == 255 and arr[0, 1] == 85


def test_alpha_is_flattened_on_black():
    im = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    arr = np.asarray(decode_bytes(png_bytes(im)).image)
    assert arr.max() == 0


def test_truncated_png_gives_clear_error():
    data = png_bytes(gray_image(1, (64, 64)))
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_bytes(data[: len(data) // 2], name="cut.png")


def test_text_renamed_png_gives_clear_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("patient notes, definitely not pixels")
    with pytest.raises(ImageDecodeError, match="notes.png: not a recognised image"):
        load_image(path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageDecodeError, match="cannot read"):
        load_image(tmp_path / "absent.png")


def test_pixel_limit_stops_decompression_bombs():
    data = png_bytes(Image.new("L", (2000, 2000)))
    with pytest.raises(ImageDecodeError, match="pixel limit"):
        decode_bytes(data, limits=ImageLimits(max_pixels=1_000_000))


def _multipage_tiff(pages: np.ndarray) -> bytes:
    images = [Image.fromarray(page) for page in pages]
    buf = io.BytesIO()
    images[0].save(buf, format="TIFF", save_all=True, append_images=images[1:])
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dicom", "dicom-jpeg-lossless", "tiff"])
def test_a_multiframe_file_is_bounded_by_the_frame_it_decodes(kind, tmp_path):
    """Only the first frame of a tomosynthesis, cine or multi-page file is ever decoded, so the pixel limit
    counts one frame: 4 frames of 300 x 200 pass a 100,000-pixel limit, one frame of 400 x 300 does not."""
    from cxrmodel.errors import ImageTooLargeError
    from tests.imagegen import transcode_dicom

    frames = np.random.default_rng(0).integers(0, 4096, (4, 200, 300)).astype(np.uint16)
    big = np.zeros((300, 400), np.uint16)
    if kind == "tiff":
        frames, big = (frames >> 4).astype(np.uint8), big.astype(np.uint8)
        data, first, single = _multipage_tiff(frames), _multipage_tiff(frames[:1]), _multipage_tiff(big[None])
    else:
        data, first, single = (write_dicom(tmp_path / f"{name}.dcm", pixels).read_bytes()
                               for name, pixels in (("mf", frames), ("first", frames[0]), ("big", big)))
        if kind == "dicom-jpeg-lossless":
            data = transcode_dicom(tmp_path / "mf.dcm", tmp_path / "mfj.dcm", "JPEGLosslessProcess14_1").read_bytes()
    limits = ImageLimits(max_pixels=100_000)
    decoded = decode_bytes(data, "mf", limits=limits)
    assert decoded.image.size == (300, 200) and decoded.frames == 4 and decode_bytes(first, "first").frames == 1
    (tmp_path / "mf.file").write_bytes(data)
    assert file_facts(tmp_path / "mf.file") == {"frames": 4} and file_facts(tmp_path / "absent.dcm") == {}
    assert np.array_equal(np.asarray(decoded.image), np.asarray(decode_bytes(first, "first").image))
    with pytest.raises(ImageTooLargeError, match="120,000 pixels, over the 100,000-pixel limit"):
        decode_bytes(single, "big", limits=limits)


@pytest.mark.parametrize("mode", ["I;16", "P", "1", "L"])
def test_a_large_upload_in_any_mode_is_shrunk_for_display(mode):
    """Pillow's `reduce` refuses 16-bit, palette and 1-bit images: they are brought to 8 bits before an upload is
    shrunk for display (a 16-bit PNG over twice the upload side used to be refused as "corrupt")."""
    film = np.asarray(gray_image(9, (1001, 777)))
    image = Image.fromarray(film.astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(film).convert(mode)
    assert image.mode == mode
    shown = decode_bytes(png_bytes(image), "big.png", limits=ImageLimits(max_side=300))
    assert shown.image.size == (334, 259) and shown.file_size == (1001, 777) and shown.image.mode in ("L", "RGB")


def test_byte_limit():
    with pytest.raises(ImageDecodeError, match="byte limit"):
        decode_bytes(b"x" * 2000, limits=ImageLimits(max_bytes=1000))


def test_dicom_monochrome1_is_inverted(tmp_path):
    ramp = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1))  # dark -> bright left to right
    mono2 = decode_bytes(write_dicom(tmp_path / "m2.dcm", ramp).read_bytes())
    mono1 = decode_bytes(write_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1").read_bytes())
    a2, a1 = np.asarray(mono2.image, dtype=int), np.asarray(mono1.image, dtype=int)
    assert mono1.format == "DICOM" and mono1.image.mode == "L"
    assert a2[0, 0] == 0 and a2[0, -1] == 255
    assert np.array_equal(a1, 255 - a2)


def test_dicom_window_and_rescale(tmp_path):
    pixels = np.array([[0, 1000], [2000, 3000]], dtype=np.uint16)
    path = write_dicom(tmp_path / "w.dcm", pixels, RescaleSlope=1, RescaleIntercept=-1000,
                       WindowCenter=500, WindowWidth=1000)  # HU -1000..2000, window 0..1000
    arr = np.asarray(decode_bytes(path.read_bytes()).image, dtype=int)
    assert arr[0, 0] == 0 and arr[0, 1] == 0  # below the window
    assert arr[1, 0] == 255 and arr[1, 1] == 255  # above it


def test_dicom_multiframe_takes_first_frame(tmp_path):
    frames = np.stack([np.full((6, 6), 100, np.uint16), np.full((6, 6), 4000, np.uint16)])
    frames[0, 0, 0] = 4000  # so the first frame is not flat
    decoded = decode_bytes(write_dicom(tmp_path / "mf.dcm", frames).read_bytes())
    arr = np.asarray(decoded.image)
    assert arr.shape == (6, 6) and arr[0, 0] == 255 and arr[1, 1] == 0


@pytest.mark.parametrize("entry_bits,nominal_bits", [(16, 16), (8, 8), (16, 8)])
def test_a_palette_colour_dicom_is_shown_in_its_colours(entry_bits, nominal_bits, tmp_path):
    """Ultrasound and nuclear-medicine files often store indices into red, green and blue tables: the image is
    those colours, not the indices as grey levels; 8-bit entries padded into 16 bits read as 8-bit."""
    from tests.imagegen import write_palette_dicom

    colours = [(0, 0, 0), (255, 0, 0), (0, 200, 0), (30, 60, 250)]
    indices = np.arange(24).reshape(4, 6) % 4
    path = write_palette_dicom(tmp_path / "p.dcm", indices, colours, entry_bits, nominal_bits)
    decoded = decode_bytes(path.read_bytes(), "p.dcm")
    assert decoded.image.mode == "RGB" and decoded.image.size == (6, 4)
    assert np.array_equal(np.asarray(decoded.image), np.array(colours, np.uint8)[indices])


def test_an_enhanced_multiframe_files_levels_come_from_its_functional_groups(tmp_path):
    """Enhanced CT/MR and tomosynthesis files keep rescale and window in functional groups, per frame or shared:
    the first frame's are applied (per-frame over shared) as a classic file's top-level ones, presets in HU too."""
    from pydicom.dataset import Dataset

    def item(**attrs) -> Dataset:
        ds = Dataset()
        for key, value in attrs.items():
            setattr(ds, key, value)
        return ds

    frames = np.random.default_rng(3).integers(0, 2000, (2, 16, 16)).astype(np.uint16)
    classic = write_dicom(tmp_path / "classic.dcm", frames[0], Modality="CT", RescaleSlope=1, RescaleIntercept=-1024,
                          WindowCenter=40, WindowWidth=400)
    shared = item(PixelValueTransformationSequence=[item(RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU")],
                  FrameVOILUTSequence=[item(WindowCenter=300, WindowWidth=1000)])
    per_frame = [item(FrameVOILUTSequence=[item(WindowCenter=40, WindowWidth=400)]),
                 item(FrameVOILUTSequence=[item(WindowCenter=900, WindowWidth=50)])]
    enhanced = write_dicom(tmp_path / "enhanced.dcm", frames, Modality="CT", SharedFunctionalGroupsSequence=[shared],
                           PerFrameFunctionalGroupsSequence=per_frame)
    for window in (None, "lung", "full"):
        want = np.asarray(decode_bytes(classic.read_bytes(), "c.dcm", window=window).image)
        got = np.asarray(decode_bytes(enhanced.read_bytes(), "e.dcm", window=window).image)
        assert np.array_equal(got, want), window


def test_dicom_rgb(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200
    decoded = decode_bytes(write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB").read_bytes())
    assert decoded.image.mode == "RGB" and np.asarray(decoded.image)[0, 0, 0] == 200


def test_dicom_metadata_is_whitelisted(tmp_path):
    path = write_dicom(tmp_path / "p.dcm", np.ones((4, 4), np.uint16), Modality="DX", BodyPartExamined="CHEST",
                       ViewPosition="PA")
    meta = decode_bytes(path.read_bytes()).metadata
    # patient_key is read only so the indexer can store its salted hash (see test_priors)
    assert meta == {"modality": "DX", "body_part": "CHEST", "view": "PA", "patient_key": "PHI-123456"}
    assert "DOE" not in repr(meta) and "19700101" not in repr(meta)


def test_dicom_without_extension_or_preamble_marker(tmp_path):
    path = write_dicom(tmp_path / "noext", np.ones((4, 4), np.uint16))
    assert decode_bytes(path.read_bytes(), name="noext").format == "DICOM"


def test_corrupt_dicom_gives_clear_error(tmp_path):
    data = write_dicom(tmp_path / "x.dcm", np.ones((64, 64), np.uint16)).read_bytes()
    with pytest.raises(ImageDecodeError):
        decode_bytes(data[:400], name="x.dcm")
    with pytest.raises(ImageDecodeError):
        decode_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10, name="y.dcm")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_max_side_reduces_large_images_as_they_are_decoded(fmt):
    """Uploads are reduced to a working size (the model needs 224 px); small images are left alone."""
    big = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (1500, 20))[:, :5000], "L")  # 5000 x 1500
    buf = io.BytesIO()
    big.save(buf, format=fmt)
    reduced = decode_bytes(buf.getvalue(), "big", ImageLimits(max_side=1000)).image
    assert 1000 <= max(reduced.size) < 2000 and reduced.width / reduced.height == pytest.approx(5000 / 1500, rel=0.02)
    assert decode_bytes(buf.getvalue(), "big").image.size == (5000, 1500)  # indexing keeps full resolution
    small = decode_bytes(png_bytes(gray_image(1)), "small", ImageLimits(max_side=1000)).image
    assert small.size == gray_image(1).size


def test_dicom_display_windows_render_from_the_stored_values(tmp_path):
    """A CT in Hounsfield units: air, lung, soft tissue and bone columns; each preset window shows what it
    is for, computed from the stored values (rescale applied), not from the 8-bit default rendering."""
    from cxrmodel.errors import DataError
    from cxrmodel.imaging.decode import load_image
    from tests.imagegen import write_dicom

    hu = np.repeat(np.array([[-1000, -700, 40, 1000]], dtype=np.int16), 16, axis=0).repeat(16, axis=1)
    stored = (hu + 1024).astype(np.uint16)  # RescaleIntercept -1024, as scanners write it
    path = write_dicom(tmp_path / "ct.dcm", stored, Modality="CT", RescaleIntercept=-1024, RescaleSlope=1,
                       WindowCenter=40, WindowWidth=400)
    columns = {w: np.asarray(load_image(path, window=w).image)[0, ::16] for w in ("lung", "mediastinum", "bone",
                                                                                  "file", "full")}
    assert columns["lung"][1] > columns["lung"][0] and 0 < columns["lung"][1] < 255  # lung visible, not clipped
    assert columns["mediastinum"][1] == 0 and 0 < columns["mediastinum"][2] < 255  # lung black, tissue grey
    assert columns["bone"][2] < columns["bone"][3] < 255
    assert list(columns["file"]) == list(np.asarray(load_image(path).image)[0, ::16])  # the file's own, the default
    assert columns["full"][0] == 0 and columns["full"][3] == 255
    cr = write_dicom(tmp_path / "cr.dcm", stored, Modality="CR")
    with pytest.raises(DataError, match="Hounsfield units"):
        load_image(cr, window="lung")
    with pytest.raises(DataError, match="unknown window"):
        load_image(path, window="liver")
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(DataError, match="DICOM images only"):
        load_image(tmp_path / "x.png", window="lung")
