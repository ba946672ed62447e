"""Server memory under a burst of huge uploads: 8 concurrent `/api/label` posts of a 9400 x 9400 PNG.

    python -m bench.upload_memory [--uploads 8] [--side 9400] [--heavy 2,8]

Indexes the bundled sample images with the bundled model (radlens-mini), then for each
`--heavy-requests` value starts `radlens serve`, posts the same large RGB PNG `--uploads` times at
once, and reads the server's peak resident memory (VmHWM) from /proc, with the answers' status codes
and the wall time of the burst. The default bound (2 heavy requests at a time) is measured beside
8, i.e. no effective bound for this burst, in the same run.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import cpu_kind, free_port, table

ROOT = Path(__file__).resolve().parents[1]


def big_png(side: int) -> bytes:
    """An RGB film-like PNG of side x side pixels (smooth, so it stays under the upload limit)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    gray = (128 + 60 * np.sin(6 * x) * np.cos(4 * y) + 40 * (x - y)).clip(0, 255).astype(np.uint8)
    rgb = np.stack([gray, gray, (gray // 2 + 64).astype(np.uint8)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _post(port: int, data: bytes) -> int:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/label", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def burst(data_dir: Path, png: bytes, uploads: int, heavy: int) -> dict:
    """Peak RSS, statuses and wall time of `uploads` concurrent label posts to a fresh server."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "radlens", "serve", "--data-dir", str(data_dir), "--port",
                               str(port), "--threads", str(uploads), "--heavy-requests", str(heavy)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        idle = _peak_rss(server.pid)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(uploads) as pool:
            statuses = Counter(pool.map(lambda _: _post(port, png), range(uploads)))
        return {"idle": idle, "peak": _peak_rss(server.pid), "statuses": statuses, "seconds": time.perf_counter() - t0}
    finally:
        server.terminate()
        server.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--uploads", type=int, default=8)
    p.add_argument("--side", type=int, default=9400)
    p.add_argument("--heavy", default="2,8", help="--heavy-requests values to compare")
    p.add_argument("--out", type=Path, default=Path("bench-out/upload-memory"))
    args = p.parse_args(argv)
    print(f"CPU: {cpu_kind()}")  # every speed figure names the machine kind it was measured on
    data_dir = args.out / "data"
    if not (data_dir / "radlens.db").exists():
        subprocess.run([sys.executable, "-m", "radlens", "index", str(ROOT / "radlens" / "samples"), "--data-dir",
                        str(data_dir), "--model", "radlens-mini"], check=True, cwd=ROOT)
    png = big_png(args.side)
    print(f"upload: {args.side} x {args.side} RGB PNG, {len(png) / 2**20:.1f} MB "
          f"({args.side * args.side * 3 / 2**20:.0f} MB decoded); {args.uploads} concurrent /api/label posts")
    rows = []
    for heavy in [int(h) for h in args.heavy.split(",")]:
        r = burst(data_dir, png, args.uploads, heavy)
        codes = ", ".join(f"{n}x{code}" for code, n in sorted(r["statuses"].items()))
        rows.append([heavy, r["idle"] / 2**20, r["peak"] / 2**20, codes, r["seconds"]])
    print(table(["--heavy-requests", "idle RSS MB", "peak RSS MB", "answers", "burst s"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
