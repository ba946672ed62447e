"""Indexing straight from a PACS over DICOMweb, against a real Orthanc (Debian's orthanc + orthanc-dicomweb,
started here on a free loopback port with its own storage and HTTP basic auth). `.ci/run` installs it;
without it these tests skip locally, and fail in CI (`CI` set)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer import dicomweb
from indexer.pipeline import IndexJob, run_index
from indexer.store import default_db_url
from tests.imagegen import film12, transcode_dicom, write_dicom
from tests.servers import ORTHANC_PASSWORD, ORTHANC_USER, Orthanc, free_port, orthanc_server

ORTHANC = shutil.which("Orthanc")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    ORTHANC is None and not os.environ.get("CI"), reason="Orthanc not installed (apt-get install orthanc "
                                                         "orthanc-dicomweb); CI runs these")]
USER, PASSWORD = ORTHANC_USER, ORTHANC_PASSWORD
PHI = ("DOE^JANE", "PHI-123456", "19700101")  # what write_dicom puts in every file's patient module


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    assert ORTHANC, "Orthanc is not installed: .ci/run installs orthanc and orthanc-dicomweb"
    with orthanc_server(tmp_path_factory.mktemp("orthanc"), ORTHANC) as server:
        yield server


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("RADLENS_DICOMWEB_USER", USER)
    monkeypatch.setenv("RADLENS_DICOMWEB_PASSWORD", PASSWORD)
    dicomweb.reset_clients()
    yield
    dicomweb.reset_clients()


def _studies(folder: Path) -> list[tuple[Path, str]]:
    """Generated DICOMs of one patient (name, ID and birth date set): two CR chest PA studies a year apart,
    a DX chest AP, a CT and an MR; (file, modality)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    specs = [("CR", "CHEST", "PA", "20230105"), ("CR", "CHEST", "PA", "20240110"), ("DX", "CHEST", "AP", "20240301"),
             ("CT", "CHEST", None, "20240302"), ("MR", "HEAD", None, "20240303")]
    out = []
    for i, (modality, body_part, view, day) in enumerate(specs):
        attrs = dict(Modality=modality, BodyPartExamined=body_part, StudyDate=day, StudyInstanceUID=generate_uid(),
                     SeriesInstanceUID=generate_uid(), PatientBirthDate="19700101")
        if view:
            attrs["ViewPosition"] = view
        pixels = (rng.normal(2000, 300 + 50 * i, (48, 40)).clip(0, 4095)).astype(np.uint16)
        out.append((write_dicom(folder / f"{i}-{modality}.dcm", pixels, **attrs), modality))
    return out


@pytest.fixture(scope="module")
def archive(orthanc, tmp_path_factory) -> dict[str, dict]:
    """The five instances uploaded once: {SOP Instance UID: Orthanc's answer + modality}."""
    import pydicom

    uploaded = {}
    for path, modality in _studies(tmp_path_factory.mktemp("dicoms")):
        uploaded[str(pydicom.dcmread(path).SOPInstanceUID)] = {**orthanc.upload(path), "modality": modality}
    return uploaded


def _rows(data: Path) -> list[str]:
    from sqlalchemy import create_engine, text

    engine = create_engine(default_db_url(data))
    with engine.connect() as conn:
        paths = [p for (p,) in conn.execute(text("select path from images order by id"))]
    engine.dispose()
    return paths


def _job(orthanc: Orthanc, data: Path, source: str | None = None, **kw) -> IndexJob:
    return IndexJob(sources=[source or orthanc.source], data_dir=data, workers=0, progress=False, **kw)


