"""Reliability and security: fuzzed inputs, injection and traversal, PHI, index safety.

Hypothesis throws well over 500 malformed inputs at image decoding, the upload endpoints and the
manifest/pairs parsers; every one must end in the documented error, never a 500 or a traceback,
and the served index must be unchanged afterwards.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrmodel.errors import DataError, ImageDecodeError
from cxrmodel.imaging.decode import ImageLimits, decode_bytes
from indexer.check import check_data_dir
from indexer.store import default_db_url
from tests.databases import dump_database, fetch
from tests.imagegen import gray_folder, gray_image, png_bytes, shape_image, write_dicom


def fuzz(examples: int):
    """Hypothesis settings for a fuzz test: deterministic, no deadline, `examples` inputs."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _jpeg() -> bytes:
    buf = io.BytesIO()
    shape_image("circle", "red", size=48).save(buf, format="JPEG")
    return buf.getvalue()


def _dicom() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return write_dicom(Path(d) / "f.dcm", (np.arange(24 * 24).reshape(24, 24) * 7 % 4096).astype(np.uint16),
                           photometric="MONOCHROME1").read_bytes()


SEEDS = {"png": png_bytes(gray_image(3, (40, 32))), "jpeg": _jpeg(), "dicom": _dicom()}


def png_with_dimensions(width: int, height: int) -> bytes:
    """A PNG whose header declares huge dimensions (valid CRCs, almost no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@st.composite
def malformed_images(draw):
    kind = draw(st.sampled_from(["truncate", "bitflip", "random", "empty", "huge", "prefix"]))
    seed = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    if kind == "truncate":
        return seed[: draw(st.integers(0, len(seed) - 1))]
    if kind == "bitflip":
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 12))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=2048))
    if kind == "empty":
        return b""
    if kind == "huge":
        return png_with_dimensions(draw(st.integers(20_000, 2**31 - 1)), draw(st.integers(20_000, 2**31 - 1)))
    return draw(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\0" * 128 + b"DICM"])) + \
        draw(st.binary(max_size=512))


@fuzz(300)
@given(data=malformed_images(), name=st.sampled_from(["x.png", "x.jpg", "x.dcm", "x", "x.txt"]))
def test_fuzz_decoding_gives_a_decoded_image_or_the_one_error(data, name):
    try:
        decoded = decode_bytes(data, name=name, limits=ImageLimits(max_pixels=50_000_000))
    except ImageDecodeError as exc:
        assert str(exc).startswith(name) and "\n" not in str(exc)
        return
    assert decoded.image.mode in ("L", "RGB") and decoded.width > 0 and decoded.height > 0


def _ids(data_dir):
    return fetch(default_db_url(data_dir), "select image_id, revision from embeddings order by image_id")


@fuzz(150)
@given(data=malformed_images(), route=st.sampled_from(["/api/similar", "/api/label", "/upload"]),
       name=st.sampled_from(["a.png", "b.dcm", "c.jpg", "../../etc/passwd", "x.exe"]))
def test_fuzz_uploads_never_500(client, indexed_dir, data, route, name):
    before = _ids(indexed_dir)
    r = client.post(route, data={"image": (io.BytesIO(data), name)}, content_type="multipart/form-data")
    assert r.status_code < 500, r.get_data(as_text=True)[:300]
    if route.startswith("/api/"):
        assert r.is_json
    assert "Traceback" not in r.get_data(as_text=True)
    assert _ids(indexed_dir) == before


@st.composite
def malformed_tables(draw):
    kind = draw(st.sampled_from(["csv", "jsonl"]))
    lines = draw(st.lists(st.one_of(
        st.text(max_size=60), st.sampled_from(['{"path": 3}', '{"file": null}', "[1,2]", "null", '{"path": "x.png"}',
                                               'path,caption', '"unterminated', "\x00\x01", "a,b,c,d,e,f"])),
        max_size=8))
    return kind, "\n".join(lines)


@fuzz(100)
@given(table=malformed_tables(), raw=st.binary(max_size=64))
def test_fuzz_manifest_and_pairs_parsers_raise_only_data_errors(tmp_path, table, raw):
    from cxrmodel.training.pairs import load_pairs
    from indexer.sources import collect

    kind, text = table
    path = tmp_path / f"m.{kind}"
    path.write_bytes(text.encode("utf-8", "surrogatepass") + (raw if kind == "csv" else b""))
    for parse in (lambda: collect([path], []), lambda: load_pairs(path)):
        try:
            parse()
        except DataError as exc:
            assert "\n" not in str(exc) or "column" in str(exc)


def test_fuzzed_files_in_a_corpus_are_skipped_and_the_index_stays_consistent(tmp_path, tiny_encoder):
    from indexer.pipeline import IndexJob, run_index

    src = gray_folder(tmp_path / "src", 6, prefix="ok")
    data = tmp_path / "data"
    run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False), tiny_encoder)
    before = _ids(data)
    rng = np.random.default_rng(0)
    for i, seed in enumerate(list(SEEDS.values()) * 3):
        blob = bytearray(seed[: rng.integers(1, len(seed))])
        (src / f"bad{i}.{['png', 'jpg', 'dcm'][i % 3]}").write_bytes(bytes(blob))
    (src / "huge.png").write_bytes(png_with_dimensions(90_000, 90_000))
    summary = run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False), tiny_encoder)
    assert summary.added == 0 and summary.skipped == 10
    assert _ids(data) == before
    assert check_data_dir(data, default_db_url(data)).ok


@pytest.mark.parametrize("key", ["modality", "body_part", "view", "source", "format", "effusion"])
@pytest.mark.parametrize("value", ["x' OR '1'='1", "1; DROP TABLE images; --", "%", "_",
                                   "' UNION SELECT path FROM images --"])
def test_sql_fragments_in_filters_are_inert(client, indexed_dir, key, value):
    r = client.get("/api/search", query_string=[("q", "x"), ("filter", f"{key}={value}")])
    assert r.status_code in (200, 400)
    if r.status_code == 200:
        assert r.json["results"] == []
    assert len(_ids(indexed_dir)) > 0


# DICOM PS3.15 Annex E basic profile: identifying attributes, each with a value unique enough to search for
PHI_ATTRIBUTES = {
    "PatientName": "ZEBULON^QUIXANO", "PatientID": "MRN-884217", "IssuerOfPatientID": "ISSUERXQZ",
    "OtherPatientIDs": "OTHERID-55821", "OtherPatientNames": "VOSKRESEN^ILYAQ", "PatientBirthDate": "19570423",
    "PatientBirthTime": "071533", "PatientAddress": "17 WHARFEDALE CRESCENT", "PatientTelephoneNumbers": "5550147823",
    "PatientMotherBirthName": "MOTHERNAMEXQ", "EthnicGroup": "ETHNICXQZ", "Occupation": "LIGHTHOUSEKEEPER",
    "PatientComments": "PATIENTCOMMENTXQ", "AdditionalPatientHistory": "HISTORYXQZ", "PatientWeight": "83.7",
    "PatientAge": "067Y", "PatientSex": "F",
    "StudyDate": "20230314", "SeriesDate": "20230315", "AcquisitionDate": "20230316", "ContentDate": "20230317",
    "StudyTime": "101530", "SeriesTime": "101645", "AcquisitionTime": "101702", "ContentTime": "101759",
    "AccessionNumber": "ACC77110293", "StudyID": "STUDYID9931", "InstitutionName": "SAINT ELSEWHERE HOSPITAL",
    "InstitutionAddress": "42 INFIRMARY LANE", "InstitutionalDepartmentName": "RADIOLOGYDEPTXQ",
    "ReferringPhysicianName": "REFERRER^OSWALDO", "PerformingPhysicianName": "PERFORMER^TIBURCIO",
    "NameOfPhysiciansReadingStudy": "READER^ANSELMO", "OperatorsName": "OPERATOR^GWENDAL",
    "StationName": "STATIONXQ7", "DeviceSerialNumber": "SERIAL77341", "StudyDescription": "STUDYDESCXQZ",
    "SeriesDescription": "SERIESDESCXQZ", "ImageComments": "IMAGECOMMENTXQ", "ProtocolName": "PROTOCOLXQZ",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.7711", "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.7712",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.7713",
}
KEPT = {"Modality", "BodyPartExamined", "ViewPosition"}  # kept as they are (SECURITY.md)
TRANSFORMED = {"PatientAge", "PatientSex", "PatientID", "StudyDate"}  # kept in the documented forms, checked below


def _phi_values(attrs: dict, sop_uids: list[str]) -> list[str]:
    """Every identifying value in the spellings an output could use (dates and times reformatted too)."""
    values = [v for k, v in attrs.items() if k not in ("PatientSex", "PatientWeight")] + sop_uids
    values += [part for v in attrs.values() for part in v.split("^") if "^" in v]
    for key in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "PatientBirthDate"):
        d = attrs[key]
        values += [f"{d[:4]}-{d[4:6]}-{d[6:]}", f"{d[:4]}/{d[4:6]}/{d[6:]}", f"{d[6:]}.{d[4:6]}.{d[:4]}"]
    for key in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "PatientBirthTime"):
        t = attrs[key]
        values.append(f"{t[:2]}:{t[2:4]}:{t[4:]}")
    return values


def test_no_identifying_dicom_attribute_leaves_the_file(tmp_path, tiny_model_dir, caplog, capsys, monkeypatch):
    """PS3.15's basic profile set in full: none of its values reach the DB, the data dir, logs, API,
    pages or reports, except the documented forms: age band, sex, keyed pseudonym, shifted day."""
    import datetime as dt
    import hashlib
    import hmac
    import logging

    from indexer.pseudonyms import MAX_SHIFT_DAYS, MIN_SHIFT_DAYS
    from radlens.cli import main
    from search.engine import Engine, EngineConfig
    from web import ServeConfig, create_app

    key_file = tmp_path / "secrets" / "patient-key"
    monkeypatch.setenv("RADLENS_PATIENT_KEY_FILE", str(key_file))
    caplog.set_level(logging.DEBUG)
    src, data = tmp_path / "src", tmp_path / "data"
    src.mkdir()
    pixels = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    second = {**PHI_ATTRIBUTES, "StudyDate": "20240105", "SeriesDate": "20240105"}
    for name, attrs in (("first.dcm", PHI_ATTRIBUTES), ("second.dcm", second)):
        write_dicom(src / name, pixels, Modality="DX", BodyPartExamined="CHEST", ViewPosition="PA", **attrs)
    import pydicom

    sop_uids = [str(pydicom.dcmread(src / n).SOPInstanceUID) for n in ("first.dcm", "second.dcm")]
    assert main(["-vv", "index", str(src), "--data-dir", str(data), "--model", str(tiny_model_dir),
                 "--precision", "fp32", "--workers", "0", "--no-progress"]) == 0
    assert main(["check", "--data-dir", str(data), "--skipped"]) == 0

    from cxrmodel.model.encoder import EncoderConfig, load_encoder

    engine = Engine.open(EngineConfig(data_dir=data), encoder=load_encoder(EncoderConfig(
        model=str(tiny_model_dir), precision="fp32")))
    client = create_app(ServeConfig(), engine=engine).test_client()
    ids = sorted(h.id for h in engine.text("chest", k=2))
    outputs = [client.get(p).get_data(as_text=True) for i in ids for p in (
        f"/api/images/{i}", f"/api/images/{i}/labels", f"/api/images/{i}/report?format=md",
        f"/api/images/{i}/findings.json", f"/api/images/{i}/findings.csv", f"/api/images/{i}/priors", f"/image/{i}")]
    outputs += [client.get(p).get_data(as_text=True) for p in ("/?q=chest", "/api/search?q=chest")]
    pdf = client.get(f"/api/images/{ids[0]}/report?format=pdf").get_data()
    for route in ("/api/label", "/api/similar", "/upload"):
        upload = {"image": (io.BytesIO((src / "first.dcm").read_bytes()), "upload.dcm")}
        outputs.append(client.post(route, data=upload, content_type="multipart/form-data").get_data(as_text=True))
    engine.close()
    captured = capsys.readouterr()
    outputs += [captured.out, captured.err, caplog.text]
    outputs.append(dump_database(default_db_url(data)))
    files = b"".join(p.read_bytes() for p in data.rglob("*") if p.is_file()) + pdf

    for value in _phi_values(PHI_ATTRIBUTES, sop_uids) + ["20240105", "2024-01-05"]:
        assert value not in files.decode("latin-1"), value
        for text in outputs:
            assert value not in text, value
    # the documented forms: a decade band, the sex, a keyed pseudonym, a per-patient shifted day number
    rows = fetch(default_db_url(data), "SELECT age_band, sex, patient_hash, study_day FROM images ORDER BY id")
    key = bytes.fromhex(key_file.read_text().strip())
    pseudonym = hmac.new(key, b"patient:MRN-884217", hashlib.sha256).hexdigest()
    real = [dt.date(2023, 3, 14).toordinal(), dt.date(2024, 1, 5).toordinal()]
    assert [r[:3] for r in rows] == [("60-69", "F", pseudonym)] * 2
    shifts = {real_day - row[3] for real_day, row in zip(real, rows, strict=True)}
    assert len(shifts) == 1 and MIN_SHIFT_DAYS <= shifts.pop() <= MAX_SHIFT_DAYS  # intervals kept
    for text in outputs[:-1]:  # outside the DB neither the pseudonym nor any day number appears
        assert pseudonym not in text and str(rows[0][3]) not in text and str(real[0]) not in text
    priors = json.loads(outputs[7 + 5])  # the second study's: the first came 297 days before it
    assert [st["days_from_this"] for st in priors["studies"]] == [-297, 0]


def test_uploads_are_not_kept_on_disk(client, indexed_dir, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = set(indexed_dir.rglob("*"))
    big = png_bytes(gray_image(9, (900, 900)))  # large enough for werkzeug to spool
    r = client.post("/api/label", data={"image": (io.BytesIO(big), "big.png")}, content_type="multipart/form-data")
    assert r.status_code == 200
    assert list(tmp_path.iterdir()) == []
    assert {p for p in indexed_dir.rglob("*") if "thumbs" not in p.parts} <= before


def test_the_pixel_limit_that_applies_is_the_one_stated():
    """The default is Pillow's own 89,478,485 (SECURITY.md), and a raised limit is the one applied: Pillow's
    warning threshold no longer refuses images the configured limit allows."""
    from cxrmodel.errors import ImageTooLargeError

    assert ImageLimits().max_pixels == 89_478_485
    with pytest.raises(ImageTooLargeError, match="89,478,485-pixel limit"):
        decode_bytes(png_with_dimensions(9460, 9460), "big.png")  # 89,491,600 pixels: just over
    raised = ImageLimits(max_pixels=100_000_000)
    with pytest.raises(ImageDecodeError) as caught:  # past the size check: its few pixel bytes are truncated
        decode_bytes(png_with_dimensions(9460, 9460), "big.png", limits=raised)
    assert not isinstance(caught.value, ImageTooLargeError)
    with pytest.raises(ImageTooLargeError) as bomb:  # Pillow's own check (over twice its limit) fires first
        decode_bytes(png_with_dimensions(30000, 30000), "bomb.png")
    assert str(bomb.value) == "bomb.png: 900,000,000 pixels, over the 89,478,485-pixel limit"
