"""Decode one medical image (PNG/JPEG/TIFF/BMP/GIF/WebP or DICOM) into display-ready pixels.

Every entry point of RadLens -- the indexer, the CLI, the web upload, training -- reads images
through `decode_bytes` / `load_image`, so preprocessing never drifts between them. Anything that
is not a readable image raises `ImageDecodeError` with a one-line reason.

The result is 8-bit: mode ``L`` for grayscale sources (most radiographs, CT, MRI) and ``RGB``
for colour ones. Grayscale is kept as one channel because it is three times cheaper to resize;
`DecodedImage.rgb()` gives the RGB view a model expects.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxrmodel.errors import DataError, ImageDecodeError, ImageTooLargeError, UnsupportedImageError

DICOM_MAGIC_OFFSET = 128
DICOM_EXTENSIONS = (".dcm", ".dicom")
RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
IMAGE_EXTENSIONS = RASTER_EXTENSIONS + DICOM_EXTENSIONS

# The only DICOM attributes RadLens ever reads into metadata. Everything else -- patient name,
# birth date, accession number, institution, free-text descriptions -- is never copied anywhere.
# PatientID and StudyDate are read only to be stored as a keyed pseudonym and a per-patient shifted day
# (indexer.pseudonyms), for listing prior studies; PatientAge is kept as a 10-year band.
DICOM_METADATA_TAGS = {
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "view": "ViewPosition",
    "age": "PatientAge",
    "sex": "PatientSex",
    "study_date": "StudyDate",
    "patient_key": "PatientID",
}


PILLOW_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS's default: one limit for raster and DICOM alike


@dataclass(frozen=True)
class ImageLimits:
    """Bounds that protect a process against hostile or absurd inputs."""

    max_pixels: int = field(default=PILLOW_MAX_PIXELS, metadata={
        "help": "Largest width*height*frames decoded, checked from the header before decoding. The default is "
                "Pillow's own (89,478,485); raster images beyond twice that are refused by Pillow whatever this "
                "says."})
    max_bytes: int = field(default=512 * 1024 * 1024, metadata={"help": "Largest encoded file accepted."})
    max_side: int | None = field(default=None, metadata={
        "help": "Reduce larger images to about this many pixels on the long side as they are decoded (JPEG "
                "decodes reduced); None keeps full resolution. Uploads use it: labels and search need 224 px."})


@dataclass
class DecodedImage:
    """Pixels ready for a model or a thumbnail, and the non-identifying metadata of the file."""

    image: Image.Image
    format: str
    metadata: dict[str, str] = field(default_factory=dict)
    plausibility: object = field(default=None, init=False, repr=False, compare=False)  # set by assess_image

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    def rgb(self) -> Image.Image:
        """The image as 8-bit RGB."""
        return self.image if self.image.mode == "RGB" else self.image.convert("RGB")


def looks_like_dicom(data: bytes) -> bool:
    """True when the bytes carry the DICOM Part 10 preamble marker."""
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def is_image_path(path: Path) -> bool:
    """True when a file name has an extension RadLens reads."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


# Display windows (centre, width) for viewing CT in Hounsfield units; "file" is the file's own window and
# "full" the whole stored range. Data: the image page offers them for DICOM images.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}
HU_MODALITIES = {"CT"}