def test_an_archive_is_indexed_in_place_incrementally_and_pruned(orthanc, archive, credentials, tiny_encoder,
                                                                 tmp_path, monkeypatch):
    import indexer.prepare

    data = tmp_path / "data"
    first = run_index(_job(orthanc, data), tiny_encoder)
    assert first.added == len(archive) and first.skipped == 0
    rows = _rows(data)
    assert sorted(r.rsplit("/", 1)[-1] for r in rows) == sorted(archive)  # one row per instance, by its UID
    assert all(r.startswith(orthanc.source + "/studies/") for r in rows)

    fetched = []
    monkeypatch.setattr(indexer.prepare, "fetch", lambda *a, **k: fetched.append(a) or b"")
    again = run_index(_job(orthanc, data), tiny_encoder)
    assert again.added == 0 and again.unchanged == len(archive) and fetched == []  # nothing fetched again
    monkeypatch.undo()

    gone_uid, gone = next((uid, info) for uid, info in archive.items() if info["modality"] == "MR")
    orthanc.delete(gone["ID"])
    try:
        pruned = run_index(_job(orthanc, data, prune=True), tiny_encoder)
        assert pruned.pruned == 1 and not any(r.endswith(gone_uid) for r in _rows(data))
    finally:
        del archive[gone_uid]  # the module's other tests see the archive as it now is

    ct_only = run_index(_job(orthanc, tmp_path / "ct", orthanc.source + "?ModalitiesInStudy=CT"), tiny_encoder)
    assert ct_only.added == 1  # the source URL's QIDO filters select studies


def test_no_patient_identity_reaches_the_database_files_or_api_and_queries_work(orthanc, archive, credentials,
                                                                                tiny_encoder, tmp_path):
    from search.engine import Engine, EngineConfig
    from web import ServeConfig, create_app

    data = tmp_path / "data"
    run_index(_job(orthanc, data), tiny_encoder)
    engine = Engine.open(EngineConfig(data_dir=data), encoder=tiny_encoder)
    client = create_app(ServeConfig(api_token=None), engine=engine).test_client()
    outputs = []
    try:
        hits = engine.text("a chest radiograph", k=len(archive))
        assert len(hits) == len(archive)
        cr = [h.id for h in hits if h.image["modality"] == "CR"]
        assert len(engine.similar_to(cr[0], k=2)) == 2
        report, scores, decision, _ = engine.report_for_id(cr[0])  # decodes the instance fetched back
        assert decision.applicable and len(scores) == 14 and report.technique
        assert engine.thumbnail(cr[0]).startswith(b"\x89PNG")
        priors = client.get(f"/api/images/{cr[0]}/priors").json
        assert len(priors["studies"]) == len(archive)  # one patient, linked by the keyed pseudonym only
        for path in ("/api/search?q=chest&k=10", f"/api/images/{cr[0]}", f"/api/images/{cr[0]}/priors",
                     f"/api/images/{cr[0]}/labels", f"/api/images/{cr[0]}/report?format=md", f"/image/{cr[0]}"):
            response = client.get(path)
            assert response.status_code == 200, path
            outputs.append(response.get_data(as_text=True))
    finally:
        engine.close()
    stored = b"".join(p.read_bytes() for p in data.rglob("*") if p.is_file())
    for phi in PHI:
        assert phi.encode() not in stored, f"{phi} in the data dir"
        assert not any(phi in out for out in outputs), f"{phi} in the API or pages"
    assert not list(data.rglob("*.dcm"))  # pixels are not copied beyond thumbnails


def test_an_unreachable_or_refusing_archive_is_one_line_and_exit_1(orthanc, credentials, tmp_path, monkeypatch,
                                                                     capsys):
    from radlens.cli import main

    monkeypatch.setenv("RADLENS_DICOMWEB_PASSWORD", "wrong")
    dicomweb.reset_clients()
    assert main(["index", orthanc.source, "--data-dir", str(tmp_path / "d"), "--model", "radlens-mini"]) == 1
    err = capsys.readouterr().err
    assert "refused the credentials (HTTP 401)" in err and "wrong" not in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()  # checked before anything is written
    monkeypatch.setattr(dicomweb, "RETRIES", 0)
    dicomweb.reset_clients()
    closed = f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web"
    assert main(["index", closed, "--data-dir", str(tmp_path / "d"), "--model", "radlens-mini"]) == 1
    assert "cannot be reached" in capsys.readouterr().err
    assert main(["index", "dicomweb+http://user:pw@127.0.0.1:1/dicom-web", "--data-dir", str(tmp_path / "d")]) == 1
    assert "credentials do not belong in the source URL" in capsys.readouterr().err


