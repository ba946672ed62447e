"""Offline first run: the bundled radlens-mini model and sample images, and `radlens demo`."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from cxrmodel.hashing import file_sha256
from cxrmodel.model.bundled import bundled_model_dir
from cxrmodel.model.dualencoder import WEIGHTS, read_manifest
from radlens.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "radlens" / "samples"


def test_shipped_weights_match_the_model_card_and_load():
    from cxrmodel.model.encoder import EncoderConfig, load_encoder

    mini = bundled_model_dir()
    sha = file_sha256(mini / WEIGHTS)
    assert read_manifest(mini)["weights_sha256"] == sha
    card = (mini / "MODEL_CARD.md").read_text()
    assert sha in card and "python -m bench.quality" in card and "not for clinical use" in card.lower()
    encoder = load_encoder(EncoderConfig(model="radlens-mini"))
    vecs = encoder.encode_texts(["lateral chest radiograph", "MRI of the brain"])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert encoder.model_name == str(mini)


def test_bundled_files_stay_small():
    mini = sum(p.stat().st_size for p in bundled_model_dir().rglob("*") if p.is_file())
    samples = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert (mini + samples) < 35e6 and mini < 25e6 + 2e6 and samples < 5e6


def test_samples_cover_every_modality_and_view_with_licences():
    with open(SAMPLES / "manifest.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert 60 <= len(rows) <= 100
    kinds = {(r["modality"], r["view"]) for r in rows}
    assert {("X-ray", "PA"), ("X-ray", "AP"), ("X-ray", "AP supine"), ("X-ray", "lateral"), ("CT", "axial"),
            ("CT", "coronal"), ("MRI", "")} <= kinds
    licences = (SAMPLES / "LICENSES.md").read_text()
    for r in rows:
        assert (SAMPLES / r["file"]).exists() and r["file"] in licences


def test_demo_runs_offline_and_second_run_embeds_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "demo"
    assert main(["demo", "--no-serve", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"== index: added (\d+)", out).group(1) == str(len(list((SAMPLES / "images").iterdir())))
    text_part = out.split("== text search")[1].split("== similar")[0]
    assert len(re.findall(r"^\s+\d+\. ", text_part, re.M)) == 5
    similar = out.split("== similar cases")[1].split("== report")[0]
    first = re.findall(r"^\s+1\. (\S+)\s+(\S+)", similar, re.M)[0]
    assert float(first[0]) == pytest.approx(1.0, abs=1e-3)  # the query image is in the index
    for section in ("## Technique", "## Impression", "## Disclaimer"):
        assert section in out
    assert main(["demo", "--no-serve", "--data-dir", str(data)]) == 0
    again = capsys.readouterr().out
    assert "added 0, updated 0" in again and "(0.0 img/s" in again


def test_missing_hub_model_names_the_offline_choice(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RADLENS_MODEL", raising=False)
    (tmp_path / "imgs").mkdir()
    assert main(["index", str(tmp_path / "imgs"), "--data-dir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "openai/clip-vit-base-patch32" in err and "radlens-mini" in err
