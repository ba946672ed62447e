"""Cold wall time of `radlens search` (a fresh process, as a user at a terminal runs it) next to a bare
`python -c "import torch"`, measured alternately in one run.

    python -m bench.cli [--repeat 7] [--out bench-out/cli]

Two indexes: the demo's (the 72 sample images with the bundled radlens-mini) and the same images with the
real ViT-B/32 architecture (random weights: its text tower is the real model's size, 250 MB as ONNX). Each
is searched through its ONNX query tower (the default) and with `--no-query-tower` (torch, transformers,
peft). Page cache warm (the first, discarded round reads the files once); medians over `--repeat` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import cpu_kind, table

ROOT = Path(__file__).resolve().parents[1]
QUERY = "lateral lumbar spine"


def wall(cmd: list[str]) -> float:
    """Seconds from start to exit of `cmd` (which must succeed)."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return seconds


def radlens(*args: str) -> list[str]:
    return [sys.executable, "-m", "radlens", *args]


def build_indexes(out: Path) -> dict[str, Path]:
    """The demo index (radlens-mini) and a ViT-B/32 index of the same samples (built once, then reused)."""
    from bench.models import vit_b32_dir

    samples = ROOT / "radlens" / "samples" / "manifest.csv"
    indexes = {"demo (radlens-mini)": (out / "demo", "radlens-mini"),
               "ViT-B/32 (random weights)": (out / "vitb32", str(vit_b32_dir(out / "vitb32-model")))}
    for data, model in indexes.values():
        if not (data / "radlens.db").exists():
            subprocess.run(radlens("index", str(samples), "--model", model, "--data-dir", str(data), "--no-progress"),
                           cwd=ROOT, check=True)
    return {name: data for name, (data, _) in indexes.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench-out/cli"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    indexes = build_indexes(args.out)

    commands = {"python -c 'import torch'": [sys.executable, "-c", "import torch"],
                "python -c 'import torch; from transformers import CLIPModel'":
                    [sys.executable, "-c", "import torch; from transformers import CLIPModel"]}
    for name, data in indexes.items():
        commands[f"radlens search, {name}"] = radlens("search", QUERY, "--data-dir", str(data))
        commands[f"radlens search --no-query-tower, {name}"] = radlens("search", QUERY, "--data-dir", str(data),
                                                                       "--no-query-tower")
    times: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(args.repeat + 1):  # alternating, so drift hits every command alike
        for name, cmd in commands.items():
            seconds = wall(cmd)
            if round_:
                times[name].append(seconds)

    torch_import = statistics.median(times["python -c 'import torch'"])
    print(f"CPU: {cpu_kind()}")
    print(f"cold wall time (fresh process, warm page cache), median of {args.repeat}; query {QUERY!r}\n")
    print(table(["command", "median s", "min s", "max s", "x import torch"],
                [[name, statistics.median(t), min(t), max(t), statistics.median(t) / torch_import]
                 for name, t in times.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
