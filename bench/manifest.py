"""Indexing a huge manifest: a first run and an unchanged rerun, time and peak memory.

    python -m bench.manifest [--rows 1000000] [--images 200]

The manifest mixes a few real images with rows whose files do not exist and a few malformed rows
(the "garbage manifest" of issue #20): what costs time and memory here is reading, planning and
recording skipped rows, not embedding. Each run is `radlens index` in its own process (the bundled
radlens-mini), so its peak RSS is the process's own (`wait4`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cpu_kind, table


def write_manifest(folder: Path, rows: int, images: int) -> Path:
    """`rows` rows: `images` real 64 px PNGs, one malformed row in 1,000, the rest missing files."""
    from tests.imagegen import gray_image

    (folder / "img").mkdir(parents=True)
    for i in range(images):
        gray_image(i, (64, 64)).save(folder / "img" / f"{i}.png")
    manifest = folder / "manifest.csv"
    with open(manifest, "w") as f:
        f.write("path,modality,view,caption,patient_id,study_date\n")
        for i in range(rows):
            if i % 1000 == 999:
                f.write(f'"unterminated,{i}\n' if i == rows - 1 else f",CR,PA,no path in this row {i},,\n")
                continue
            path = f"img/{i}.png" if i < images else f"missing/{i // 1000}/{i}.png"
            f.write(f"{path},CR,PA,caption of row {i},P{i % 50_000},2020-01-{1 + i % 28:02d}\n")
    return manifest


def run(manifest: Path, data_dir: Path, env: dict) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, last output line) of one `radlens index` process."""
    cmd = [sys.executable, "-m", "radlens", "index", str(manifest), "--data-dir", str(data_dir), "--model",
           "radlens-mini", "--no-progress"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"radlens index failed:\n{out}")
    line = next((ln for ln in reversed(out.splitlines()) if "unchanged" in ln), out.strip().splitlines()[-1])
    return seconds, usage.ru_maxrss / 1024, line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--images", type=int, default=200)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="radlens-bench-manifest-") as tmp:
        folder = Path(tmp)
        manifest = write_manifest(folder / "src", args.rows, args.images)
        env = {**os.environ, "XDG_CONFIG_HOME": str(folder / "config"),
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        rows = []
        for label in ("first run", "unchanged rerun"):
            seconds, rss, line = run(manifest, folder / "data", env)
            rows.append([label, seconds, rss, f"{args.rows / seconds:,.0f}", line])
        print(f"{args.rows:,} manifest rows ({args.images} real images), {cpu_kind()}")
        print(table(["run", "seconds", "peak RSS MB", "rows/s", "summary"], rows))


if __name__ == "__main__":
    main()