def load_image(path: str | Path, limits: ImageLimits = ImageLimits(), window: str | None = None) -> DecodedImage:
    """Read and decode an image file; raises `ImageDecodeError` when it is not a readable image. `window`
    (DICOM only): a `WINDOW_PRESETS` name, "file" (the file's own, the default) or "full" (min to max)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageTooLargeError(f"{path.name}: file is {size} bytes, over the {limits.max_bytes}-byte limit")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{path.name}: cannot read file ({exc.strerror or exc})") from None
    return decode_bytes(data, name=path.name, limits=limits, window=window)


def decode_bytes(data: bytes, name: str = "image", limits: ImageLimits = ImageLimits(),
                 window: str | None = None) -> DecodedImage:
    """Decode image bytes (raster or DICOM) into a `DecodedImage`."""
    if not data:
        raise ImageDecodeError(f"{name}: file is empty")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"{name}: {len(data)} bytes, over the {limits.max_bytes}-byte limit")
    if looks_like_dicom(data) or name.lower().endswith(DICOM_EXTENSIONS):
        return _decode_dicom(data, name, limits, window)
    if window not in (None, "file"):
        raise DataError(f"{name}: display windows apply to DICOM images only")
    return _decode_raster(data, name, limits)


def _decode_raster(data: bytes, name: str, limits: ImageLimits) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            # `_check_pixels` applies `limits.max_pixels`; Pillow's warning would apply its own number instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or "unknown"
            _check_pixels(im.width * im.height * getattr(im, "n_frames", 1), name, limits)
            im.seek(0)
            if limits.max_side and fmt == "JPEG":
                im.draft(im.mode, (limits.max_side, limits.max_side))  # DCT scaling: decode 1/2 .. 1/8 size
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # a returned copy would double a large image's memory
            im = reduce_to(im, limits.max_side)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own check fired first (at open, for images over twice its limit): say it in plain words
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageTooLargeError(f"{name}: {count}, over the {limits.max_pixels:,}-pixel limit") from None
    except UnidentifiedImageError:
        raise UnsupportedImageError(f"{name}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, struct.error) as exc:
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({exc})") from None
    return DecodedImage(image=_to_display_mode(im), format=fmt)


def reduce_to(im: Image.Image, max_side: int | None) -> Image.Image:
    """`im` shrunk by a whole factor (box filter) while its long side stays at least `max_side`."""
    if not max_side or max(im.size) < 2 * max_side:
        return im
    return im.reduce(max(im.size) // max_side)


def shrink_to_fit(im: Image.Image, box: int) -> Image.Image:
    """A copy of `im` at most `box` pixels on its long side (never enlarged), resized straight from the
    original: no full-size copy first (for a 9000 x 9000 image that copy alone is 80-250 MB)."""
    scale = min(1.0, box / max(im.size))
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def _check_pixels(count: int, name: str, limits: ImageLimits) -> None:
    if count > limits.max_pixels:
        raise ImageTooLargeError(f"{name}: {count:,} pixels, over the {limits.max_pixels:,}-pixel limit")


def _to_display_mode(im: Image.Image) -> Image.Image:
    """Bring any PIL mode to 8-bit ``L`` or ``RGB``."""
    if im.mode in ("L", "RGB"):
        return im
    if im.mode in ("1",):
        return im.convert("L")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(scale_to_uint8(np.asarray(im, dtype=np.float64)), mode="L")
    if im.mode in ("LA", "La"):
        return _flatten_alpha(im.convert("RGBA")).convert("L")
    if im.mode in ("RGBA", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info):
        return _flatten_alpha(im.convert("RGBA"))
    return im.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    """Composite on black: radiographs are dark where nothing was imaged."""
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def scale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Linearly map an array's min..max onto 0..255 (a flat array becomes all zeros)."""
    pixels = np.asarray(pixels, dtype=np.float64)
    lo, hi = float(np.min(pixels)), float(np.max(pixels))
    if not np.isfinite(lo) or not np.isfinite(hi):
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(np.min(pixels)), float(np.max(pixels))
    if hi <= lo:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _decode_dicom(data: bytes, name: str, limits: ImageLimits, window: str | None = None) -> DecodedImage:
    if window not in (None, "file", "full", *WINDOW_PRESETS):
        raise DataError(f"unknown window {window!r}: use file, full or {', '.join(WINDOW_PRESETS)}")
    try:
        return _read_dicom(data, name, limits, window)
    except (ImageDecodeError, DataError):
        raise
    except Exception as exc:  # pydicom raises many types on malformed files; all mean "unreadable"
        raise ImageDecodeError(f"{name}: not a readable DICOM file ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def _read_dicom(data: bytes, name: str, limits: ImageLimits, window: str | None = None) -> DecodedImage:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=not looks_like_dicom(data))
    if "PixelData" not in ds:
        raise ImageDecodeError(f"{name}: DICOM file has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise ImageDecodeError(f"{name}: DICOM file lacks valid Rows/Columns") from None
    _check_pixels(rows * cols * max(frames, 1), name, limits)
    if window in WINDOW_PRESETS and str(getattr(ds, "Modality", "")).upper() not in HU_MODALITIES:
        raise DataError(f"{name}: the {window} window is in Hounsfield units (CT); this image is "
                                    f"{getattr(ds, 'Modality', 'not CT')}: use file or full")
    pixels = _dicom_display_pixels(ds, frames, window)
    if pixels.ndim not in (2, 3) or 0 in pixels.shape:
        raise ImageDecodeError(f"{name}: DICOM pixel data has an unusable shape {pixels.shape}")
    mode = "RGB" if pixels.ndim == 3 else "L"
    image = reduce_to(Image.fromarray(pixels, mode=mode), limits.max_side)
    return DecodedImage(image=image, format="DICOM", metadata=dicom_metadata(ds))


def _dicom_display_pixels(ds, frames: int, window: str | None = None) -> np.ndarray:
    """Modality LUT (rescale), VOI LUT (the file's window, a preset, or the full range), MONOCHROME1
    inversion, first frame -> uint8."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = ds.pixel_array
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if samples == 3:
        if arr.dtype != np.uint8:
            arr = scale_to_uint8(arr)
        return np.ascontiguousarray(arr)
    arr = apply_modality_lut(arr, ds)
    if window in WINDOW_PRESETS:  # linear window on the modality values (Hounsfield units for CT)
        centre, width = WINDOW_PRESETS[window]
        arr = np.clip((np.asarray(arr, dtype=np.float64) - (centre - width / 2)) / width, 0.0, 1.0) * 255.0
        out = arr.astype(np.uint8)
        return 255 - out if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1" else out
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if window != "full" and (has_window or "VOILUTSequence" in ds):
        arr = apply_voi_lut(arr, ds, index=0)
    out = scale_to_uint8(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 255 - out
    return out


def header_metadata(data: bytes, name: str = "image") -> dict[str, str]:
    """The whitelisted metadata of a file without decoding its pixels: a DICOM header's, {} for a
    raster image or a header that cannot be read."""
    if not (looks_like_dicom(data) or name.lower().endswith(DICOM_EXTENSIONS)):
        return {}
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not looks_like_dicom(data), stop_before_pixels=True)
        return dicom_metadata(ds)
    except Exception:  # noqa: BLE001 -- a header pydicom cannot parse simply has no metadata
        return {}


def dicom_metadata(ds) -> dict[str, str]:
    """The whitelisted DICOM attributes (modality, body part, view, age, sex, study date, and the patient
    key that the indexer keeps only as a keyed pseudonym)."""
    out = {}
    for key, keyword in DICOM_METADATA_TAGS.items():
        value = getattr(ds, keyword, None)
        if value not in (None, ""):
            out[key] = str(value).strip()
    return out
