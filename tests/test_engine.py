"""search.Engine: exact top-k, image self-match, filters, duplicate collapse, labels and reports."""

from __future__ import annotations

import io

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrmodel.constants import PATHOLOGIES
from cxrmodel.errors import DataError
from cxrmodel.reporting.report import text_for, to_json, to_markdown, to_pdf
from indexer.store import EmbeddingRow, ImageRow, ScoreRow, default_db_url, open_db
from tests.imagegen import gray_image, shape_image

pytestmark = pytest.mark.usefixtures("on_backend")  # SQLite, and PostgreSQL when RADLENS_TEST_DB_URL is set


def _all_vectors(data):
    db = open_db(default_db_url(data))
    with Session(db) as s:
        rows = s.execute(select(EmbeddingRow.image_id, EmbeddingRow.vector, ImageRow.content_hash)
                         .join(ImageRow, ImageRow.id == EmbeddingRow.image_id)).all()
    db.dispose()
    return (np.array([r[0] for r in rows]), np.stack([np.frombuffer(r[1], "<f4") for r in rows]),
            [r[2] for r in rows])


@pytest.mark.parametrize("query", ["a red circle", "lateral lumbar spine", "gray noise"])
def test_text_search_equals_brute_force(engine, indexed_dir, tiny_encoder, query):
    ids, vecs, hashes = _all_vectors(indexed_dir)
    q = tiny_encoder.encode_texts([query])[0]
    sims = vecs @ q
    order, seen, expected = np.argsort(-sims, kind="stable"), set(), []
    for i in order:  # brute force, collapsing exact duplicates like the engine does
        if hashes[i] not in seen:
            seen.add(hashes[i])
            expected.append(int(ids[i]))
    hits = engine.text(query, k=5)
    assert [h.id for h in hits] == expected[:5]
    by_id = dict(zip(ids.tolist(), sims, strict=True))
    np.testing.assert_allclose([h.score for h in hits], [by_id[i] for i in expected[:5]], atol=1e-5)


def test_image_search_returns_the_image_itself_first(engine, image_dir):
    from cxrmodel.imaging.decode import load_image

    for name in ("square_green_1.png", "gray/g5.png"):
        hits = engine.image(load_image(image_dir / name), k=3)
        assert hits[0].image["file_name"] == name.split("/")[-1]
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_exact_duplicates_collapse(engine, image_dir):
    from cxrmodel.imaging.decode import load_image

    hits = engine.image(load_image(image_dir / "gray" / "g0.png"), k=10)
    names = [h.image["file_name"] for h in hits]
    assert len({h.image["content_hash"] for h in hits}) == len(hits)
    assert ("g0.png" in names) != ("g0_copy.png" in names)


def test_metadata_filters_return_only_matches_and_still_k(engine):
    filters = engine.parse_filters(["modality=CT", "view=PA"])  # 4 images: red circles and red squares
    hits = engine.text("a blue cross", k=3, filters=filters)
    assert len(hits) == 3
    assert all(h.image["modality"] == "CT" and h.image["view"] == "PA" for h in hits)
    all_ct = engine.text("anything", k=50, filters=engine.parse_filters(["modality=ct"]))
    assert len(all_ct) == 12 and {h.image["modality"] for h in all_ct} == {"CT"}


