"""Kill `radlens index` at every named phase (indexer/faults.py), resume, and get exactly what an
uninterrupted run gives: the same rows, vectors, scores, applicability decisions and skipped files,
a `check` that passes, and no temporary files left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.check import check_data_dir
from indexer.faults import FAULT_ENV, PHASES
from indexer.pipeline import IndexJob, run_index
from indexer.store import default_db_url
from tests.databases import fetch
from tests.imagegen import gray_folder

GONE = ("g3.png", "g11.png", "g17.png")  # deleted before the second (pruning) run
WHERE = {"decode": "decode:10", "embed": "embed:2", "commit": "commit:2", "faiss-write": "faiss-write",
         "meta-write": "meta-write", "swap": "swap", "prune": "prune"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = gray_folder(tmp_path_factory.mktemp("fault-src") / "src", 20)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a skipped file
    return src


def _job(src: Path, data: Path, prune: bool = False) -> IndexJob:
    return IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False, chunk_size=8, prune=prune)


def _killed_run(src: Path, data: Path, model: Path, fault: str, prune: bool = False) -> None:
    """`radlens index` in a child process, killed by SIGKILL at `fault`."""
    cmd = [sys.executable, "-m", "radlens", "index", str(src), "--data-dir", str(data), "--model", str(model),
           "--precision", "fp32", "--workers", "0", "--chunk-size", "8", "--batch-size", "4", "--no-progress",
           *(["--prune"] if prune else [])]
    env = {**os.environ, FAULT_ENV: fault, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, f"{fault} was never reached:\n{result.stderr[-2000:]}"


def _snapshot(data: Path) -> dict:
    """Everything a run leaves in the DB, keyed by file name (ids may differ between runs)."""
    url = default_db_url(data)
    name = {i: Path(p).name for i, p in fetch(url, "select id, path from images")}
    return {
        "images": sorted((Path(p).name, h) for p, h in fetch(url, "select path, content_hash from images")),
        "vectors": {name[i]: np.frombuffer(v, "<f4") for i, v in fetch(url, "select image_id, vector from embeddings")},
        "scores": {(name[i], p): s for i, p, s in fetch(url, "select image_id, pathology, probability from scores")},
        "applicability": {name[i]: (a, s, k) for i, a, s, k in
                          fetch(url, "select image_id, applicable, source, kind from applicability")},
        "skipped": sorted((Path(p).name, r) for p, r in fetch(url, "select path, reason from skipped")),
        "generations": fetch(url, "select count(*), sum(case when active then 1 else 0 end) from generations"),
    }


def _two_runs(src: Path, data: Path, encoder, model: Path, fault: str | None) -> dict:
    """Index `src`, delete GONE, index again with --prune; `fault` kills (then resumes) one of the runs."""
    phase = fault.split(":")[0] if fault else None
    if fault and phase != "prune":
        _killed_run(src, data, model, fault)
    run_index(_job(src, data), encoder)
    for name in GONE:
        (src / name).unlink()
    if phase == "prune":
        _killed_run(src, data, model, fault, prune=True)
    run_index(_job(src, data, prune=True), encoder)
    assert check_data_dir(data, default_db_url(data)).ok
    assert not [p for p in data.rglob("*") if ".tmp" in p.name]  # nothing half-written is left behind
    return _snapshot(data)


@pytest.fixture(scope="module")
def reference(source, tiny_encoder, tiny_model_dir, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("fault-ref")
    shutil.copytree(source, work / "src")
    return _two_runs(work / "src", work / "data", tiny_encoder, tiny_model_dir, None)


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_a_run_killed_at_any_phase_then_resumed_equals_an_uninterrupted_one(phase, source, reference, tiny_encoder,
                                                                           tiny_model_dir, tmp_path):
    shutil.copytree(source, tmp_path / "src")
    got = _two_runs(tmp_path / "src", tmp_path / "data", tiny_encoder, tiny_model_dir, WHERE[phase])
    for key in ("images", "scores", "applicability", "skipped", "generations"):
        if key == "scores":
            assert got[key].keys() == reference[key].keys()
            np.testing.assert_allclose([got[key][k] for k in sorted(got[key])],
                                       [reference[key][k] for k in sorted(reference[key])], atol=1e-5)
        else:
            assert got[key] == reference[key], key
    assert got["vectors"].keys() == reference["vectors"].keys() and len(got["vectors"]) == 20 - len(GONE)
    for name, vector in reference["vectors"].items():
        np.testing.assert_allclose(got["vectors"][name], vector, atol=1e-5)


def test_faults_are_off_unless_asked_for(monkeypatch):
    from indexer import faults

    monkeypatch.delenv(FAULT_ENV, raising=False)
    for phase in PHASES:
        faults.checkpoint(phase)  # returns: nothing asked for
    monkeypatch.setenv(FAULT_ENV, "embed:3")
    faults.checkpoint("decode")  # another phase: returns
