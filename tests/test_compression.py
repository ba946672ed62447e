"""Lossy compression as far as a file proves it (`cxrmodel.imaging.compression`), and the report that says so."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset

from cxrmodel.imaging.compression import dicom_compression, raster_compression
from cxrmodel.imaging.decode import decode_bytes, file_facts
from tests.imagegen import gray_image, write_dicom


def _dataset(syntax: str = "1.2.840.10008.1.2.1", **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("syntax,attrs,expected", [
    ("1.2.840.10008.1.2.1", {}, {}),  # uncompressed, never flagged
    ("1.2.840.10008.1.2.4.50", {}, {"lossy": "JPEG"}),  # JPEG Baseline: DCT, lossy by construction
    ("1.2.840.10008.1.2.4.51", {}, {"lossy": "JPEG"}),
    ("1.2.840.10008.1.2.4.91", {}, {}),  # JPEG 2000 may be either: without the flag nothing is claimed
    ("1.2.840.10008.1.2.4.81", {"LossyImageCompression": "00"}, {}),
    ("1.2.840.10008.1.2.4.91", {"LossyImageCompression": "01", "LossyImageCompressionRatio": 12.5,
                                "LossyImageCompressionMethod": "ISO_15444_1"},
     {"lossy": "JPEG 2000", "lossy_ratio": "12.5:1"}),
    ("1.2.840.10008.1.2.1", {"LossyImageCompression": "01", "LossyImageCompressionRatio": [10, 2],
                             "LossyImageCompressionMethod": ["ISO_10918_1", "ISO_14495_1"]},
     {"lossy": "JPEG, JPEG-LS", "lossy_ratio": "10:1, 2:1"}),  # decompressed since: the flag stays
    ("1.2.840.10008.1.2.1", {"LossyImageCompression": "01"}, {"lossy": "unrecorded"}),
])
def test_lossy_compression_is_claimed_only_where_the_file_proves_it(syntax, attrs, expected):
    assert dicom_compression(_dataset(syntax, **attrs)) == expected


def test_a_jpeg_file_is_lossy_and_a_png_is_not():
    assert raster_compression("JPEG") == {"lossy": "JPEG"}
    assert raster_compression("PNG") == {} and raster_compression("WEBP") == {}  # WebP may be either


def test_a_flagged_dicom_and_a_jpeg_carry_it_from_decode_and_header_alike(tmp_path):
    flagged = write_dicom(tmp_path / "lossy.dcm", np.full((8, 8), 900, np.uint16), LossyImageCompression="01",
                          LossyImageCompressionRatio=12.5, LossyImageCompressionMethod="ISO_15444_1")
    plain = write_dicom(tmp_path / "plain.dcm", np.full((8, 8), 900, np.uint16))
    jpeg = tmp_path / "x.jpg"
    gray_image(1, (64, 64)).save(jpeg, quality=90)
    png = tmp_path / "x.png"
    gray_image(1, (64, 64)).save(png)
    want = {"lossy": "JPEG 2000", "lossy_ratio": "12.5:1"}
    for path, facts in ((flagged, want), (plain, {}), (jpeg, {"lossy": "JPEG"}), (png, {})):
        assert file_facts(path) == facts
        decoded = decode_bytes(path.read_bytes(), path.name)
        assert {k: v for k, v in decoded.metadata.items() if k.startswith("lossy")} == facts
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    assert decode_bytes(buf.getvalue(), "y.png").metadata == {}


def test_a_report_words_an_unrecorded_method_in_its_language():
    from cxrmodel.labels.prompts import LabelConfig
    from cxrmodel.reporting.report import compose_report

    meta = {"lossy": "unrecorded"}
    en = compose_report([], meta, LabelConfig(), lang="en").limitations[-1]
    de = compose_report([], meta, LabelConfig(), lang="de").limitations[-1]
    assert en == "The image was compressed with loss (method not recorded): fine detail may be missing or altered."
    assert "Verfahren nicht angegeben" in de and "unrecorded" not in de
