"""Decode one medical image (PNG/JPEG/TIFF/BMP/GIF/WebP or DICOM) into display-ready pixels.

Every entry point of RadLens -- the indexer, the CLI, the web upload, training -- reads images
through `decode_bytes` / `load_image`, so preprocessing never drifts between them. Anything that
is not a readable image raises `ImageDecodeError` with a one-line reason. What a model is given is one
decode too: `decode_bytes(..., model_side=...)` where only a model needs the pixels (indexing, training,
calibration), `DecodedImage.for_model` where the same file is also shown (uploads, an indexed image's
labels); a JPEG then decodes at the reduced DCT scale the model needs.

The result is 8-bit: mode ``L`` for grayscale sources (most radiographs, CT, MRI) and ``RGB``
for colour ones. Grayscale is kept as one channel because it is three times cheaper to resize;
`DecodedImage.rgb()` gives the RGB view a model expects.
"""

from __future__ import annotations

import io
import re
import struct
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxrmodel.errors import DataError, ImageDecodeError, ImageTooLargeError, UnsupportedImageError
from cxrmodel.imaging.compression import dicom_compression, raster_compression
from cxrmodel.imaging.levels import map_to_uint8, scale_to_uint8

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


EXIF_ORIENTATION = 0x0112
ROTATED_BY_90 = (5, 6, 7, 8)  # EXIF orientations shown with width and height swapped
PILLOW_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS's default: one limit for raster and DICOM alike


@dataclass(frozen=True)
class ImageLimits:
    """Bounds that protect a process against hostile or absurd inputs."""

    max_pixels: int = field(default=PILLOW_MAX_PIXELS, metadata={
        "help": "Largest width*height decoded, checked from the header before decoding; of a multi-frame file "
                "only the first frame is decoded. The default is Pillow's own (89,478,485); raster images beyond "
                "twice that are refused by Pillow whatever this says."})
    max_bytes: int = field(default=512 * 1024 * 1024, metadata={"help": "Largest encoded file accepted."})
    max_side: int | None = field(default=None, metadata={
        "help": "Reduce larger images to about this many pixels on the long side as they are decoded (JPEG "
                "decodes reduced); None keeps full resolution. Uploads use it for what is shown; a model is "
                "given its own view of the file (`DecodedImage.for_model`)."})


@dataclass
class DecodedImage:
    """Pixels ready for a model or a thumbnail, and the non-identifying metadata of the file."""

    image: Image.Image
    format: str
    metadata: dict[str, str] = field(default_factory=dict)
    source_size: tuple[int, int] | None = None  # (width, height) in the file, when `image` was decoded reduced
    reduced_by: int = 1  # `image` is this many times smaller than the file (a JPEG's DCT scale, a whole-factor
    # reduction); its last column and row, rounded up, then stand for fewer of the file's pixels than the rest
    model_side: int | None = None  # `image` was decoded for a model alone (`decode_bytes`'s `model_side`)
    frames: int = 1  # frames (pages) in the file; only the first is ever decoded, shown and embedded
    encoded: bytes | None = field(default=None, repr=False, compare=False)  # a JPEG's bytes, for `for_model`
    plausibility: object = field(default=None, init=False, repr=False, compare=False)  # set by assess_image
    _model_views: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # by decode side
    _model_inputs: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # by preprocess

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def file_size(self) -> tuple[int, int]:
        """(width, height) of the image as stored in the file (as shown), whatever size it was decoded at."""
        return self.source_size or self.image.size

    def for_model(self, side: int) -> DecodedImage:
        """The file as a model whose `ImagePreprocess.decode_side` is `side` is given it: exactly what
        `decode_bytes(..., model_side=side)` makes of it, as `radlens index` does, so an upload or a label
        request sees what the index saw. Only a JPEG differs from this decode (it decodes reduced for a
        model); that view is decoded once per side and kept."""
        if self.encoded is None or self.model_side == side:
            return self
        if side not in self._model_views:
            full = self.source_size is None and jpeg_scale(self.file_size, side) == 1
            self._model_views[side] = self if full else _decode_raster(
                self.encoded, "image", ImageLimits(max_pixels=sys.maxsize, max_bytes=sys.maxsize), side)
        return self._model_views[side]

    def model_input(self, preprocess) -> Image.Image:
        """The model-sized image `preprocess` (an `ImagePreprocess`) makes of this file: its view for the model
        (`for_model`), resized and cropped in the geometry of the file's full size, so a reduced decode
        crops the same part of the image as a full one. Made once per preprocess and kept: an upload's
        search and its labels both ask."""
        if preprocess not in self._model_inputs:
            view = self.for_model(preprocess.decode_side)
            self._model_inputs[preprocess] = preprocess.resize(view.image, view.file_size, view.reduced_by)
        return self._model_inputs[preprocess]

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


