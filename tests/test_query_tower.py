"""The ONNX query tower: exported and checked at index time, used for text queries without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxrmodel.model.query_tower import CHECK_PROMPTS, MIN_COSINE, ONNX_FILE, TOWER_DIR, QueryTower
from tests.imagegen import gray_folder, gray_image


@pytest.fixture(scope="module")
def dual_encoder_dir(tmp_path_factory) -> Path:
    from tests.tinymodel import save_tiny_bert, save_tiny_dual_encoder

    root = tmp_path_factory.mktemp("dual")
    return save_tiny_dual_encoder(root / "vtde", save_tiny_bert(root / "bert"))


def _index(data: Path, model: str | Path, images: Path, **job) -> object:
    from cxrmodel.model.encoder import EncoderConfig, load_encoder
    from indexer.pipeline import IndexJob, run_index

    encoder = load_encoder(EncoderConfig(model=str(model)))
    return run_index(IndexJob(sources=[str(images)], data_dir=data, workers=0, progress=False, **job), encoder)


@pytest.fixture(scope="module")
def gray_images(tmp_path_factory) -> Path:
    return gray_folder(tmp_path_factory.mktemp("gray") / "images", 12)


@pytest.mark.parametrize("kind", ["clip", "dual-encoder"])
def test_the_exported_tower_equals_the_torch_tower_in_fp32(kind, tiny_model_dir, dual_encoder_dir, tmp_path):
    """Exported from an `auto` encoder (int8/bf16 text here), the tower matches the fp32 torch tower."""
    from cxrmodel.model.encoder import EncoderConfig, load_encoder
    from cxrmodel.model.tower_export import export_query_tower

    model = str(tiny_model_dir if kind == "clip" else dual_encoder_dir)
    result = export_query_tower(load_encoder(EncoderConfig(model=model)), tmp_path)
    assert result.status == "exported", result.reason
    assert result.min_cosine >= MIN_COSINE

    tower = QueryTower.load(result.directory, full_check=True)
    reference = load_encoder(EncoderConfig(model=model, precision="fp32"))
    texts = list(CHECK_PROMPTS) + ["a red circle", "pleural effusion", "mri brain tumour"]
    ours, theirs = tower.encode(texts), reference.encode_texts(texts)
    assert np.min(np.sum(ours * theirs, axis=1)) >= MIN_COSINE
    for one in texts[:3]:  # alone (no padding) as in a batch
        assert float(tower.encode([one])[0] @ reference.encode_texts([one])[0]) >= MIN_COSINE
    assert json.loads((result.directory / "manifest.json").read_text())["identity"]["model"] == reference.model_name


def test_an_index_exports_its_tower_and_keeps_it_on_the_next_run(tiny_model_dir, gray_images, tmp_path):
    first = _index(tmp_path, tiny_model_dir, gray_images)
    assert "exported" in first.query_tower
    assert len(list((tmp_path / TOWER_DIR).iterdir())) == 1
    again = _index(tmp_path, tiny_model_dir, gray_images)
    assert "kept" in again.query_tower


def test_the_summary_times_the_embedding_phase_apart_from_the_one_off_tower(tiny_model_dir, gray_images, tmp_path):
    """bench.indexing reports the embedding phase's rate beside the whole run's: the phases must be disjoint."""
    summary = _index(tmp_path, tiny_model_dir, gray_images)
    assert summary.embedded == 12
    assert summary.embed_seconds > 0 and summary.tower_seconds > 0
    assert summary.embed_seconds + summary.tower_seconds <= summary.seconds
    assert summary.embedding_images_per_second == pytest.approx(12 / summary.embed_seconds)
    assert summary.embedding_images_per_second > summary.images_per_second


def test_no_tower_when_asked_not_to(tiny_model_dir, gray_images, tmp_path):
    from search.encoders import TowerEncoder
    from search.engine import Engine, EngineConfig

    summary = _index(tmp_path, tiny_model_dir, gray_images, query_tower=False)
    assert summary.query_tower == "" and not (tmp_path / TOWER_DIR).exists()
    engine = Engine.open(EngineConfig(data_dir=tmp_path))
    assert not isinstance(engine.encoder, TowerEncoder)
    assert engine.text("a gray image", k=3)
    engine.close()


def test_a_rebuild_with_another_model_replaces_the_tower(tiny_model_dir, dual_encoder_dir, gray_images, tmp_path):
    from search.encoders import TowerEncoder
    from search.engine import Engine, EngineConfig

    _index(tmp_path, tiny_model_dir, gray_images)
    _index(tmp_path, dual_encoder_dir, gray_images, rebuild=True)
    towers = list((tmp_path / TOWER_DIR).iterdir())
    assert len(towers) == 1
    engine = Engine.open(EngineConfig(data_dir=tmp_path))
    assert isinstance(engine.encoder, TowerEncoder) and engine.encoder.dim == 8
    assert engine.encoder.tower.directory == towers[0]
    assert len(engine.text("pleural effusion", k=4)) == 4
    engine.close()


def test_a_damaged_tower_falls_back_to_the_torch_encoder(tiny_model_dir, gray_images, tmp_path, caplog):
    from indexer.check import check_data_dir
    from indexer.store import default_db_url
    from search.encoders import TowerEncoder
    from search.engine import Engine, EngineConfig

    _index(tmp_path, tiny_model_dir, gray_images)
    assert "ONNX query tower, sha256 verified" in check_data_dir(tmp_path, default_db_url(tmp_path)).lines()[-1]
    onnx = next((tmp_path / TOWER_DIR).iterdir()) / ONNX_FILE
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only `radlens check`'s full hash sees it
    onnx.write_bytes(bytes(data))
    report = check_data_dir(tmp_path, default_db_url(tmp_path))
    assert report.ok and "does not match its manifest" in report.lines()[-1]  # a note, not index drift
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    engine = Engine.open(EngineConfig(data_dir=tmp_path))
    assert not isinstance(engine.encoder, TowerEncoder)
    assert "cannot be used" in caplog.text
    assert len(engine.text("a gray image", k=3)) == 3
    engine.close()


def test_the_torch_encoder_loads_only_for_image_label_and_report_requests(tiny_model_dir, gray_images, tmp_path):
    from search.encoders import TowerEncoder
    from search.engine import Engine, EngineConfig

    _index(tmp_path, tiny_model_dir, gray_images)
    engine = Engine.open(EngineConfig(data_dir=tmp_path))
    encoder = engine.encoder
    assert isinstance(encoder, TowerEncoder)
    hits = engine.text("a gray image", k=3)
    engine.similar_to(hits[0].id, k=2)
    engine.stats()
    assert not encoder.torch_loaded
    assert len(engine.image(gray_image(99), k=2)) == 2
    assert encoder.torch_loaded
    engine.close()


def _cli_in_subprocess(args: list[str]) -> dict:
    """Run `radlens ARGS --json` in a fresh interpreter; its JSON output and which heavy modules it imported."""
    code = ("import io, json, sys, contextlib\n"
            "from radlens.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            f"    rc = main({args!r})\n"
            "print(json.dumps({'rc': rc, 'out': json.loads(out.getvalue()),\n"
            "                  'imported': [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_search_and_similar_never_import_torch_and_rank_like_torch_fp32(indexed_dir, backend):
    """`radlens search` and `similar --id` run on onnxruntime only, and return what the fp32 torch
    encoder returns, on the session's index (SQLite and PostgreSQL)."""
    from search.engine import Engine, EngineConfig

    assert len(list((indexed_dir / TOWER_DIR).iterdir())) == 1
    query = "a red circle"
    search = _cli_in_subprocess(["search", query, "--data-dir", str(indexed_dir), "-k", "6", "--json"])
    assert search["rc"] == 0 and search["imported"] == []
    first = search["out"]["results"][0]["id"]
    similar = _cli_in_subprocess(["similar", "--id", str(first), "--data-dir", str(indexed_dir), "--json"])
    assert similar["rc"] == 0 and similar["imported"] == [] and similar["out"]["results"]

    reference = Engine.open(EngineConfig(data_dir=indexed_dir, precision="fp32", query_tower=False))
    try:
        hits = reference.text(query, k=6)
        assert [h["id"] for h in search["out"]["results"]] == [h.id for h in hits]
        assert np.allclose([h["score"] for h in search["out"]["results"]], [h.score for h in hits], atol=1e-4)
        assert [h["match"]["verdict"] for h in search["out"]["results"]] == [h.match.verdict for h in hits]
    finally:
        reference.close()