def test_score_filters(engine, indexed_dir):
    db = open_db(default_db_url(indexed_dir))
    with Session(db) as s:
        rows = s.execute(select(ScoreRow.probability, ImageRow.content_hash)
                         .join(ImageRow, ImageRow.id == ScoreRow.image_id)
                         .where(ScoreRow.pathology == "Effusion")).all()
    db.dispose()
    cut = sorted(p for p, _ in rows)[len(rows) // 2]
    expected = len({h for p, h in rows if p >= cut})  # distinct images (duplicates collapse)
    hits = engine.text("x", k=100, filters=engine.parse_filters([f"effusion>={cut}"]))
    assert len(hits) == expected > 0
    assert all(h.pathologies["Effusion"] >= cut for h in hits)
    few = engine.text("x", k=3, filters=engine.parse_filters([f"Effusion>={cut}"]))
    assert len(few) == 3


def test_filter_values_are_bound_not_interpolated(engine):
    hostile = engine.parse_filters(["modality=CT' OR '1'='1"])
    assert engine.text("x", k=10, filters=hostile) == []


def test_bad_filters_are_clear_errors(engine):
    for bad in ["nonsense", "colour=red", "effusion>=high", "effusion>=2", "modality>=3"]:
        with pytest.raises(DataError):
            engine.parse_filters([bad])


def test_label_returns_all_14_in_unit_interval(engine):
    scores = engine.label(shape_image("circle", "red", seed=3))
    assert [s.pathology for s in scores] == list(PATHOLOGIES)
    for s in scores:
        assert 0.0 <= s.probability <= 1.0 and 0.0 <= s.uncertainty <= 1.0
        assert len(s.members) == 4 * 3  # preprocessing variants x prompt sets


def test_report_impression_lists_exactly_the_findings_above_threshold(engine):
    image = shape_image("square", "green", seed=5)
    scores = engine.label(image)
    threshold = float(np.median([s.probability for s in scores]))
    report = engine.report(image, {"modality": "XR", "view": "PA"}, threshold=threshold, scores=scores)
    above = sorted((s for s in scores if s.probability >= threshold), key=lambda s: -s.probability)
    assert len(report.impression) == len(above) > 0
    names = text_for("en")["pathologies"]
    for line, s in zip(report.impression, above, strict=True):
        assert line.startswith(names[s.pathology])
    assert report.technique.startswith("XR") and "PA" in report.technique
    md = to_markdown(report)
    for section in ("Clinical information", "Technique", "Findings", "Impression", "Recommendations", "Confidence",
                    "Limitations", "Disclaimer"):
        assert f"## {section}" in md
    assert "not for clinical use" in md
    assert set(__import__("json").loads(to_json(report))) >= {"technique", "findings", "impression", "disclaimer"}


def test_no_finding_report(engine):
    image = gray_image(5, (96, 96))
    report = engine.report(image, {}, threshold=1.0)
    assert report.impression == ["No finding above threshold."]


def test_pdf_report_opens(engine):
    from pypdf import PdfReader

    report = engine.report(shape_image("cross", "blue", seed=1), {"modality": "XR"})
    pdf = to_pdf(report)
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert pdf.startswith(b"%PDF") and "Impression" in text and "Disclaimer" in text


def test_thumbnail_is_cached(engine, indexed_dir):
    hit = engine.text("a red circle", k=1)[0]
    first = engine.thumbnail(hit.id, 64)
    cached = list((indexed_dir / "thumbs").glob(f"{hit.image['content_hash']}-64.png"))
    assert first.startswith(b"\x89PNG") and len(cached) == 1
    assert engine.thumbnail(hit.id, 64) == first


def test_engine_switches_to_a_newer_index_without_restart(tmp_path, tiny_encoder, tiny_model_dir):
    from cxrmodel.model.encoder import EncoderConfig, load_encoder
    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig
    from tests.imagegen import gray_folder, gray_image
    from tests.tinymodel import save_tiny_clip

    src, data = gray_folder(tmp_path / "src", 10, prefix="a", first_seed=100), tmp_path / "data"
    run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False), tiny_encoder)
    engine = Engine.open(EngineConfig(data_dir=data, reload_interval=0.0, precision="fp32"))  # model from index
    assert engine.stats()["vectors"] == 10
    for i in range(5):
        gray_image(200 + i).save(src / f"b{i}.png")
    run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False), tiny_encoder)
    assert engine.stats()["vectors"] == 15
    assert {h.image["file_name"] for h in engine.text("x", k=15)} >= {f"b{i}.png" for i in range(5)}
    other = load_encoder(EncoderConfig(model=str(save_tiny_clip(tmp_path / "m2", seed=3)), precision="fp32"))
    run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False, rebuild=True), other)
    assert engine.generation == 2 and engine.stats()["vectors"] == 15
    assert engine.encoder.identity["model"] == other.identity["model"]  # followed the rebuild to the new model
    hits = engine.image(gray_image(201), k=1)
    assert hits[0].image["file_name"] == "b1.png" and hits[0].score == pytest.approx(1.0, abs=1e-3)
    engine.close()


def test_prompt_embeddings_are_computed_once_per_model_across_processes(tmp_path, tiny_model_dir, monkeypatch):
    """A second process (a fresh encoder object) reads the prompt bank from the data dir's cache."""
    from cxrmodel.labels.prompts import LabelConfig
    from cxrmodel.labels.zeroshot import prompt_bank
    from cxrmodel.model.encoder import EncoderConfig, load_encoder

    first = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32"))
    first.cache_dir = tmp_path / "cache"
    bank = prompt_bank(first, LabelConfig())
    assert len(list((tmp_path / "cache").glob("prompts-*.npz"))) == 1
    second = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32"))
    second.cache_dir = tmp_path / "cache"
    monkeypatch.setattr(second, "encode_texts", lambda texts: pytest.fail("prompts were encoded again"))
    again = prompt_bank(second, LabelConfig())
    np.testing.assert_array_equal(again.positive, bank.positive)
    assert again.pathologies == bank.pathologies
    other_prompts = LabelConfig(thresholds={**LabelConfig().thresholds})
    other_prompts.prompt_sets["names"] = other_prompts.prompt_sets["pairs"]  # a different prompt set
    third = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32"))
    third.cache_dir = tmp_path / "cache"
    assert prompt_bank(third, other_prompts).positive.shape == bank.positive.shape
    assert len(list((tmp_path / "cache").glob("prompts-*.npz"))) == 2
