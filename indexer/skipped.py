"""The files an index run could not use, and why: read from the `skipped` table for people."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .store import SkippedRow


@dataclass(frozen=True)
class Skipped:
    """One skipped file (or manifest row, `manifest.csv:12`) and its reason."""

    path: str
    kind: str
    reason: str

    @property
    def cause(self) -> str:
        """The reason without the file's own name in front, so that files with one cause group together."""
        prefix = Path(self.path).name + ": "
        return self.reason[len(prefix):] if self.reason.startswith(prefix) else self.reason


def skipped_files(db: Engine, limit: int | None = None) -> list[Skipped]:
    """Skipped files and manifest rows in path order (the first `limit`, or all)."""
    query = select(SkippedRow.path, SkippedRow.kind, SkippedRow.reason).order_by(SkippedRow.path)
    with Session(db) as session:
        return [Skipped(*row) for row in session.execute(query.limit(limit) if limit else query)]


def skipped_count(db: Engine) -> int:
    """How many files and manifest rows are skipped now."""
    with Session(db) as session:
        return int(session.scalar(select(func.count()).select_from(SkippedRow)) or 0)


def summary_lines(db: Engine, first: int = 10) -> list[str]:
    """A count per cause and the first `first` skipped paths; [] when nothing is skipped."""
    everything = skipped_files(db)
    if not everything:
        return []
    lines = [f"{len(everything)} files or manifest rows are skipped:"]
    lines += [f"  {n:>6}  {cause}" for cause, n in Counter(s.cause for s in everything).most_common()]
    lines += [f"  {s.path}: {s.cause}" for s in everything[:first]]
    if len(everything) > first:
        lines.append(f"  ... `radlens check --skipped` lists all {len(everything)}")
    return lines