def load_image(path: str | Path, limits: ImageLimits = ImageLimits(), window: str | None = None,
               model_side: int | None = None) -> DecodedImage:
    """Read and decode an image file; raises `ImageDecodeError` when it is not a readable image. `window`
    (DICOM only): a `WINDOW_PRESETS` name, "file" (the file's own, the default) or "full" (min to max).
    `model_side`: as for `decode_bytes`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageTooLargeError(f"{path.name}: file is {size} bytes, over the {limits.max_bytes}-byte limit")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{path.name}: cannot read file ({exc.strerror or exc})") from None
    return decode_bytes(data, name=path.name, limits=limits, window=window, model_side=model_side)


def decode_bytes(data: bytes, name: str = "image", limits: ImageLimits = ImageLimits(),
                 window: str | None = None, model_side: int | None = None,
                 model_preprocess=None) -> DecodedImage:
    """Decode image bytes (raster or DICOM) into a `DecodedImage`.

    `model_side` (an `ImagePreprocess.decode_side`): the pixels go to that model alone, so a JPEG decodes at
    the reduced DCT scale (1/2 .. 1/8) that keeps both sides at least this long -- the one model-input decode
    every path shares (`DecodedImage.for_model` gives it from a display decode); `file_size` keeps the
    file's size. Without it a JPEG keeps its bytes, so that `for_model` can decode the model's view.
    `model_preprocess` (an `ImagePreprocess`): the model an image shrunk for display (`limits.max_side`) will
    be given; its input is made from the full decode before the shrink, as `radlens index` makes it, and
    `DecodedImage.model_input` returns it (a JPEG needs none: it is decoded again at the model's scale)."""
    if not data:
        raise ImageDecodeError(f"{name}: file is empty")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"{name}: {len(data)} bytes, over the {limits.max_bytes}-byte limit")
    if looks_like_dicom(data) or name.lower().endswith(DICOM_EXTENSIONS):
        return _decode_dicom(data, name, limits, window, model_preprocess)
    if window not in (None, "file"):
        raise DataError(f"{name}: display windows apply to DICOM images only")
    return _decode_raster(data, name, limits, model_side, model_preprocess)


def _decode_raster(data: bytes, name: str, limits: ImageLimits, model_side: int | None = None,
                   model_preprocess=None) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            # `_check_pixels` applies `limits.max_pixels`; Pillow's warning would apply its own number instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or "unknown"
            _check_pixels(im.width * im.height, name, limits)  # the first frame: the only one decoded
            frames = frame_count(im)
            im.seek(0)
            stored_size, file_width, orientation = im.size, im.width, im.getexif().get(EXIF_ORIENTATION, 1)
            if orientation in ROTATED_BY_90:  # exif_transpose below swaps the sides
                stored_size = stored_size[::-1]
            drafted = None
            if model_side and fmt == "JPEG" and orientation == 1:  # (a flip or turn would move the rounded edge)
                drafted = im.draft(im.mode, (model_side, model_side))  # DCT scale 1/2 .. 1/8: sides stay >= it
            elif limits.max_side and fmt == "JPEG" and not model_side:
                drafted = im.draft(im.mode, (limits.max_side, limits.max_side))
            scale = round(file_width / drafted[1][2]) if drafted else 1  # draft's box: the file's size / scale
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # a returned copy would double a large image's memory
            im = _to_display_mode(im)  # 8-bit L or RGB before any shrink: `reduce` refuses 16-bit, palette, 1-bit
            max_side = None if model_side else limits.max_side
            inputs = _inputs_before_shrink(im, max_side, model_preprocess) if scale == 1 else {}
            im, factor = reduce_to(im, max_side)
            scale *= factor
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
    decoded = DecodedImage(image=im, format=fmt, metadata=raster_compression(fmt),
                           source_size=None if im.size == stored_size else stored_size, reduced_by=scale,
                           model_side=model_side, frames=frames,
                           encoded=data if fmt == "JPEG" and not model_side else None)
    decoded._model_inputs.update(inputs)
    return decoded


