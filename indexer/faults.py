"""Fault injection for tests: kill the indexer at a named phase, to prove that resuming is safe.

`RADLENS_FAULT=PHASE` (or `PHASE:N`, the Nth time it is reached) sends the process SIGKILL at that
point, as a power cut would. Off unless the variable is set; each check is one environment lookup.

Phases, in the order a run meets them: `decode` (a file was decoded), `embed` (a batch was embedded),
`commit` (a chunk's rows are written, its transaction not yet committed), `faiss-write` (the new FAISS
file is written, not yet renamed into place), `meta-write` (likewise its meta file), `swap` (the new
generation is being activated, not yet committed), `prune` (vanished files' rows deleted, not yet
committed).
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "RADLENS_FAULT"
PHASES = ("decode", "embed", "commit", "faiss-write", "meta-write", "swap", "prune")
_reached: dict[str, int] = {}


def checkpoint(phase: str) -> None:
    """Die here (SIGKILL) when `RADLENS_FAULT` names this phase and its count is reached."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != phase:
        return
    _reached[phase] = _reached.get(phase, 0) + 1
    if _reached[phase] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
