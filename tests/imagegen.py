"""Small images and DICOM files generated in the tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ("circle", "square", "triangle", "cross")


def shape_image(shape: str, colour: str, size: int = 64, jitter: int = 0, seed: int = 0) -> Image.Image:
    """A coloured shape on black, slightly shifted by `jitter` pixels."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), (0, 0, 0))
    d = ImageDraw.Draw(im)
    dx, dy = (rng.integers(-jitter, jitter + 1, 2) if jitter else (0, 0))
    c, r = size // 2, size // 3
    box = (c - r + dx, c - r + dy, c + r + dx, c + r + dy)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(c + dx, c - r + dy), (c - r + dx, c + r + dy), (c + r + dx, c + r + dy)], fill=fill)
    else:
        w = r // 3
        d.rectangle((c - w + dx, c - r + dy, c + w + dx, c + r + dy), fill=fill)
        d.rectangle((c - r + dx, c - w + dy, c + r + dx, c + w + dy), fill=fill)
    noise = rng.integers(0, 12, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def gray_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A random grayscale image (a different one per seed)."""
    rng = np.random.default_rng(seed)
    base = rng.random((size[1] // 8 + 1, size[0] // 8 + 1))
    big = np.kron(base, np.ones((8, 8)))[: size[1], : size[0]]
    return Image.fromarray((big * 255).astype(np.uint8), mode="L")


def gray_folder(folder: Path, count: int, prefix: str = "g", first_seed: int = 0) -> Path:
    """A new folder of `count` grayscale PNGs named prefix0.png ... (seeds first_seed, first_seed+1, ...)."""
    folder.mkdir(parents=True)
    for i in range(count):
        gray_image(first_seed + i).save(folder / f"{prefix}{i}.png")
    return folder


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def new_dataset(path: Path, sop_class: str):
    """An empty DICOM Part 10 dataset of `sop_class` in Explicit VR Little Endian, with fresh instance UIDs."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    return ds


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs) -> Path:
    """A minimal but valid DICOM file with the given pixels and attributes (patient tags included)."""
    from pydicom.uid import SecondaryCaptureImageStorage

    ds = new_dataset(path, SecondaryCaptureImageStorage)
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "PHI-123456"
    ds.PatientBirthDate = "19700101"
    ds.Modality = attrs.pop("Modality", "CR")
    frames = pixels.shape[0] if pixels.ndim == 3 and photometric != "RGB" else 1
    rows, cols = pixels.shape[-2:] if photometric != "RGB" else pixels.shape[:2]
    ds.Rows, ds.Columns = rows, cols
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
    else:
        ds.SamplesPerPixel = 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint8 if photometric == "RGB" else np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_palette_dicom(path: Path, indices: np.ndarray, colours: list[tuple[int, int, int]], entry_bits: int = 16,
                        nominal_bits: int | None = None) -> Path:
    """A PALETTE COLOR DICOM (ultrasound, nuclear medicine, secondary captures): 8-bit `indices` into `colours`
    (8-bit RGB), the tables stored with `entry_bits` per entry; `nominal_bits` is what the descriptors declare
    (8 with 16-bit entries: the common deviation of 8-bit values padded into 16 bits)."""
    from pydicom.uid import UltrasoundImageStorage

    ds = new_dataset(path, UltrasoundImageStorage)
    ds.Modality = "US"
    ds.Rows, ds.Columns = indices.shape
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "PALETTE COLOR", 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    table = np.array(colours, dtype=np.uint16)
    if entry_bits == 16 and (nominal_bits or 16) == 16:
        table = table * 257  # full 16-bit range
    dtype = np.uint16 if entry_bits == 16 else np.uint8
    for channel, name in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [len(colours), 0, nominal_bits or entry_bits])
        setattr(ds, f"{name}PaletteColorLookupTableData", table[:, channel].astype(dtype).tobytes())
    ds.PixelData = indices.astype(np.uint8).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def transcode_dicom(src: Path, dst: Path, syntax: str) -> Path:
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


def film12(seed: int = 0) -> np.ndarray:
    """A 160 x 128 12-bit film (smooth anatomy-like shading plus noise), as stored values."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:160, :128]
    return (1500 + 900 * np.sin(x / 19) * np.cos(y / 23) + rng.normal(0, 60, y.shape)).clip(0, 4095).astype(np.uint16)
