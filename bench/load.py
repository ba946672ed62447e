"""Bounded load test on loopback: concurrent clients against search and label while the index grows.

    python -m bench.load [--clients 50] [--seconds 30] [--out bench-out/load]

Indexes the sample images with radlens-mini, starts `radlens serve` (waitress) in its own process, runs
N client threads for the given time (80% text search, 20% label uploads), and meanwhile runs
`radlens index` on more images into the same data dir. Reports errors, p50/p95 latency per route, and
the index size the server reports before and after the concurrent run (it must switch without restart).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from bench.common import CORPUS, cpu_kind, free_port, table

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "radlens" / "samples"
QUERIES = ["lateral chest radiograph", "axial CT of the chest", "MRI of the brain", "pleural effusion",
           "AP supine chest x-ray", "coronal CT", "cardiomegaly", "brain tumour"]


def multipart(path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def health(base: str) -> dict:
    with urllib.request.urlopen(base + "/api/health", timeout=30) as r:
        return json.loads(r.read())


def client(base: str, stop: float, images: list[Path], results: list, seed: int) -> None:
    rng = random.Random(seed)
    while time.perf_counter() < stop:
        label = rng.random() < 0.2
        try:
            if label:
                body, ctype = multipart(rng.choice(images))
                req = urllib.request.Request(base + "/api/label", data=body, headers={"Content-Type": ctype})
            else:
                q = urllib.parse.quote(rng.choice(QUERIES))
                req = urllib.request.Request(f"{base}/api/search?q={q}&k=10")
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()
                status = r.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError:
            status = 0
        results.append(("label" if label else "search", status, time.perf_counter() - t0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench-out/load"))
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_kind()}")  # every speed figure names the machine kind it was measured on
    data = args.out / "data"
    if data.exists():
        shutil.rmtree(data)
    radlens = [sys.executable, "-m", "radlens"]
    subprocess.run(radlens + ["index", str(SAMPLES / "manifest.csv"), "--data-dir", str(data), "--model",
                              "radlens-mini", "--no-progress"], check=True)
    extra = args.out / "extra"
    if extra.exists():
        shutil.rmtree(extra)
    extra.mkdir(parents=True)
    for path in sorted((CORPUS / "images" / "nih").glob("*.png"))[:150]:
        shutil.copy2(path, extra / path.name)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(radlens + ["serve", "--data-dir", str(data), "--port", str(port), "--threads", "8"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):
            try:
                before = health(base)
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise SystemExit("server did not start")
        images = sorted((SAMPLES / "images").iterdir())
        results: list = []
        stop = time.perf_counter() + args.seconds
        threads = [threading.Thread(target=client, args=(base, stop, images, results, i)) for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(min(5, args.seconds / 4))
        t0 = time.perf_counter()
        indexer = subprocess.run(radlens + ["index", str(extra), "--data-dir", str(data), "--model", "radlens-mini",
                                            "--no-progress"], capture_output=True, text=True)
        index_s = time.perf_counter() - t0
        for t in threads:
            t.join()
        time.sleep(1.5)
        after = health(base)
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = []
    for route in ("search", "label"):
        lat = sorted(r[2] * 1000 for r in results if r[0] == route)
        errors = sum(1 for r in results if r[0] == route and r[1] != 200)
        if lat:
            rows.append([route, len(lat), errors, statistics.median(lat), lat[int(0.95 * (len(lat) - 1))]])
    print(f"{args.clients} clients for {args.seconds:.0f} s on loopback, server: waitress, 8 threads")
    print(table(["route", "requests", "errors", "p50 ms", "p95 ms"], rows))
    print(f"concurrent `radlens index` of {len(list(extra.iterdir()))} images: exit {indexer.returncode} in "
          f"{index_s:.1f} s; {indexer.stdout.strip().splitlines()[-1] if indexer.stdout.strip() else ''}")
    print(f"server index size: {before['vectors']} vectors before, {after['vectors']} after (no restart)")
    return 0 if all(r[2] == 0 for r in rows) and after["vectors"] > before["vectors"] else 1


if __name__ == "__main__":
    sys.exit(main())
