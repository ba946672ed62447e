"""Reliability and security: fuzzed inputs, injection and traversal, PHI, index safety.

Hypothesis throws well over 500 malformed inputs at image decoding, the upload endpoints and the
manifest/pairs parsers; every one must end in the documented error, never a 500 or a traceback,
and the served index must be unchanged afterwards.
"""

from __future__ import annotations

import io
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


def test_dicom_patient_identity_never_leaves_the_file(tmp_path, tiny_encoder):
    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig
    from web import ServeConfig, create_app

    src = tmp_path / "src"
    src.mkdir()
    write_dicom(src / "patient.dcm", (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16),
                Modality="DX", BodyPartExamined="CHEST", ViewPosition="PA", StudyDescription="CHEST DOE JANE")
    data = tmp_path / "data"
    run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False), tiny_encoder)
    engine = Engine.open(EngineConfig(data_dir=data), encoder=tiny_encoder)
    client = create_app(ServeConfig(), engine=engine).test_client()
    hit = engine.text("chest", k=1)[0]
    outputs = [client.get(p).get_data(as_text=True) for p in (
        f"/api/images/{hit.id}", f"/api/images/{hit.id}/labels", f"/api/images/{hit.id}/report?format=md",
        f"/api/images/{hit.id}/findings.json", f"/image/{hit.id}", "/?q=chest", "/api/search?q=chest")]
    outputs.append(client.post("/api/label", data={"image": (io.BytesIO((src / "patient.dcm").read_bytes()),
                                                             "p.dcm")}, content_type="multipart/form-data")
                   .get_data(as_text=True))
    outputs.append(dump_database(default_db_url(data)))
    for text in outputs:
        for secret in ("DOE", "JANE", "PHI-123456", "19700101"):
            assert secret not in text
    engine.close()


def test_uploads_are_not_kept_on_disk(client, indexed_dir, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = set(indexed_dir.rglob("*"))
    big = png_bytes(gray_image(9, (900, 900)))  # large enough for werkzeug to spool
    r = client.post("/api/label", data={"image": (io.BytesIO(big), "big.png")}, content_type="multipart/form-data")
    assert r.status_code == 200
    assert list(tmp_path.iterdir()) == []
    assert {p for p in indexed_dir.rglob("*") if "thumbs" not in p.parts} <= before
