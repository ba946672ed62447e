"""Indexes for corpora that outgrow RAM: IVF-PQ filled in shards, re-ranked from fp16 vectors on disk.

Layout of one compressed index (`stem` = e.g. `index/g3-1733050000`):
- `stem.ivfdata`  the IVF lists (PQ codes + image ids), merged from the shards, memory-mapped;
- `stem.f16.npy`  every vector in fp16, rows in ascending image-id order, memory-mapped;
- `stem.ids.npy`  the ascending image ids of those rows, memory-mapped;
- the `.faiss` file (coarse quantizer + PQ tables, small) names `stem.ivfdata`.

A query probes `nprobe` lists, keeps the `depth` best by PQ distance, and re-scores them exactly
from the fp16 rows; the resident cost per vector is the PQ code and the id (plus page cache of what
queries touch), and several server processes mapping the same files share one copy. Re-rank rows
are read with pread, so they live in the kernel's page cache, not in any process. nlist, PQ size,
nprobe and depth are chosen from measured recall and stored with the index; all are overridable.

Everything here works on arrays and files; the DB stream (`indexer.vectors`) and the synthetic
benchmark (`bench/scale.py`) feed it the same way.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

CHUNK = 100_000


@dataclass(frozen=True)
class CompressedParams:
    """Shape and re-rank depth of a compressed index (None: nlist/PQ size from the corpus size, depth
    from measured recall). nprobe and the recall target are `IndexConfig`'s, as for every IVF index."""

    nlist: int | None = None
    pq_bytes: int | None = None
    depth: int | None = None
    shards: int = 2
    train_sample: int = 131_072
    delta_fraction: float = 0.02  # changes since the build kept beside it (exact) before a full rebuild


def default_nlist(count: int) -> int:
    """About sqrt(N) lists, a power of two in [64, 65536] (fewer than IVF-Flat: PQ scans are cheap)."""
    return int(min(65536, max(64, 2 ** round(math.log2(max(1.0, math.sqrt(count)))))))


def default_pq_bytes(dim: int) -> int:
    """One byte per 8 dimensions (64 bytes for 512-d), the largest divisor of dim not above that."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def factory_string(dim: int, count: int, params: CompressedParams) -> str:
    """The faiss factory of the coarse quantizer and codes, e.g. `IVF4096,PQ64`."""
    return f"IVF{params.nlist or default_nlist(count)},PQ{params.pq_bytes or default_pq_bytes(dim)}"


# -- build ----------------------------------------------------------------------------------------
def write_vectors(chunks: Iterable[tuple[np.ndarray, np.ndarray]], stem: Path, dim: int, count: int) -> int:
    """Stream (ids, float32 vectors) chunks, ids ascending, into `stem.f16` and `stem.ids.npy`."""
    vecs = np.lib.format.open_memmap(f"{stem}.f16.npy", mode="w+", dtype=np.float16, shape=(count, dim))
    ids = np.lib.format.open_memmap(f"{stem}.ids.npy", mode="w+", dtype=np.int64, shape=(count,))
    n, last = 0, -1
    for chunk_ids, chunk in chunks:
        if len(chunk_ids) and (chunk_ids[0] <= last or np.any(np.diff(chunk_ids) <= 0)):
            raise ValueError("vector ids must arrive in ascending order")
        vecs[n:n + len(chunk)] = chunk.astype(np.float16)
        ids[n:n + len(chunk)] = chunk_ids
        n += len(chunk)
        last = int(chunk_ids[-1]) if len(chunk_ids) else last
    vecs.flush()
    ids.flush()
    del vecs, ids
    if n != count:
        raise ValueError(f"expected {count} vectors, got {n}")
    return n


def open_vectors(stem: Path) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 rows, ascending ids), memory-mapped read-only (for streaming over all of them)."""
    return np.load(f"{stem}.f16.npy", mmap_mode="r"), np.load(f"{stem}.ids.npy", mmap_mode="r")


