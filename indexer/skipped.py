"""The files an index run could not use, and why: read from the `skipped` table for people."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

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
        """The reason without the file's own name in front."""
        return cause_of(self.reason)


def skipped_files(db: Engine, limit: int | None = None) -> Iterator[Skipped]:
    """Skipped files and manifest rows in path order (the first `limit`, or all), streamed from the DB."""
    query = select(SkippedRow.path, SkippedRow.kind, SkippedRow.reason).order_by(SkippedRow.path)
    with Session(db) as session:
        rows = session.execute((query.limit(limit) if limit else query).execution_options(yield_per=5_000))
        for row in rows:
            yield Skipped(*row)


def stale_paths(session: Session) -> set[str]:
    """Indexed files a run found changed into something that does not decode: their rows hold earlier content."""
    return set(session.scalars(select(SkippedRow.path).where(SkippedRow.kind == "changed")))


def skipped_count(db: Engine) -> int:
    """How many files and manifest rows are skipped now."""
    with Session(db) as session:
        return int(session.scalar(select(func.count()).select_from(SkippedRow)) or 0)


MAX_CAUSES = 20  # causes listed one by one; the rest are counted together


def cause_of(reason: str) -> str:
    """A reason without a leading file name (`x.png: corrupt image` -> `corrupt image`), so that files
    with one cause group together. A name is a first word with no space, ended by ': '."""
    head, sep, rest = reason.partition(": ")
    return rest if sep and head and " " not in head else reason


def summary_lines(db: Engine, first: int = 10) -> list[str]:
    """A count per cause and the first `first` skipped paths; [] when nothing is skipped. The counting
    is a GROUP BY in the database, so a run that skipped a million rows is summed up in a second."""
    with Session(db) as session:
        grouped = session.execute(select(SkippedRow.reason, func.count()).group_by(SkippedRow.reason)
                                  .execution_options(yield_per=5_000))
        causes: Counter[str] = Counter()
        for reason, n in grouped:
            causes[cause_of(reason)] += n
    total = sum(causes.values())
    if not total:
        return []
    lines = [f"{total} files or manifest rows are skipped:"]
    top = causes.most_common(MAX_CAUSES)
    lines += [f"  {n:>6}  {cause}" for cause, n in top]
    if rest := total - sum(n for _, n in top):
        lines.append(f"  {rest:>6}  (other causes)")
    lines += [f"  {s.path}: {s.cause}" for s in skipped_files(db, limit=first)]
    if total > first:
        lines.append(f"  ... `radlens check --skipped` lists all {total}")
    return lines
