"""Memory of `radlens serve --workers N`: do the workers share one copy of the index?

    python -m bench.serve_memory [--vectors 500000] [--workers 1,2,4]

Builds a data dir with N synthetic 512-d vectors (exact Flat index, 2 KB each) and the ViT-B/32
architecture as its model, starts `radlens serve --workers W` for each W, sends a few queries to every
worker, and reads each worker's RSS and PSS (proportional set size: shared pages divided among the
processes that map them) from /proc. Shared mapping shows as a total PSS that grows by the model and
Python per worker, not by the index.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import cpu_kind, free_port, table
from bench.models import vit_b32_dir
from bench.query import build, clustered_vectors, make_data_dir


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key] = int(value.split()[0]) * 1024
    return out


def measure(data: Path, model: Path, workers: int) -> dict:
    """Total and per-worker RSS/PSS of a warm `radlens serve --workers W`."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "radlens", "serve", "--data-dir", str(data), "--model",
                               str(model), "--workers", str(workers), "--threads", "2", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pids: set[str] = set()
        deadline = time.time() + 300
        query = urllib.parse.quote("lateral chest radiograph")

        def ask(_):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/search?q={query}&k=10", timeout=60) as r:
                r.read()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=60) as r:
                return r.headers["X-RadLens-Worker"], json.loads(r.read())
        while len(pids) < workers and time.time() < deadline:
            try:
                with ThreadPoolExecutor(2 * workers) as pool:
                    pids.update(pid for pid, _ in pool.map(ask, range(4 * workers)))
            except OSError:
                time.sleep(1)
        stats = [_rollup(int(p)) for p in pids]
        return {"workers": len(pids), "rss": sum(s["Rss"] for s in stats), "pss": sum(s["Pss"] for s in stats)}
    finally:
        server.terminate()
        server.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vectors", type=int, default=500_000)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--out", type=Path, default=Path("bench-out/serve-memory"))
    args = p.parse_args(argv)
    print(f"CPU: {cpu_kind()}")  # every speed figure names the machine kind it was measured on
    model = vit_b32_dir(args.out.parent / "indexing" / "vit-b32")
    data = args.out / "data"
    index, _ = build(clustered_vectors(args.vectors, seed=0), "Flat")
    make_data_dir(data, args.vectors, index, "Flat", None)
    del index
    index_mb = (data / "index" / "g1.faiss").stat().st_size / 2**20
    rows = []
    for w in [int(x) for x in args.workers.split(",")]:
        m = measure(data, model, w)
        rows.append([w, m["workers"], m["rss"] / 2**20, m["pss"] / 2**20, m["pss"] / 2**20 / max(1, m["workers"])])
    print(f"{args.vectors:,} vectors, Flat index file {index_mb:.0f} MB, ViT-B/32 architecture")
    print(table(["--workers", "answering", "sum RSS MB", "sum PSS MB", "PSS MB per worker"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