def test_the_apis_text_search_and_home_page_run_on_the_tower(tiny_model_dir, gray_images, tmp_path):
    from search.engine import Engine, EngineConfig
    from web import ServeConfig, create_app

    _index(tmp_path, tiny_model_dir, gray_images)
    engine = Engine.open(EngineConfig(data_dir=tmp_path))
    client = create_app(ServeConfig(api_token=None), engine=engine).test_client()
    response = client.get("/api/search?q=a+gray+image&k=3")
    assert response.status_code == 200 and len(response.json["results"]) == 3
    assert client.get("/?q=a+gray+image").status_code == 200
    assert not engine.encoder.torch_loaded
    engine.close()


def test_the_relevance_null_is_computed_once_per_index_and_query_encoder(tiny_model_dir, gray_images, tmp_path,
                                                                          monkeypatch):
    """A second process (a new engine) reads the cached null instead of encoding the 40 probes again; a
    re-index that changes the index computes a new one."""
    from search.encoders import TowerEncoder
    from search.engine import Engine, EngineConfig

    _index(tmp_path, tiny_model_dir, gray_images)
    first = Engine.open(EngineConfig(data_dir=tmp_path))
    verdicts = [h.match.to_dict() for h in first.text("a gray image", k=3)]
    first.close()
    encoded = []
    real = TowerEncoder.encode_queries

    def counting(self, texts):
        texts = list(texts)
        encoded.append(len(texts))
        return real(self, texts)

    monkeypatch.setattr(TowerEncoder, "encode_queries", counting)
    second = Engine.open(EngineConfig(data_dir=tmp_path))
    assert [h.match.to_dict() for h in second.text("a gray image", k=3)] == verdicts
    assert encoded == [1]  # the query only, not the probes
    second.close()
    gray_folder(gray_images.parent / "more", 3, prefix="m", first_seed=50)
    _index(tmp_path, tiny_model_dir, gray_images.parent / "more")
    third = Engine.open(EngineConfig(data_dir=tmp_path))
    encoded.clear()
    third.text("a gray image", k=3)
    assert encoded == [1, 40]  # the index changed: the probes are encoded again
    third.close()