class RowReader:
    """Reads single fp16 rows of `stem.f16.npy` with pread: a server keeps none of the file resident
    itself; the kernel's page cache holds the hot rows once for every process on the machine."""

    def __init__(self, stem: Path):
        path = f"{stem}.f16.npy"
        mapped = np.load(path, mmap_mode="r")  # only to read the header: shape, dtype, data offset
        self.offset, self.dim, self.row_bytes = mapped.offset, mapped.shape[1], mapped.shape[1] * mapped.itemsize
        del mapped
        self.fd: int | None = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """float32 rows at `positions`."""
        buf = bytearray(len(positions) * self.row_bytes)
        view = memoryview(buf)
        for j, pos in enumerate(positions):
            os.preadv(self.fd, [view[j * self.row_bytes:(j + 1) * self.row_bytes]],
                      self.offset + int(pos) * self.row_bytes)
        return np.frombuffer(buf, dtype=np.float16).reshape(len(positions), self.dim).astype(np.float32)

    def close(self) -> None:
        """Close the file (also done when a server drops this index for a newer one)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = close


def sample_rows(stem: Path, limit: int, seed: int = 0) -> np.ndarray:
    """Up to `limit` rows (float32) spread over the whole file, for training and tuning."""
    vecs, _ = open_vectors(stem)
    rows = np.sort(np.random.default_rng(seed).choice(len(vecs), size=min(limit, len(vecs)), replace=False))
    return np.asarray(vecs[rows], dtype=np.float32)


def train(stem: Path, dim: int, factory: str, sample: int) -> faiss.Index:
    """An empty IVF-PQ (inner product) trained on a sample of the stored vectors."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False  # unused here, and 4/5 of the training time
    index.train(sample_rows(stem, sample))
    return index


def fill_shard(trained_path: str, stem: str, start: int, stop: int, shard_path: str, threads: int = 1) -> int:
    """Add rows [start, stop) of `stem` to a copy of the trained index; write it to `shard_path`."""
    faiss.omp_set_num_threads(threads)
    index = faiss.read_index(trained_path)
    vecs, ids = open_vectors(Path(stem))
    for lo in range(start, stop, CHUNK):
        hi = min(stop, lo + CHUNK)
        index.add_with_ids(np.asarray(vecs[lo:hi], dtype=np.float32), np.asarray(ids[lo:hi]))
    faiss.write_index(index, shard_path)
    return stop - start


