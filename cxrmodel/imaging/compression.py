"""Whether an image's pixels were compressed with loss, as far as its file proves it.

A report says so, as viewers of diagnostic images are expected to (DICOM PS3.3 C.7.6.1.1.5: once an image has been
lossy compressed, Lossy Image Compression stays "01" through every later copy). Only what is certain is claimed:
the file's own flag, or a transfer syntax that cannot be lossless (JPEG's DCT processes), or a JPEG raster file.
A syntax that may be either (JPEG 2000, JPEG-LS near-lossless, HTJ2K) without the flag says nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

# Transfer syntaxes whose coding always loses information: JPEG Baseline and Extended (DCT)
LOSSY_SYNTAXES = {"1.2.840.10008.1.2.4.50": "JPEG", "1.2.840.10008.1.2.4.51": "JPEG"}
# Lossy Image Compression Method (0028,2114) codes, PS3.3 C.7.6.1.1.5.1
METHOD_NAMES = {"ISO_10918_1": "JPEG", "ISO_14495_1": "JPEG-LS", "ISO_15444_1": "JPEG 2000",
                "ISO_15444_15": "HTJ2K", "ISO_13818_2": "MPEG-2", "ISO_14496_10": "H.264", "ISO_23008_2": "H.265"}
LOSSY_RASTER_FORMATS = {"JPEG": "JPEG"}  # Pillow's format names of files that are always lossy
UNRECORDED = "unrecorded"  # "lossy" when the file says it was lossy compressed but not how (a report words it)


def _values(value) -> list[str]:
    """A DICOM value, single or multi-valued, as a list of stripped strings."""
    if value is None:
        return []
    items = value if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value]  # MultiValue
    return [str(v).strip() for v in items if str(v).strip()]


def dicom_compression(ds) -> dict[str, str]:
    """{"lossy": method, "lossy_ratio": "10:1"} for a DICOM dataset whose pixels are known to have been
    compressed with loss (the method `UNRECORDED` where the file does not say; the ratio only where recorded);
    {} otherwise."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    flagged = str(getattr(ds, "LossyImageCompression", "") or "").strip() == "01"
    if not flagged and syntax not in LOSSY_SYNTAXES:
        return {}
    methods = [METHOD_NAMES.get(code, code) for code in _values(getattr(ds, "LossyImageCompressionMethod", None))]
    out = {"lossy": ", ".join(methods) or LOSSY_SYNTAXES.get(syntax) or UNRECORDED}
    ratios = []
    for value in _values(getattr(ds, "LossyImageCompressionRatio", None)):
        try:
            ratios.append(f"{float(value):g}:1")
        except ValueError:
            continue
    if ratios:
        out["lossy_ratio"] = ", ".join(ratios)
    return out


def raster_compression(fmt: str) -> dict[str, str]:
    """{"lossy": format} for a raster file format that is always lossy (JPEG); {} otherwise."""
    return {"lossy": LOSSY_RASTER_FORMATS[fmt]} if fmt in LOSSY_RASTER_FORMATS else {}
