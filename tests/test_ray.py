"""`radlens index --engine ray` on a real local Ray cluster: a head node and a second node process.

Both nodes listen on this machine only and require a token (RAY_AUTH_MODE=token), as a real
cluster should. Skipped when Ray is not installed (`pip install 'radlens[ray]'`).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

pytest.importorskip("ray.data")

from indexer.check import check_data_dir  # noqa: E402
from indexer.pipeline import IndexJob, run_index  # noqa: E402
from indexer.store import EmbeddingRow, ImageRow, ScoreRow, default_db_url, open_db  # noqa: E402
from tests.databases import fetch  # noqa: E402
from tests.imagegen import gray_image  # noqa: E402
from tests.servers import free_port  # noqa: E402

pytestmark = pytest.mark.slow
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """(address, environment with its token) of a two-node Ray cluster started for these tests."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    port = free_port()
    node = ["--node-ip-address=127.0.0.1", "--object-store-memory=200000000", "--disable-usage-stats"]
    subprocess.run([*RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    *node], check=True, env=env, capture_output=True)
    try:
        subprocess.run([*RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", *node], check=True, env=env,
                       capture_output=True)
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([*RAY, "stop", "--force"], env=env, capture_output=True)


@pytest.fixture(scope="module")
def thousand_images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ray-src")
    for i in range(1000):
        (d / f"p{i // 100}").mkdir(exist_ok=True)
        gray_image(20_000 + i).save(d / f"p{i // 100}" / f"img{i:04d}.png")
    (d / "p0" / "broken.png").write_text("not an image")
    return d


def _rows(data: Path) -> dict[str, tuple]:
    db = open_db(default_db_url(data))
    with Session(db) as s:
        rows = {Path(r.ImageRow.path).name: (r.ImageRow.id, r.ImageRow.content_hash, r.ImageRow.width,
                                             r.ImageRow.height, r.vector)
                for r in s.execute(select(ImageRow, EmbeddingRow.vector)
                                   .join(EmbeddingRow, EmbeddingRow.image_id == ImageRow.id))}
        scores = s.execute(select(ScoreRow.image_id, ScoreRow.pathology, ScoreRow.probability)).all()
    db.dispose()
    return rows, {(i, p): v for i, p, v in scores}


def _radlens_index_on_ray(cluster, model: Path, src: Path, data: Path, *extra: str) -> list[str]:
    address, _ = cluster
    return [sys.executable, "-m", "radlens", "index", str(src), "--data-dir", str(data), "--model", str(model),
            "--precision", "fp32", "--no-progress", "--engine", "ray", "--ray-address", address, *extra]


def test_ray_engine_equals_one_process_run(ray_cluster, thousand_images, tmp_path, tiny_encoder, tiny_model_dir):
    local = run_index(IndexJob(sources=[str(thousand_images)], data_dir=tmp_path / "local", workers=0,
                               progress=False), tiny_encoder)
    assert (local.added, local.skipped) == (1000, 1)
    cmd = _radlens_index_on_ray(ray_cluster, tiny_model_dir, thousand_images, tmp_path / "ray",
                                "--ray-actors", "2", "--chunk-size", "128", "--ray-slice", "400")  # 3 slices
    out = subprocess.run(cmd, env=ray_cluster[1], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _summary(out.stdout).startswith("added 1000, updated 0, unchanged 0, skipped 1"), out.stdout
    (want, want_scores), (got, got_scores) = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert want.keys() == got.keys() and len(got) == 1000
    a = np.stack([np.frombuffer(want[k][4], "<f4") for k in sorted(want)])
    b = np.stack([np.frombuffer(got[k][4], "<f4") for k in sorted(want)])
    assert np.min(np.sum(a * b, axis=1)) >= 0.999
    assert all(want[k][:4] == got[k][:4] for k in want)  # same ids, hashes, sizes
    assert want_scores.keys() == got_scores.keys()
    assert max(abs(want_scores[k] - got_scores[k]) for k in want_scores) < 1e-3
    assert check_data_dir(tmp_path / "ray", default_db_url(tmp_path / "ray")).ok
    again = subprocess.run(cmd, env=ray_cluster[1], capture_output=True, text=True, timeout=300)
    assert _summary(again.stdout).startswith("added 0, updated 0, unchanged 1000"), again.stdout


def _ray_worker_pids(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and name in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_killed_ray_worker_loses_and_duplicates_nothing(ray_cluster, thousand_images, tmp_path, tiny_model_dir):
    data = tmp_path / "killed"
    url = default_db_url(data)
    job = subprocess.Popen(_radlens_index_on_ray(ray_cluster, tiny_model_dir, thousand_images, data,
                                                 "--ray-actors", "2", "--chunk-size", "50"),
                           env=ray_cluster[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = []
    deadline = time.time() + 240
    while job.poll() is None and not killed and time.time() < deadline:
        try:
            written = fetch(url, "select count(*) from embeddings")[0][0]
        except Exception:
            written = 0
        victims = _ray_worker_pids("EmbedActor")
        if written >= 50 and victims:  # one chunk committed, the rest still to come
            os.kill(victims[0], signal.SIGKILL)
            killed.append(victims[0])
        time.sleep(0.05)
    out, err = job.communicate(timeout=300)
    assert killed, "the job ended before a worker could be killed"
    assert job.returncode == 0, err[-3000:]
    assert _summary(out).startswith("added 1000, updated 0, unchanged 0, skipped 1"), out
    paths = [p for (p,) in fetch(url, "select path from images")]
    assert len(paths) == len(set(paths)) == 1000
    assert fetch(url, "select count(*), count(distinct image_id) from embeddings") == [(1000, 1000)]
    report = check_data_dir(data, url)
    assert report.ok and report.vectors == 1000, report.lines()


def _summary(stdout: str) -> str:
    """The run's summary line in `radlens index` output (the query tower's line follows it)."""
    return next(line for line in stdout.splitlines() if line.startswith("added "))
