"""Session fixtures: a tiny CLIP built in code, generated images, an indexed data dir."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the patient key file (indexer.pseudonyms) goes to a throwaway config dir, never the user's ~/.config
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="radlens-test-config-")
os.environ.pop("RADLENS_PATIENT_KEY", None)
os.environ.pop("RADLENS_PATIENT_KEY_FILE", None)

from tests.databases import ADMIN_URL, PostgresBackend, SqliteBackend  # noqa: E402
from tests.imagegen import COLOURS, SHAPES, gray_image, shape_image  # noqa: E402
from tests.tinymodel import save_tiny_clip  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir):
    from cxrmodel.model.encoder import EncoderConfig, load_encoder

    return load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32", batch_size=16))


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """24 shape images, 8 grayscale images and one exact duplicate."""
    d = tmp_path_factory.mktemp("images")
    i = 0
    for shape in SHAPES:
        for colour in list(COLOURS)[:3]:
            for j in range(2):
                shape_image(shape, colour, seed=i, jitter=4).save(d / f"{shape}_{colour}_{j}.png")
                i += 1
    (d / "gray").mkdir()
    for s in range(8):
        gray_image(s).save(d / "gray" / f"g{s}.png")
    (d / "gray" / "g0_copy.png").write_bytes((d / "gray" / "g0.png").read_bytes())
    return d


def write_manifest(image_dir: Path) -> Path:
    """A CSV manifest giving shape images modality/body-part/view metadata."""
    lines = ["path,modality,body_part,view,caption"]
    for p in sorted(image_dir.glob("*.png")):
        shape, colour, _ = p.stem.split("_")
        modality = "CT" if shape in ("circle", "square") else "XR"
        view = "PA" if colour == "red" else "LAT"
        lines.append(f"{p.name},{modality},chest,{view},a {colour} {shape}")
    manifest = image_dir / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="session", params=["sqlite", pytest.param(
    "postgresql", marks=pytest.mark.skipif(not ADMIN_URL, reason="RADLENS_TEST_DB_URL not set"))])
def backend(request):
    """The metadata database the indexer, engine and web tests run on (see tests/databases.py)."""
    b = SqliteBackend() if request.param == "sqlite" else PostgresBackend(ADMIN_URL)
    yield b
    b.close()


@pytest.fixture
def on_backend(backend, monkeypatch):
    """Data dirs this test makes keep their metadata on `backend` (the user's `--db-url`, remembered)."""
    import indexer.store

    monkeypatch.setattr(indexer.store, "embedded_db_url", backend.url_for)
    return backend


@pytest.fixture(scope="session")
def indexed_dir(tmp_path_factory, image_dir, tiny_encoder, backend) -> Path:
    from indexer.pipeline import IndexJob, run_index

    data = tmp_path_factory.mktemp("data")
    manifest = write_manifest(image_dir)
    run_index(IndexJob(sources=[str(image_dir), str(manifest)], data_dir=data, db_url=backend.url_for(data),
                       workers=0, progress=False), tiny_encoder)
    return data


@pytest.fixture(scope="session")
def engine(indexed_dir, tiny_encoder, tmp_path_factory):
    """The session's engine, with every pathology declared assessed (tests of findings, filters, reports)."""
    from search.engine import Engine, EngineConfig
    from tests.tinymodel import write_forced_calibration

    calibration = write_forced_calibration(tiny_encoder, tmp_path_factory.mktemp("cal") / "calibration.json")
    eng = Engine.open(EngineConfig(data_dir=indexed_dir, calibration=str(calibration)), encoder=tiny_encoder)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def app(engine):
    from web import ServeConfig, create_app

    return create_app(ServeConfig(max_upload_bytes=2 * 1024 * 1024, api_token=None), engine=engine)


@pytest.fixture
def client(app):
    return app.test_client()


def pytest_terminal_summary(terminalreporter):
    """The API fuzzer's summary (tests/test_api_contract.py), so that CI output shows what it checked."""
    import sys

    contract = sys.modules.get("tests.test_api_contract")
    for summary in getattr(contract, "SUMMARIES", []):
        terminalreporter.section("API contract (schemathesis)")
        terminalreporter.write_line(summary)