def jpeg_scale(size: tuple[int, int], side: int) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow decodes a JPEG of `size` at when both sides must stay >= `side`."""
    fits = min(size[0] // side, size[1] // side)
    return next(s for s in (8, 4, 2, 1) if fits >= s or s == 1)


def reduce_to(im: Image.Image, max_side: int | None) -> tuple[Image.Image, int]:
    """`im` shrunk by a whole factor (box filter) while its long side stays at least `max_side`, and that
    factor (1: `im` itself)."""
    factor = _shrink_factor(im.size, max_side)
    return (im.reduce(factor) if factor > 1 else im), factor


def _shrink_factor(size: tuple[int, int], max_side: int | None) -> int:
    return max(size) // max_side if max_side and max(size) >= 2 * max_side else 1


def _inputs_before_shrink(im: Image.Image, max_side: int | None, preprocess) -> dict:
    """{preprocess: its input made from `im` at full size} when `im` is about to be shrunk for display, else {}:
    what `DecodedImage.model_input` gives for the same file decoded in full (kept in its `_model_inputs`)."""
    if preprocess is None or _shrink_factor(im.size, max_side) == 1:
        return {}
    return {preprocess: preprocess.resize(im)}


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
        return Image.fromarray(map_to_uint8(np.asarray(im)), mode="L")
    if im.mode in ("LA", "La"):
        return _flatten_alpha(im.convert("RGBA")).convert("L")
    if im.mode in ("RGBA", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info):
        return _flatten_alpha(im.convert("RGBA"))
    return im.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    """Composite on black: radiographs are dark where nothing was imaged."""
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _decode_dicom(data: bytes, name: str, limits: ImageLimits, window: str | None = None,
                  model_preprocess=None) -> DecodedImage:
    if window not in (None, "file", "full", *WINDOW_PRESETS):
        raise DataError(f"unknown window {window!r}: use file, full or {', '.join(WINDOW_PRESETS)}")
    try:
        return _read_dicom(data, name, limits, window, model_preprocess)
    except (ImageDecodeError, DataError):
        raise
    except Exception as exc:  # pydicom raises many types on malformed files; all mean "unreadable"
        raise ImageDecodeError(f"{name}: not a readable DICOM file ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def _read_dicom(data: bytes, name: str, limits: ImageLimits, window: str | None = None,
                model_preprocess=None) -> DecodedImage:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=not looks_like_dicom(data))
    if "PixelData" not in ds:
        raise ImageDecodeError(f"{name}: DICOM file has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = frame_count(ds)
    except (AttributeError, TypeError, ValueError):
        raise ImageDecodeError(f"{name}: DICOM file lacks valid Rows/Columns") from None
    _check_pixels(rows * cols, name, limits)  # the first frame: the only one decoded (`stored_values`)
    if window in WINDOW_PRESETS and str(getattr(ds, "Modality", "")).upper() not in HU_MODALITIES:
        raise DataError(f"{name}: the {window} window is in Hounsfield units (CT); this image is "
                                    f"{getattr(ds, 'Modality', 'not CT')}: use file or full")
    try:
        pixels = _dicom_display_pixels(ds, frames, window)
    except (RuntimeError, NotImplementedError) as exc:  # what pydicom raises when no plugin decodes the pixels
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is None or not syntax.is_compressed:
            raise
        bits = int(getattr(ds, "BitsStored", 0) or 0)
        raise ImageDecodeError(f"{name}: {no_decoder_message(syntax, bits, exc)}") from None
    if pixels.ndim not in (2, 3) or 0 in pixels.shape:
        raise ImageDecodeError(f"{name}: DICOM pixel data has an unusable shape {pixels.shape}")
    mode = "RGB" if pixels.ndim == 3 else "L"
    image = Image.fromarray(pixels, mode=mode)
    inputs = _inputs_before_shrink(image, limits.max_side, model_preprocess)
    shown, factor = reduce_to(image, limits.max_side)
    decoded = DecodedImage(image=shown, format="DICOM", metadata=dicom_metadata(ds),
                           source_size=image.size if factor > 1 else None, reduced_by=factor, frames=frames)
    decoded._model_inputs.update(inputs)
    return decoded


def _dicom_display_pixels(ds, frames: int, window: str | None = None) -> np.ndarray:
    """Modality LUT (rescale), VOI LUT (the file's window, a preset, or the full range), MONOCHROME1
    inversion, first frame -> uint8; colour as stored, a PALETTE COLOR image through its tables."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    arr = stored_values(ds, frames, samples)
    lift_first_frame_levels(ds)
    if samples == 3:
        if arr.dtype != np.uint8:
            arr = scale_to_uint8(arr)
        return np.ascontiguousarray(arr)
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        return palette_rgb(arr, ds)
    invert = photometric == "MONOCHROME1"
    if window in WINDOW_PRESETS:  # linear window on the modality values (Hounsfield units for CT)
        centre, width = WINDOW_PRESETS[window]

        def windowed(values: np.ndarray) -> np.ndarray:
            modality = np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
            return (np.clip((modality - (centre - width / 2)) / width, 0.0, 1.0) * 255.0).astype(np.uint8)

        return map_to_uint8(arr, windowed, scale=False, invert=invert)
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    use_voi = window != "full" and (has_window or "VOILUTSequence" in ds)

    def levels(values: np.ndarray) -> np.ndarray:
        modality = apply_modality_lut(values, ds)
        return apply_voi_lut(modality, ds, index=0) if use_voi else modality

    return map_to_uint8(arr, levels, invert=invert)


# Functional groups that hold the grey-level transforms of an enhanced multi-frame file (Enhanced CT/MR/XA, breast
# tomosynthesis, ...), PS3.3 C.7.6.16: where pydicom's `apply_modality_lut` / `apply_voi_lut` do not look
FRAME_LEVEL_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def lift_first_frame_levels(ds) -> None:
    """Copy the first frame's rescale and window from an enhanced multi-frame file's functional groups (its
    per-frame group first, then the shared one) to the top level of `ds`, where pydicom's LUT functions read
    them; attributes already at the top level are kept. Without it such a CT would lose its Hounsfield
    intercept and its window."""
    groups = [getattr(ds, name, None) for name in ("PerFrameFunctionalGroupsSequence",
                                                   "SharedFunctionalGroupsSequence")]
    for group in (g[0] for g in groups if g):
        for name in FRAME_LEVEL_GROUPS:
            for item in getattr(group, name, None) or []:
                for element in item:
                    if element.tag not in ds:
                        ds[element.tag] = element


def palette_rgb(indices: np.ndarray, ds) -> np.ndarray:
    """A PALETTE COLOR image's stored indices through its red, green and blue lookup tables (pydicom's
    `apply_color_lut`: plain, segmented or a well-known palette), as 8-bit RGB. 16-bit entries keep their high
    byte; 8-bit entries stored in 16 bits (a common deviation, PS3.3 C.7.6.3.1.5) are read as 8-bit."""
    from pydicom.pixels import apply_color_lut

    rgb = apply_color_lut(indices, ds)[..., :3]  # an alpha table, where present, is not shown
    if rgb.dtype == np.uint16:
        nominal = int(ds.RedPaletteColorLookupTableDescriptor[2]) if "RedPaletteColorLookupTableDescriptor" in ds \
            else 16
        rgb = rgb >> 8 if nominal > 8 else np.minimum(rgb, 255)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


DECODERS_HINT = ("RadLens decodes compressed DICOM with imagecodecs (libjpeg-turbo, CharLS), Pillow and python-gdcm; "
                 "pylibjpeg's plugins read more (HTJ2K, colour 12-bit JPEG): pip install pylibjpeg pylibjpeg-libjpeg "
                 "pylibjpeg-openjpeg (pylibjpeg-libjpeg is GPL-3.0). Or re-export the study uncompressed (Explicit "
                 "VR Little Endian) from the PACS")


def no_decoder_message(syntax, bits_stored: int, exc: Exception) -> str:
    """What a user reads when a file's compressed pixel data is not decoded: the compression, each decoder's
    reason as pydicom gives it, and what to do (the file's name is added by the caller)."""
    reasons = "; ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip())
    what = f"{syntax.name}{f', {bits_stored}-bit' if bits_stored else ''}"
    why = f" ({reasons})" if reasons else ""
    if "missing dependencies" in str(exc):
        return f"its pixel data is compressed as {what}, which no installed decoder reads{why}. {DECODERS_HINT}"
    return (f"its pixel data, compressed as {what}, could not be decoded{why}: the file may be damaged. If it "
            f"opens elsewhere: {DECODERS_HINT}")


def stored_values(ds, frames: int = 1, samples: int = 1) -> np.ndarray:
    """The first frame's stored values exactly as pydicom's `pixel_array` gives them, decoding only that frame.

    For a grey image pydicom is asked for a read-only view of the file's bytes without its unused-bits
    correction (a copy of every pixel and two shifts). The correction is run only where the bits above Bits
    Stored are not already what it would make them, which a min and max tell: the same values, bit for bit, at
    half the decode time of a 3000 x 2500 film (`python -m bench.dicom_decode`). A compressed grey frame goes
    to `dicom_codecs`'s plugin first where it decodes the syntax, then to pydicom's own plugins."""
    from pydicom.pixels import pixel_array

    from cxrmodel.imaging.dicom_codecs import preferred_plugin

    index = 0 if frames > 1 else None
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")
    plugin = preferred_plugin(syntax, samples)

    def decoded(**options) -> np.ndarray:
        if plugin:
            try:
                return pixel_array(ds, index=index, decoding_plugin=plugin, **options)
            except Exception:  # noqa: BLE001 -- pydicom's own plugins get their turn, and report their reasons
                pass
        return pixel_array(ds, index=index, **options)

    if samples != 1:
        return decoded()
    arr = decoded(view_only=True, correct_unused_bits=False)
    if not unused_bits_clean(arr, int(ds.BitsStored), int(ds.BitsAllocated)):
        return decoded()
    return arr


def unused_bits_clean(arr: np.ndarray, bits_stored: int, bits_allocated: int) -> bool:
    """Whether pydicom's unused-bits correction would leave `arr` as it is: every value already fits in
    Bits Stored (unsigned), or is already sign-extended from it (signed)."""
    if bits_stored >= bits_allocated or arr.dtype.kind not in "iu" or arr.size == 0:
        return True
    if arr.dtype.kind == "u":
        return int(arr.max()) < 1 << bits_stored
    half = 1 << (bits_stored - 1)
    return -half <= int(arr.min()) and int(arr.max()) < half


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


def frame_count(source) -> int:
    """Frames (pages) in an opened Pillow image or a pydicom dataset, at least 1 (ValueError when a DICOM's
    Number of Frames is not a number)."""
    value = getattr(source, "n_frames", 1) if isinstance(source, Image.Image) else getattr(source, "NumberOfFrames", 1)
    return max(1, int(value or 1))


FACT_TAGS = ("NumberOfFrames", "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod")


def dataset_facts(ds) -> dict:
    """`file_facts` of a DICOM header (a pydicom Dataset, from a file or an archive's metadata)."""
    frames = frame_count(ds)
    return {**({"frames": frames} if frames > 1 else {}), **dicom_compression(ds)}


def file_facts(path: str | Path) -> dict:
    """What a report says of a file beyond its pixels, read from its header alone: {"frames": N} when it holds
    N > 1 frames (only the first is ever decoded) and {"lossy": ..., "lossy_ratio": ...} when its pixels are
    known to have been compressed with loss; {} when neither, or when the header cannot be read."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(DICOM_MAGIC_OFFSET + 4)
        if looks_like_dicom(head) or path.suffix.lower() in DICOM_EXTENSIONS:
            import pydicom

            return dataset_facts(pydicom.dcmread(path, force=True, stop_before_pixels=True,
                                                 specific_tags=list(FACT_TAGS)))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    frames, facts = frame_count(im), raster_compression(im.format or "")
    except Exception:  # noqa: BLE001 -- an unreadable header tells nothing more
        return {}
    return {**({"frames": frames} if frames > 1 else {}), **facts}


def dicom_metadata(ds) -> dict[str, str]:
    """The whitelisted DICOM attributes (modality, body part, view, age, sex, study date, and the patient
    key that the indexer keeps only as a keyed pseudonym), and whether the pixels were compressed with loss
    (`cxrmodel.imaging.compression`)."""
    out = dicom_compression(ds)
    for key, keyword in DICOM_METADATA_TAGS.items():
        value = getattr(ds, keyword, None)
        if value not in (None, ""):
            out[key] = str(value).strip()
    return out
