"""Small helpers shared by the bench entry points: timing, tables, the shared folder."""

from __future__ import annotations

import os
import socket
import statistics
import time
from pathlib import Path

SHARED = Path(os.environ.get("RADLENS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
VIT_B32 = SHARED / "models" / "clip-vit-base-patch32-config"
CORPUS = SHARED / "corpus"


def require(path: Path, what: str) -> Path:
    """Exit with a clear message when a shared input is missing."""
    if not path.exists():
        raise SystemExit(f"{what} not found at {path} (set RADLENS_SHARED to the shared folder)")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def timed(fn, *args, repeat: int = 1, **kwargs):
    """(result of the last call, median seconds over `repeat` calls)."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def cpu_kind() -> str:
    """The CPU this bench ran on, as a speed figure needs it named: model name and the instruction sets
    that decide bf16/int8 speed (AMX, AVX-512 BF16, AVX-512 VNNI), from /proc/cpuinfo; cores as seen."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    features = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"),
                                        ("avx512_vnni", "AVX-512 VNNI")) if flag in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores, {' + '.join(features) or 'no AMX/AVX-512 BF16/VNNI'}"
