"""FAISS index files: choosing the index type, building, catching up with the DB, atomic swaps.

The DB is the source of truth (each vector is stored with a `revision`); a generation's FAISS
file is derived from it and records the highest revision it holds. `sync_generation` brings the
file up to date -- after a normal run, after a crash, or when the corpus grows past the size at
which an approximate index pays off -- and replaces it atomically (temp file + `os.replace`), so
a reader always opens a complete index.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from cxrmodel.errors import DataError

from .compressed import (
    CompressedParams,
    RerankedIndex,
    exact_neighbours,
    factory_string,
    sample_rows,
    tune,
    write_vectors,
)
from .compressed import build as build_compressed
from .faults import checkpoint
from .store import EmbeddingRow, Generation, vectors_from_bytes

log = logging.getLogger(__name__)

INDEX_DIR = "index"
READ_CHUNK = 20_000
TRAIN_POINTS_PER_LIST = 64  # k-means sample per IVF list (faiss wants at least 39)


@dataclass(frozen=True)
class IndexConfig:
    """How vectors are indexed."""

    index_type: str = field(default="auto", metadata={
        "help": "auto, Flat, IVF (IVF-Flat sized to the corpus), IVFPQ (compressed, re-ranked; for corpora "
                "that outgrow RAM) or any faiss.index_factory string (one with ',PQ' is built compressed)."})
    exact_below: int = field(default=100_000, metadata={"help": "auto uses exact search below this many vectors."})
    compress_above: int = field(default=5_000_000, metadata={
        "help": "auto uses IVF-PQ + fp16 re-ranking (indexer/compressed.py) from this many vectors."})
    compressed: CompressedParams = field(default_factory=CompressedParams)
    nprobe: int | None = field(default=None, metadata={
        "help": "IVF lists probed per query (None: the smallest reaching target_recall on a sample)."})
    target_recall: float = field(default=0.95, metadata={"help": "recall@10 vs exact that tuning aims for."})


@dataclass
class IndexMeta:
    """What a FAISS file holds, written beside it as JSON."""

    generation: int
    revision: int
    count: int
    factory: str
    trained_on: int = 0
    nprobe: int | None = None
    measured_recall: float | None = None
    stem: str | None = None  # compressed indexes: the file stem of their parts, in the index dir
    depth: int | None = None  # compressed indexes: candidates re-scored per query
    base_revision: int | None = None  # compressed indexes: the DB revision the build holds
    delta: str | None = None  # compressed indexes: file of the vectors written since the build (exact)
    removed: str | None = None  # compressed indexes: file of built ids superseded or deleted since


def index_paths(data_dir: str | Path, generation: int) -> tuple[Path, Path]:
    """(faiss file, meta file) of a generation."""
    base = Path(data_dir) / INDEX_DIR
    return base / f"g{generation}.faiss", base / f"g{generation}.json"


def ivf_lists(count: int) -> int:
    """A list count of about 2*sqrt(N), a power of two, within [16, 65536]."""
    target = 2 * math.sqrt(max(count, 1))
    return int(min(65536, max(16, 2 ** round(math.log2(target)))))


def tune_nprobe(index: faiss.Index, queries: np.ndarray, target: float = 0.95, k: int = 10) -> tuple[int, float]:
    """Smallest power-of-two nprobe whose recall@k against exhaustive search reaches `target`.

    Queries are stored vectors; each one's own id is dropped from both result lists, so the recall is
    that of its true neighbours. IVF-Flat probing every list is exact, so it is the ground truth.
    """
    inner = faiss.downcast_index(index.index)

    def search(nprobe):
        inner.nprobe = nprobe
        _, ids = index.search(queries, k + 1)
        return ids
    truth = search(inner.nlist)
    qids = truth[:, 0]
    truth_sets = [set(row[row != q][:k]) for row, q in zip(truth, qids, strict=True)]
    nprobe, recall = 1, 0.0
    while True:
        found = search(nprobe)
        recall = float(np.mean([len(set(row[row != q][:k]) & t) / max(1, len(t))
                                for row, q, t in zip(found, qids, truth_sets, strict=True)]))
        if recall >= target or nprobe >= inner.nlist:
            return nprobe, recall
        nprobe = min(inner.nlist, nprobe * 2)


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: enough for recall@10 >= 0.95 on clustered embeddings (see bench/)."""
    return int(min(nlist, max(8, nlist // 32)))


def choose_factory(count: int, config: IndexConfig, dim: int = 512) -> str:
    """The faiss factory string for `count` vectors under `config`."""
    kind = config.index_type
    if kind == "auto":
        kind = "Flat" if count < config.exact_below else "IVFPQ" if count >= config.compress_above else "IVF"
    if kind == "IVFPQ":
        return factory_string(dim, count, config.compressed)
    if kind == "IVF":
        nlist = ivf_lists(count)
        return f"IVF{nlist},Flat" if count >= 4 * nlist else "Flat"  # too few vectors to cluster
    return kind


def new_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index with caller-chosen int64 ids."""
    return faiss.IndexIDMap2(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))


def read_meta(data_dir: str | Path, generation: int) -> IndexMeta | None:
    """The meta of a generation's FAISS file, or None when there is none."""
    _, meta_path = index_paths(data_dir, generation)
    try:
        return IndexMeta(**json.loads(meta_path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def read_index(data_dir: str | Path, generation: int, mmap: bool = False) -> tuple[faiss.Index, IndexMeta] | None:
    """Load a generation's index and meta; None when missing or unreadable.

    `mmap` (servers): map the vectors or lists read-only instead of copying them, so several server
    processes share one copy in the page cache. Compressed indexes are always mapped.
    """
    meta = read_meta(data_dir, generation)
    faiss_path, _ = index_paths(data_dir, generation)
    if meta is not None and meta.stem:
        base = Path(data_dir) / INDEX_DIR
        stem = base / meta.stem
        try:
            return RerankedIndex.open(Path(f"{stem}.faiss"), stem, meta.nprobe or 16, meta.depth or 100,
                                      delta_path=base / meta.delta if meta.delta else None,
                                      removed_path=base / meta.removed if meta.removed else None), meta
        except (RuntimeError, OSError, ValueError) as exc:
            log.warning("cannot read compressed index %s (%s); it will be rebuilt", stem, exc)
            return None
    if meta is None or not faiss_path.exists():
        return None
    try:
        # IO_FLAG_MMAP_IFC maps a Flat index's codes and an IVF index's lists in place; adding
        # IO_FLAG_MMAP breaks IVF files ("mmap only supported for File objects", faiss 1.15)
        index = faiss.read_index(str(faiss_path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    except RuntimeError as exc:
        log.warning("cannot read %s (%s); it will be rebuilt", faiss_path, exc)
        return None
    apply_search_params(index, meta)
    return index, meta


def apply_search_params(index: faiss.Index, meta: IndexMeta) -> None:
    """Set nprobe on IVF indexes."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = meta.nprobe or default_nprobe(inner.nlist)


def index_ids(index) -> np.ndarray:
    """The ids held by an index (an IndexIDMap2, or a compressed index's IVF lists)."""
    if isinstance(index, RerankedIndex):
        return index.all_ids()
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def write_index_atomic(data_dir: str | Path, index: faiss.Index, meta: IndexMeta) -> None:
    """Replace a generation's FAISS file, then its meta, each by an atomic rename."""
    faiss_path, meta_path = index_paths(data_dir, meta.generation)
    faiss_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = faiss_path.with_suffix(f".faiss.tmp{os.getpid()}")
    try:
        faiss.write_index(index, str(tmp))
    except RuntimeError as exc:  # faiss reports a failed write (e.g. a full disk) as a RuntimeError
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(faiss_path.parent).free
        raise DataError(f"cannot write the FAISS index {faiss_path} ({free // 1024} KiB free on its disk): "
                        f"{str(exc).strip().splitlines()[-1][:200]}. The rows are stored; free space and run "
                        "`radlens index` again") from None
    _fsync(tmp)
    checkpoint("faiss-write")
    os.replace(tmp, faiss_path)
    _write_meta_atomic(data_dir, meta)


def _write_meta_atomic(data_dir: str | Path, meta: IndexMeta) -> None:
    _, meta_path = index_paths(data_dir, meta.generation)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_meta = meta_path.with_suffix(f".json.tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(meta.__dict__))
    _fsync(tmp_meta)
    checkpoint("meta-write")
    os.replace(tmp_meta, meta_path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_generation_files(data_dir: str | Path, generation: int) -> None:
    """Delete a retired generation's files."""
    for path in index_paths(data_dir, generation):
        path.unlink(missing_ok=True)
    remove_compressed_parts(data_dir, generation)


def remove_compressed_parts(data_dir: str | Path, generation: int, keep_stem: str | None = None) -> None:
    """Delete a generation's compressed-index parts, all but those of `keep_stem`.

    Servers that still have an old part open keep reading it until they switch (POSIX unlink).
    """
    for path in (Path(data_dir) / INDEX_DIR).glob(f"g{generation}-*"):
        if keep_stem is None or not path.name.startswith(keep_stem + "."):
            path.unlink(missing_ok=True)


def _stream_vectors(session: Session, generation: int, dim: int, min_revision: int = 0):
    """Yield (ids, vectors) chunks of a generation's embeddings with revision > min_revision."""
    last_id = -1
    while True:
        rows = session.execute(
            select(EmbeddingRow.image_id, EmbeddingRow.vector)
            .where(EmbeddingRow.generation_id == generation, EmbeddingRow.revision > min_revision,
                   EmbeddingRow.image_id > last_id)
            .order_by(EmbeddingRow.image_id).limit(READ_CHUNK)).all()
        if not rows:
            return
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        yield ids, vectors_from_bytes([r[1] for r in rows], dim)
        last_id = int(ids[-1])


def _train_sample(session: Session, generation: int, dim: int, count: int, limit: int) -> np.ndarray:
    step = max(1, count // limit)
    parts = [vecs[::step] for _, vecs in _stream_vectors(session, generation, dim)]
    return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)


def build_full(session: Session, gen: Generation, factory: str) -> tuple[faiss.Index, int]:
    """Build a generation's index from every stored vector; returns (index, vectors trained on)."""
    index = new_index(gen.dim, factory)
    trained_on = 0
    if not index.is_trained:
        count = session.scalar(select(func.count()).select_from(EmbeddingRow)
                               .where(EmbeddingRow.generation_id == gen.id))
        nlist = faiss.downcast_index(index.index).nlist
        sample = _train_sample(session, gen.id, gen.dim, count, limit=TRAIN_POINTS_PER_LIST * nlist)
        index.train(sample)
        trained_on = len(sample)
    for ids, vecs in _stream_vectors(session, gen.id, gen.dim):
        index.add_with_ids(vecs, ids)
    return index, trained_on


def sync_generation(db: Engine, data_dir: str | Path, generation: int,
                    config: IndexConfig = IndexConfig()) -> IndexMeta:
    """Bring a generation's FAISS file up to date with its DB rows; returns the new meta."""
    with Session(db) as session:
        gen = session.get(Generation, generation)
        count = session.scalar(select(func.count()).select_from(EmbeddingRow)
                               .where(EmbeddingRow.generation_id == generation))
        revision = gen.next_revision - 1
        factory = choose_factory(count, config, gen.dim)
        if is_compressed(factory):
            return _sync_compressed(session, gen, data_dir, factory, count, revision, config)
        existing = read_index(data_dir, generation)
        if existing is not None and existing[1].revision == revision and existing[1].count == count \
                and existing[1].factory == factory and existing[0].ntotal == count:
            return existing[1]
        reusable = existing is not None and existing[1].factory == factory and _can_remove(existing[0])
        if existing is not None and factory.startswith("IVF") and existing[1].trained_on * 16 < count:
            reusable = False  # corpus outgrew the clustering: retrain
        if reusable:
            index, meta = existing
            _catch_up(session, index, gen, meta.revision)
            trained_on = meta.trained_on
            if index.ntotal != count:
                log.warning("index of generation %d drifted from the DB; rebuilding it", generation)
                reusable = False
        if not reusable:
            try:
                index, trained_on = build_full(session, gen, factory)
            except RuntimeError as exc:  # e.g. a factory string faiss rejects, or too few vectors to train
                raise DataError(f"cannot build a FAISS {factory!r} index over {count} vectors: "
                                f"{str(exc).strip().splitlines()[-1][:200]}. The rows are stored; rerun with "
                                f"another --index-type (e.g. Flat).") from None
        nprobe, recall = config.nprobe, None
        if nprobe is None and factory.startswith("IVF"):
            nprobe, recall = tune_nprobe(index, _train_sample(session, gen.id, gen.dim, count, limit=200)[:200],
                                         config.target_recall)
        meta = IndexMeta(generation=generation, revision=revision, count=int(index.ntotal), factory=factory,
                         trained_on=trained_on, nprobe=nprobe, measured_recall=recall)
        apply_search_params(index, meta)
        write_index_atomic(data_dir, index, meta)
        remove_compressed_parts(data_dir, generation)  # a compressed index this one replaced
        gen.index_type = factory
        session.commit()
        return meta


def is_compressed(factory: str) -> bool:
    """True for IVF-PQ factories, built by `indexer.compressed` (on-disk lists + fp16 re-ranking)."""
    return factory.startswith("IVF") and ",PQ" in factory


def _sync_compressed(session: Session, gen: Generation, data_dir: str | Path, factory: str, count: int,
                     revision: int, config: IndexConfig) -> IndexMeta:
    """Bring a compressed index up to the DB: small changes beside it (`_update_delta`), else a rebuild."""
    existing = read_meta(data_dir, gen.id)
    if existing is not None and existing.stem and (existing.revision, existing.count, existing.factory) == (
            revision, count, factory):
        return existing
    params = config.compressed
    if existing is not None and existing.stem and existing.factory == factory:
        updated = _update_delta(session, gen, data_dir, existing, revision, count, params)
        if updated is not None:
            return updated
    stem = Path(data_dir) / INDEX_DIR / f"g{gen.id}-{time.time_ns()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_vectors(_stream_vectors(session, gen.id, gen.dim), stem, gen.dim, count)
        faiss_path = build_compressed(stem, gen.dim, count, factory, params, progress=log.info)
        index = RerankedIndex.open(faiss_path, stem, config.nprobe or 16, params.depth or 100)
    except (RuntimeError, ValueError) as exc:
        for path in stem.parent.glob(stem.name + ".*"):
            path.unlink(missing_ok=True)
        raise DataError(f"cannot build a compressed {factory!r} index over {count} vectors: "
                        f"{str(exc).strip().splitlines()[-1][:200]}. The rows are stored; rerun with another "
                        "--index-type (e.g. Flat or IVF).") from None
    nprobe, depth, recall = config.nprobe, params.depth, None
    if nprobe is None or depth is None:
        queries = sample_rows(stem, 200, seed=1)
        truth = exact_neighbours(stem, queries, 11)[:, 1:]  # each query's own row is not a neighbour
        nprobe, depth, recall = tune(index, queries, truth, config.target_recall, skip_self=True,
                                     nprobes=[nprobe] if nprobe else None, depths=[depth] if depth else None)
    index.close()
    meta = IndexMeta(generation=gen.id, revision=revision, count=count, factory=factory,
                     trained_on=min(count, params.train_sample), nprobe=nprobe, measured_recall=recall,
                     stem=stem.name, depth=depth, base_revision=revision)
    _write_meta_atomic(data_dir, meta)
    remove_compressed_parts(data_dir, gen.id, keep_stem=stem.name)
    index_paths(data_dir, gen.id)[0].unlink(missing_ok=True)  # a plain index this one replaced
    gen.index_type = factory
    session.commit()
    return meta


def _update_delta(session: Session, gen: Generation, data_dir: str | Path, meta: IndexMeta, revision: int,
                  count: int, params: CompressedParams) -> IndexMeta | None:
    """Keep a small change beside the compressed build instead of rebuilding it; None when it is too big.

    Rows written since the build go to an exact delta index; built ids they supersede, and built ids
    whose rows were deleted, are listed as removed. Both files are rewritten whole each time.
    """
    base = Path(data_dir) / INDEX_DIR
    try:
        built_ids = np.load(base / f"{meta.stem}.ids.npy", mmap_mode="r")
    except OSError:
        return None
    since = meta.base_revision if meta.base_revision is not None else meta.revision
    parts = list(_stream_vectors(session, gen.id, gen.dim, min_revision=since))
    new_ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    db_ids = np.fromiter(session.scalars(select(EmbeddingRow.image_id).where(EmbeddingRow.generation_id == gen.id)),
                         dtype=np.int64)
    removed = np.union1d(np.intersect1d(built_ids, new_ids), np.setdiff1d(built_ids, db_ids))
    if len(new_ids) + len(removed) > params.delta_fraction * max(1, len(built_ids)):
        return None
    delta = new_index(gen.dim, "Flat")
    if parts:
        delta.add_with_ids(np.concatenate([p[1] for p in parts]), new_ids)
    stamp = time.time_ns()
    delta_name, removed_name = f"{meta.stem}.delta{stamp}.faiss", f"{meta.stem}.removed{stamp}.npy"
    faiss.write_index(delta, str(base / delta_name))
    np.save(base / removed_name, removed)
    for path in (base / delta_name, base / removed_name):
        _fsync(path)
    updated = IndexMeta(**{**meta.__dict__, "revision": revision, "count": count, "base_revision": since,
                           "delta": delta_name, "removed": removed_name})
    _write_meta_atomic(data_dir, updated)
    for path in base.glob(f"{meta.stem}.delta*"):
        if path.name != delta_name:
            path.unlink(missing_ok=True)
    for path in base.glob(f"{meta.stem}.removed*"):
        if path.name != removed_name:
            path.unlink(missing_ok=True)
    return updated


def _can_remove(index: faiss.Index) -> bool:
    inner = faiss.downcast_index(index.index)
    return isinstance(inner, (faiss.IndexFlat, faiss.IndexIVF))


def _catch_up(session: Session, index: faiss.Index, gen: Generation, since_revision: int) -> None:
    """Remove vectors whose rows vanished or changed, add those written after `since_revision`."""
    db_ids = np.fromiter(session.scalars(select(EmbeddingRow.image_id)
                                         .where(EmbeddingRow.generation_id == gen.id)), dtype=np.int64)
    stale = np.setdiff1d(index_ids(index), db_ids)
    if len(stale):
        index.remove_ids(stale)
    for ids, vecs in _stream_vectors(session, gen.id, gen.dim, min_revision=since_revision):
        index.remove_ids(ids)
        index.add_with_ids(vecs, ids)