def test_a_killed_run_resumes_and_equals_an_uninterrupted_one(orthanc, archive, credentials, tiny_model_dir,
                                                              tiny_encoder, tmp_path):
    from indexer.faults import FAULT_ENV

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    cmd = [sys.executable, "-m", "radlens", "index", orthanc.source, "--data-dir", str(killed),
           "--model", str(tiny_model_dir), "--precision", "fp32", "--workers", "0", "--chunk-size", "2",
           "--batch-size", "2", "--no-progress"]
    env = {**os.environ, FAULT_ENV: "commit:2", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert 0 < len(_rows(killed)) < len(archive)  # the first chunk was committed, then the power went
    resumed = run_index(_job(orthanc, killed), tiny_encoder)
    assert resumed.added + resumed.unchanged == len(archive)
    run_index(_job(orthanc, whole), tiny_encoder)
    assert sorted(_rows(killed)) == sorted(_rows(whole))


def test_a_jpeg_lossless_instance_is_fetched_as_stored_and_decoded_to_its_pixels(tmp_path, credentials):
    """Archives keep CR/DX as JPEG Lossless: WADO-RS hands it over compressed, and it decodes like the original."""
    import io

    import pydicom

    from cxrmodel.imaging.decode import decode_bytes
    raw = write_dicom(tmp_path / "raw.dcm", film12(), WindowCenter=1600, WindowWidth=2200)
    lossless = transcode_dicom(raw, tmp_path / "ll.dcm", "JPEGLosslessProcess14_1")
    (tmp_path / "orthanc").mkdir()
    with orthanc_server(tmp_path / "orthanc", ORTHANC) as server:
        server.upload(lossless)
        (locator,) = list(dicomweb.list_locators(server.source))
        data = dicomweb.fetch(locator)
    fetched = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert fetched == pydicom.uid.JPEGLosslessSV1
    assert np.array_equal(np.asarray(decode_bytes(data, "x.dcm").image),
                          np.asarray(decode_bytes(raw.read_bytes(), "raw.dcm").image))


def test_a_report_on_an_archived_instance_says_its_frames_and_lossy_compression(tmp_path, credentials, tiny_encoder):
    """The archive is asked for the instance's metadata (no pixels), so a hit indexed over DICOMweb is reported
    with the same caveats as a file: only the first of its frames assessed, and the loss its header records.
    Before, an archived instance's report said neither."""
    from pydicom.uid import generate_uid

    from search.engine import Engine, EngineConfig

    frames = np.stack([film12()] * 3)
    path = write_dicom(tmp_path / "lossy.dcm", frames, Modality="CR", BodyPartExamined="CHEST", ViewPosition="PA",
                       StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(), LossyImageCompression="01",
                       LossyImageCompressionRatio="12.5", LossyImageCompressionMethod="ISO_10918_1")
    (tmp_path / "orthanc").mkdir()
    with orthanc_server(tmp_path / "orthanc", ORTHANC) as server:
        server.upload(path)
        data = tmp_path / "data"
        run_index(IndexJob(sources=[server.source], data_dir=data, workers=0, progress=False), tiny_encoder)
        engine = Engine.open(EngineConfig(data_dir=data), encoder=tiny_encoder)
        try:
            (hit,) = engine.text("a chest radiograph", k=1)
            report, _, _, _ = engine.report_for_id(hit.id)
        finally:
            engine.close()
    assert report.metadata["frames"] == 3
    assert report.metadata["lossy"] == "JPEG" and report.metadata["lossy_ratio"] == "12.5:1"
    limitations = " ".join(report.limitations)
    assert "3 frames" in limitations and "compressed with loss (JPEG, ratio 12.5:1)" in limitations
