"""Relevance verdicts: every hit says how strong it is against what unrelated content scores."""

from __future__ import annotations

import io

import numpy as np
import pytest

from search.relevance import PROBES, Baseline, build_baseline


def test_verdicts_follow_the_null():
    b = Baseline(np.array([0.1, 0.2, 0.3, 0.4]), np.sort(np.linspace(0.5, 0.99, 100)))
    assert b.text_match(0.45).verdict == "strong" and b.text_match(0.35).verdict == "weak"
    assert b.text_match(0.15).verdict == "none" and b.text_match(0.15).percentile == 0.25
    assert b.image_match(0.99).verdict == "strong" and b.image_match(0.5).verdict == "weak"
    assert b.image_match(0.2).verdict == "none"
    assert Baseline(np.array([0.1]), None).image_match(0.9).verdict == "not measured"


def test_the_baseline_is_measured_on_the_served_index(engine):
    state = engine.state()
    b = build_baseline(state.encoder, state.index, state.scorer)
    assert len(b.text_null) == len(PROBES) and list(b.text_null) == sorted(b.text_null)
    assert b.image_null is not None and len(b.image_null) > 10 and b.image_null.max() <= 1.0 + 1e-5
    hits = engine.text("a red circle", k=5)
    assert all(h.match is not None and h.match.verdict in ("strong", "weak", "none") for h in hits)
    assert all(h.to_dict()["match"]["basis"].startswith("vs the best matches") for h in hits)


@pytest.fixture
def weak_only(engine, monkeypatch):
    """A baseline under which nothing in the test index is a strong text match."""
    monkeypatch.setattr(engine, "baseline", lambda state: Baseline(np.array([2.0, 3.0]), None))
    return engine


def test_no_good_match_is_said_on_the_page_and_the_cli(weak_only, client, indexed_dir, capsys, monkeypatch):
    page = client.get("/?q=lateral+lumbar+spine").get_data(as_text=True)
    assert "No good match in this index" in page and "no match" in page and "none match" not in page
    api = client.get("/api/search?q=lateral+lumbar+spine").json
    assert {r["match"]["verdict"] for r in api["results"]} == {"none"}
    from radlens.commands import query

    monkeypatch.setattr(query, "open_engine", lambda args: weak_only)
    monkeypatch.setattr(weak_only, "close", lambda: None)  # the session's engine stays open
    from radlens.cli import main

    assert main(["search", "lateral lumbar spine", "--data-dir", str(indexed_dir)]) == 0
    out = capsys.readouterr().out
    assert "no good match in this index" in out and "[no match]" in out
    assert main(["search", "lateral lumbar spine", "--min-match", "weak", "--data-dir", str(indexed_dir)]) == 0
    assert "no results at --min-match weak" in capsys.readouterr().out


def test_an_upload_that_is_not_a_radiological_image_gets_no_good_match(engine, client, monkeypatch):
    """Whatever its scores, a photograph, noise or a page of text has no similar cases: every hit of the
    API, the upload page and the engine says "none" and why; a radiograph-like upload keeps its verdicts."""
    from PIL import Image

    from tests.imagegen import gray_image, png_bytes

    monkeypatch.setattr(engine, "baseline", lambda state: Baseline(np.array([0.1]), np.array([-2.0, -1.0])))
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), mode="RGB")
    hits = engine.image(noise, k=4)
    assert hits and {h.match.verdict for h in hits} == {"none"}
    assert all("not a radiological image" in h.match.basis for h in hits)
    assert {h.match.verdict for h in engine.image(gray_image(4, (128, 96)), k=4)} == {"strong"}

    r = client.post("/api/similar", data={"image": (io.BytesIO(png_bytes(noise)), "noise.png"), "k": "3"},
                    content_type="multipart/form-data")
    assert r.status_code == 200 and {x["match"]["verdict"] for x in r.json["results"]} == {"none"}
    page = client.post("/upload", data={"image": (io.BytesIO(png_bytes(noise)), "noise.png")},
                       content_type="multipart/form-data").get_data(as_text=True)
    assert "No good match in this index" in page and "not similar cases" in page
