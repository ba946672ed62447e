"""`radlens serve --workers N`: several gunicorn processes share the mapped index and follow a re-index."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from indexer.pipeline import IndexJob, run_index
from tests.imagegen import gray_folder
from tests.servers import radlens_server

pytest.importorskip("gunicorn")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("on_backend")]


def _health(port: int) -> tuple[str, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=10) as r:
        return r.headers["X-RadLens-Worker"], json.loads(r.read())


def _worker_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(c) for c in children]


def test_workers_share_the_mapped_index_and_pick_up_a_new_one(tmp_path, tiny_encoder):
    src = gray_folder(tmp_path / "src", 30)
    data = tmp_path / "data"
    run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False), tiny_encoder)
    with radlens_server(data, tmp_path / "serve.log", "--workers", "2", "--threads", "2") as (server, url):
        port = int(url.rsplit(":", 1)[1])
        workers = _worker_pids(server.pid)
        assert len(workers) == 2
        seen: dict[str, dict] = {}
        deadline = time.time() + 90
        while len(seen) < 2 and time.time() < deadline:  # both booted: concurrent requests reach both
            with ThreadPoolExecutor(8) as pool:
                seen.update(pool.map(lambda _: _health(port), range(16)))
            time.sleep(0.2)
        assert set(seen) == {str(p) for p in workers}
        for pid in workers:  # each worker maps the index file instead of holding a private copy
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert str(data / "index" / "g1.faiss") in maps, f"worker {pid} does not map the index"
        assert all(h["vectors"] == 30 for h in seen.values())

        gray_folder(tmp_path / "more", 10, prefix="m")
        run_index(IndexJob(sources=[str(src), str(tmp_path / "more")], data_dir=data, workers=0, progress=False),
                  tiny_encoder)
        updated: set[str] = set()
        deadline = time.time() + 60
        while len(updated) < 2 and time.time() < deadline:
            with ThreadPoolExecutor(8) as pool:
                for pid, h in pool.map(lambda _: _health(port), range(16)):
                    if h["vectors"] == 40:
                        updated.add(pid)
            time.sleep(0.2)
        assert updated == {str(p) for p in workers}, "every worker serves the new index without a restart"
