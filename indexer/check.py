"""`radlens check`: do the DB rows and the served FAISS index agree one to one?"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from .dicomweb import is_dicomweb
from .skipped import stale_paths
from .store import EmbeddingRow, ImageRow, active_generation, open_db
from .vectors import index_ids, read_index


@dataclass
class CheckReport:
    """Differences between the metadata DB and the FAISS index of the active generation."""

    generation: int | None = None
    rows: int = 0
    vectors: int = 0
    missing_in_index: list[int] = field(default_factory=list)
    missing_in_db: list[int] = field(default_factory=list)
    images_without_vector: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what serves text queries; not drift

    @property
    def ok(self) -> bool:
        return not (self.missing_in_index or self.missing_in_db or self.images_without_vector or self.problems)

    def lines(self) -> list[str]:
        """Human-readable result, first line a verdict."""
        out = [f"{'OK' if self.ok else 'DRIFT'}: generation {self.generation}, "
               f"{self.rows} embedded rows, {self.vectors} index vectors"]
        out += self.problems + self.notes
        for label, ids in (("in DB but not in index", self.missing_in_index),
                           ("in index but not in DB", self.missing_in_db),
                           ("images without a vector", self.images_without_vector)):
            if ids:
                out.append(f"{len(ids)} ids {label}: {ids[:10]}{' ...' if len(ids) > 10 else ''}")
        return out


def check_data_dir(data_dir: str | Path, db_url: str) -> CheckReport:
    """Compare the active generation's DB rows with its FAISS file."""
    report = CheckReport()
    db = open_db(db_url, create=False)
    try:
        with Session(db) as session:
            gen = active_generation(session)
            if gen is None:
                report.problems.append("no active index: run `radlens index` first")
                return report
            report.generation = gen.id
            db_ids = np.fromiter(session.scalars(select(EmbeddingRow.image_id)
                                                 .where(EmbeddingRow.generation_id == gen.id)), dtype=np.int64)
            image_ids = np.fromiter(session.scalars(select(ImageRow.id)), dtype=np.int64)
            revision = gen.next_revision - 1
            report.notes.append(query_tower_note(data_dir, gen.query_identity()))
        report.rows = len(db_ids)
        report.images_without_vector = np.setdiff1d(image_ids, db_ids).tolist()
        loaded = read_index(data_dir, gen.id)
        if loaded is None:
            report.problems.append(f"FAISS file of generation {gen.id} is missing or unreadable")
            return report
        index, meta = loaded
        faiss_ids = index_ids(index)
        report.vectors = int(index.ntotal)
        if len(np.unique(faiss_ids)) != len(faiss_ids):
            report.problems.append("the index holds duplicate ids")
        if meta.revision != revision:
            report.problems.append(f"index is at revision {meta.revision}, DB at {revision}")
        report.missing_in_index = np.setdiff1d(db_ids, faiss_ids).tolist()
        report.missing_in_db = np.setdiff1d(faiss_ids, db_ids).tolist()
        return report
    finally:
        db.dispose()


def query_tower_note(data_dir: str | Path, identity: dict) -> str:
    """Whether text queries run on a verified ONNX query tower (its whole file hashed) or on torch, and why."""
    from cxrmodel.errors import ModelLoadError
    from cxrmodel.model.query_tower import MANIFEST, QueryTower, tower_dir

    directory = tower_dir(data_dir, identity)
    if not (directory / MANIFEST).is_file():
        return "text queries: torch (this index has no ONNX query tower; `radlens index` exports one)"
    try:
        tower = QueryTower.load(directory, full_check=True)
    except ModelLoadError as exc:
        return f"text queries: torch -- {exc}; `radlens index` exports it again"
    return (f"text queries: ONNX query tower, sha256 verified (min cosine to torch fp32 at export "
            f"{tower.manifest.min_cosine:.6f})")


@dataclass
class FileCheck:
    """Indexed files as they are on disk now, against what the index recorded of them."""

    checked: int = 0
    archived: int = 0  # DICOMweb instances: immutable by UID, not checked here
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # size or modification time differ: not embedded as they are
    unreadable_now: list[str] = field(default_factory=list)  # changed into something that does not decode

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.unreadable_now)

    def lines(self, first: int = 10) -> list[str]:
        """Human-readable result, first line a verdict, each group with what fixes it."""
        out = [f"{'OK' if self.ok else 'FILES CHANGED'}: {self.checked} indexed files checked on disk"
               + (f" ({self.archived} archived instances not checked)" if self.archived else "")]
        for paths, what in ((self.missing, "no longer exist; `radlens index SRC --prune` removes their rows"),
                            (self.changed, "changed since they were indexed; `radlens index SRC` re-embeds them"),
                            (self.unreadable_now, "changed into files that do not decode; their rows hold the "
                                                  "earlier content, which `radlens index SRC --prune` removes")):
            if paths:
                out.append(f"{len(paths)} {what}:")
                out += [f"  {path}" for path in paths[:first]]
                if len(paths) > first:
                    out.append(f"  ... and {len(paths) - first} more")
        return out


def check_files(db_url: str) -> FileCheck:
    """Stat every indexed file: the ones gone, the ones whose size or modification time differ from what the
    index recorded (so their vectors may not describe them), and the ones a run found changed and unreadable."""
    report = FileCheck()
    db = open_db(db_url, create=False)
    try:
        with Session(db) as session:
            stale = stale_paths(session)
            rows = session.execute(select(ImageRow.path, ImageRow.size_bytes, ImageRow.mtime_ns)
                                   .order_by(ImageRow.path).execution_options(yield_per=5_000))
            for path, size, mtime in rows:
                if is_dicomweb(path):
                    report.archived += 1
                    continue
                report.checked += 1
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    report.missing.append(path)
                    continue
                except OSError:
                    continue  # unreadable metadata here (permissions): nothing is known
                if path in stale:
                    report.unreadable_now.append(path)
                elif st.st_size != size or st.st_mtime_ns != mtime:
                    report.changed.append(path)
    finally:
        db.dispose()
    return report