def build(stem: Path, dim: int, count: int, factory: str, params: CompressedParams,
          progress: Callable[[str], None] = lambda msg: None) -> Path:
    """Train, fill `params.shards` shards in parallel processes, merge them on disk; returns the .faiss path.

    `stem.f16.npy`/`stem.ids.npy` must already hold the vectors (see `write_vectors`).
    """
    from faiss.contrib.ondisk import merge_ondisk

    progress(f"training {factory} on {min(count, params.train_sample)} vectors")
    index = train(stem, dim, factory, params.train_sample)
    trained_path = f"{stem}.trained.faiss"
    faiss.write_index(index, trained_path)
    shards = max(1, min(params.shards, count))
    bounds = np.linspace(0, count, shards + 1).astype(int)
    shard_paths = [f"{stem}.shard{i}.faiss" for i in range(shards)]
    progress(f"filling {shards} shards")
    threads = max(1, (os.cpu_count() or 1) // shards)
    if shards == 1:
        fill_shard(trained_path, str(stem), 0, count, shard_paths[0], threads=os.cpu_count() or 1)
    else:
        import multiprocessing

        with ProcessPoolExecutor(shards, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(fill_shard, [trained_path] * shards, [str(stem)] * shards, bounds[:-1], bounds[1:],
                          shard_paths, [threads] * shards))
    progress("merging shards")
    with _stdout_to_stderr():
        merge_ondisk(index, shard_paths, f"{stem}.ivfdata")
    out = Path(f"{stem}.faiss")
    faiss.write_index(index, str(out))
    for path in (trained_path, *shard_paths):
        os.unlink(path)
    return out


@contextmanager
def _stdout_to_stderr():
    """faiss's on-disk lists print notes on the C stdout; keep a command's stdout for its results."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# -- search ---------------------------------------------------------------------------------------
class RerankedIndex:
    """IVF-PQ candidates re-scored exactly from fp16 rows; searches like a faiss index (ids = image ids).

    Changes made after the build live beside it until the next rebuild: `delta`, an exact in-RAM
    index of vectors written since, and `removed`, the built ids those superseded or that were deleted.
    """

    def __init__(self, ivf: faiss.Index, vectors: RowReader, ids: np.ndarray, nprobe: int, depth: int,
                 delta: faiss.Index | None = None, removed: np.ndarray | None = None):
        self.index = ivf  # the IVF itself, so callers can read nlist / set nprobe
        self.vectors, self.ids = vectors, ids
        self.depth = depth
        self.delta = delta
        self.removed = np.sort(np.asarray(removed if removed is not None else [], dtype=np.int64))
        self._removed_batch = faiss.IDSelectorBatch(self.removed) if len(self.removed) else None
        self._not_removed = faiss.IDSelectorNot(self._removed_batch) if len(self.removed) else None
        faiss.extract_index_ivf(ivf).nprobe = nprobe

    @classmethod
    def open(cls, faiss_path: Path, stem: Path, nprobe: int, depth: int, delta_path: Path | None = None,
             removed_path: Path | None = None) -> RerankedIndex:
        """Memory-map an index written by `build` (its files may have moved together), with its changes."""
        try:  # the lists file where the build wrote it ...
            ivf = faiss.read_index(str(faiss_path), faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # ... or beside the .faiss file, when the data dir was moved
            with _stdout_to_stderr():
                ivf = faiss.read_index(str(faiss_path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        delta = faiss.read_index(str(delta_path)) if delta_path else None
        removed = np.load(removed_path) if removed_path else None
        return cls(ivf, RowReader(stem), np.load(f"{stem}.ids.npy", mmap_mode="r"), nprobe, depth, delta, removed)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) - len(self.removed) + (int(self.delta.ntotal) if self.delta else 0)

    def search(self, queries: np.ndarray, k: int, params=None, depth: int | None = None):
        """Top-k by exact inner product among the `depth` best PQ candidates (and the exact delta);
        (scores, ids) like faiss. `params` may carry an id selector (filters) and nprobe."""
        depth = max(k, depth or self.depth)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        selector = getattr(params, "sel", None) if params is not None else None
        built_sel = self._not_removed if selector is None or self._not_removed is None else \
            faiss.IDSelectorAnd(selector, self._not_removed)
        built_sel = built_sel or selector
        nprobe = getattr(params, "nprobe", 0) or faiss.extract_index_ivf(self.index).nprobe
        built_params = faiss.SearchParametersIVF(sel=built_sel, nprobe=nprobe) if built_sel is not None \
            else faiss.SearchParametersIVF(nprobe=nprobe)
        _, cand = self.index.search(queries, depth, params=built_params)
        out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(queries), k), -1, dtype=np.int64)
        for q, row in enumerate(cand):
            row = row[row >= 0]
            if not len(row):
                continue
            scores = self.rescore(queries[q], row)
            top = np.argsort(-scores)[:k]
            out_s[q, :len(top)], out_i[q, :len(top)] = scores[top], row[top]
        if self.delta is not None and self.delta.ntotal:
            d_s, d_i = self.delta.search(queries, k, params=faiss.SearchParameters(sel=selector)
                                         if selector is not None else None)
            both_s, both_i = np.concatenate([out_s, d_s], axis=1), np.concatenate([out_i, d_i], axis=1)
            both_s[both_i < 0] = -np.inf
            top = np.argsort(-both_s, axis=1, kind="stable")[:, :k]
            out_s, out_i = np.take_along_axis(both_s, top, 1), np.take_along_axis(both_i, top, 1)
            out_i[~np.isfinite(out_s)] = -1
        return out_s, out_i

    def rescore(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact inner products of `query` with the stored vectors of `ids`."""
        pos = np.searchsorted(self.ids, ids)
        order = np.argsort(pos)  # read the rows in file order
        rows = np.empty((len(ids), self.vectors.dim), dtype=np.float32)
        rows[order] = self.vectors.rows(pos[order])
        return rows @ np.asarray(query, dtype=np.float32)

    def exact_scores(self, query: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(those of the sorted `ids` this index answers with, their exact inner products with `query`):
        built rows re-read from the fp16 file, changes since the build from the exact delta."""
        ids = np.asarray(ids, dtype=np.int64)
        query = np.asarray(query, dtype=np.float32).ravel()
        pos = np.minimum(np.searchsorted(self.ids, ids), max(0, len(self.ids) - 1))
        built = ids[(self.ids[pos] == ids) & ~np.isin(ids, self.removed)] if len(self.ids) else ids[:0]
        parts_i, parts_s = [built], [self.rescore(query, built) if len(built) else np.zeros(0, np.float32)]
        if self.delta is not None and self.delta.ntotal:
            in_delta = ids[np.isin(ids, faiss.vector_to_array(self.delta.id_map))]
            if len(in_delta):
                parts_i.append(in_delta)
                parts_s.append(self.delta.reconstruct_batch(in_delta) @ query)
        return np.concatenate(parts_i), np.concatenate(parts_s).astype(np.float32)

    def close(self) -> None:
        """Release the vector file."""
        self.vectors.close()

    def all_ids(self) -> np.ndarray:
        """Every id this index answers with: the built ones not removed, and the delta's."""
        ids = np.setdiff1d(ivf_ids(self.index), self.removed)
        if self.delta is not None:
            ids = np.union1d(ids, faiss.vector_to_array(self.delta.id_map).astype(np.int64))
        return ids


def ivf_ids(index: faiss.Index) -> np.ndarray:
    """The ids stored in an IVF index's lists."""
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
             for i in range(ivf.nlist) if lists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


# -- choosing nprobe and depth from measured recall ----------------------------------------------
def exact_top_k(queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """Ids of each query's exact top-k inner products over (ids, float32 vectors) chunks, best first."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for ids, vecs in chunks:
        s = queries @ vecs.T
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], axis=1)
        top = np.argpartition(-s_all, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(s_all, top, axis=1)
        best_i = np.take_along_axis(i_all, top, axis=1)
    return np.take_along_axis(best_i, np.argsort(-best_s, axis=1), axis=1)


def exact_neighbours(stem: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of each query's exact top-k over the stored vectors (streamed brute force)."""
    vecs, ids = open_vectors(stem)
    return exact_top_k(queries, ((np.asarray(ids[lo:lo + CHUNK]), np.asarray(vecs[lo:lo + CHUNK], dtype=np.float32))
                                 for lo in range(0, len(vecs), CHUNK)), k)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k."""
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth, strict=True)]))


def tune(index: RerankedIndex, queries: np.ndarray, truth: np.ndarray, target: float, k: int = 10,
         nprobes: Iterable[int] | None = None, depths: Iterable[int] | None = None, skip_self: bool = False
         ) -> tuple[int, int, float]:
    """The cheapest (nprobe, depth) whose recall@k reaches `target` (else the best seen), and its recall.

    `skip_self`: the queries are stored vectors, so each one's first hit (itself) is dropped.
    """
    ivf = faiss.extract_index_ivf(index.index)
    best = (0, 0, -1.0)
    nprobes = nprobes or (8, 16, 32, 64, 128, 256)
    for nprobe in [p for p in nprobes if p <= ivf.nlist] or [ivf.nlist]:
        ivf.nprobe = nprobe
        for depth in depths or (50, 100, 200, 400):
            _, found = index.search(queries, k + skip_self, depth=depth)
            recall = recall_at_k(found[:, int(skip_self):], truth, k)
            if recall > best[2]:
                best = (nprobe, depth, recall)
            if recall >= target:
                ivf.nprobe = nprobe
                index.depth = depth
                return nprobe, depth, recall
    ivf.nprobe, index.depth = best[0], best[1]
    return best


def chunks_of(vectors: np.ndarray, ids: np.ndarray, size: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) chunks of in-memory arrays (for tests and small builds)."""
    for lo in range(0, len(vectors), size):
        yield ids[lo:lo + size], vectors[lo:lo + size]
