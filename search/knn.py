"""Nearest neighbours under a filter, on every index type, in rounds that provably end.

A query asks for the `k` best *distinct* images (exact duplicates collapse later, by content hash),
so it may need more than `k` candidates. Candidates come in rounds of growing size; the caller stops
as soon as a round gives it enough. Every round strictly grows the candidate count (`fetch`) or the
IVF lists probed (`nprobe`), both are capped (by the allowed count and by `nlist`), and the round
that reaches both caps is the last: so a query ends after O(log N) rounds, whatever the filter.

Two plans, chosen per query from the allowed count (`choose_plan`):
- **exact**: score every allowed vector (reconstructed from the index, or re-read from the fp16 rows
  of a compressed index) and rank them. Cost grows with the allowed count, not the index size, and
  the answer is the brute-force one on every index type.
- **index**: search the index with the filter as an id selector (a bitmap: O(1) per candidate),
  probing more lists and fetching more candidates only when a round comes back short. Approximate
  where the index is (IVF at the tuned nprobe), exact on a Flat index.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np

EXACT_ALWAYS_BELOW = 4096  # allowed vectors scored exactly whatever the index (cheap: under a millisecond)
EXACT_AT_MOST = 262_144  # never score more than this many exactly per query (memory, latency)
RECONSTRUCT_CHUNK = 8192

Candidates = list[tuple[int, float]]  # (image id, score), best first


@dataclass(frozen=True)
class Selection:
    """The image ids a filter allows in one served index: their count, the sorted ids (kept while
    small enough to score exactly) and a bitmap over ids for faiss's selector (built on first use)."""

    count: int
    ids: np.ndarray | None  # sorted int64, or None when count > EXACT_AT_MOST
    bitmap: np.ndarray  # uint8, little bit order: bit (id & 7) of byte (id >> 3)

    @classmethod
    def from_ids(cls, ids: np.ndarray) -> Selection:
        """A selection of `ids` (any order, no duplicates expected)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[ids >= 0]
        mask = np.zeros(int(ids[-1]) + 1 if len(ids) else 0, dtype=bool)
        mask[ids] = True
        return cls(len(ids), ids if len(ids) <= EXACT_AT_MOST else None, np.packbits(mask, bitorder="little"))

    @property
    def nbytes(self) -> int:
        return int(self.bitmap.nbytes + (self.ids.nbytes if self.ids is not None else 0))

    def selector(self) -> faiss.IDSelector:
        """A faiss selector over this bitmap (keep the Selection alive while it is used)."""
        sel = faiss.IDSelectorBitmap(len(self.bitmap), faiss.swig_ptr(self.bitmap))
        sel._owner = self.bitmap  # the selector reads the array's memory
        return sel


def ivf_of(index) -> faiss.IndexIVF | None:
    """The IVF inside a served index (IDMap2-wrapped or compressed), or None for a flat one."""
    inner = getattr(index, "index", None)
    if inner is None:
        return None
    try:
        ivf = faiss.extract_index_ivf(inner)
    except RuntimeError:
        return None
    return faiss.downcast_index(ivf) if ivf is not None else None


def choose_plan(allowed: int, total: int, k: int, nlist: int | None, nprobe: int | None,
                can_score_exactly: bool) -> str:
    """'exact' or 'index' for a filter allowing `allowed` of `total` vectors.

    Exact costs about `allowed` vector reads. An IVF search must probe enough lists to meet `2k`
    allowed candidates, about max(nprobe, 2k * nlist / allowed) lists of total / nlist vectors each;
    the cheaper one is taken. A Flat index's filtered search is exact anyway, so it takes exact only
    while that reads fewer vectors than a full scan.
    """
    if not can_score_exactly or allowed > EXACT_AT_MOST:
        return "index"
    if allowed <= EXACT_ALWAYS_BELOW:
        return "exact"
    if not nlist:
        return "exact" if allowed < total else "index"
    lists = max(nprobe or 1, math.ceil(2 * k * nlist / max(1, allowed)))
    scanned = min(nlist, lists) * total / nlist
    return "exact" if allowed <= scanned else "index"


class ExactScorer:
    """Scores chosen ids exactly against the vectors a served index stores: reconstructed from IDMap2
    indexes (Flat, or IVF once a direct map is made; lossy codes such as SQ8 as they are stored),
    re-read from fp16 rows for compressed ones. Brute force over what the index holds."""

    def __init__(self, index):
        self.index = index
        self._held: np.ndarray | None = None
        self._lock = threading.Lock()
        self._capable: bool | None = None

    @property
    def capable(self) -> bool:
        """True when this index can give back its stored vectors (checked once, on one of them)."""
        if self._capable is None:
            if hasattr(self.index, "exact_scores"):
                self._capable = True
            elif not isinstance(self.index, faiss.IndexIDMap2) or not isinstance(
                    faiss.downcast_index(self.index.index), (faiss.IndexFlat, faiss.IndexIVF)):
                self._capable = False
            else:
                try:
                    held = self.held_ids()
                    if len(held):
                        self.index.reconstruct_batch(held[:1])
                    self._capable = True
                except RuntimeError:  # an index type that stores no reconstructable codes
                    self._capable = False
        return self._capable

    def scores(self, query: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids present in the index, their inner products with `query`)."""
        if hasattr(self.index, "exact_scores"):
            return self.index.exact_scores(query, ids)
        held = self.held_ids()
        pos = np.minimum(np.searchsorted(held, ids), max(0, len(held) - 1))
        present = ids[held[pos] == ids] if len(held) else ids[:0]
        out = np.empty(len(present), dtype=np.float32)
        for lo in range(0, len(present), RECONSTRUCT_CHUNK):
            rows = self.index.reconstruct_batch(present[lo:lo + RECONSTRUCT_CHUNK])
            out[lo:lo + len(rows)] = rows @ query
        return present, out

    def held_ids(self) -> np.ndarray:
        """The sorted ids of the index (a filter may allow rows the served file does not hold yet);
        made once, with the IVF's direct map that reconstruction needs."""
        if self._held is None:
            with self._lock:
                if self._held is None:
                    inner = faiss.downcast_index(self.index.index)
                    if isinstance(inner, faiss.IndexIVF) and inner.direct_map.type == faiss.DirectMap.NoMap:
                        inner.make_direct_map()
                    self._held = np.sort(faiss.vector_to_array(self.index.id_map).astype(np.int64))
        return self._held


def exact_rounds(scorer: ExactScorer, query: np.ndarray, ids: np.ndarray, k: int) -> Iterator[Candidates]:
    """Exact plan: every allowed id scored once, then handed out best first in growing prefixes
    (ties broken by id, so the order is the brute-force one)."""
    present, scores = scorer.scores(query, ids)
    order = np.lexsort((present, -scores))
    fetch = min(len(order), 2 * k)
    while True:
        top = order[:fetch]
        yield [(int(present[j]), float(scores[j])) for j in top]
        if fetch >= len(order):
            return
        fetch = min(len(order), fetch * 4)


def index_rounds(index, query: np.ndarray, k: int, total: int, selection: Selection | None) -> Iterator[Candidates]:
    """Index plan: search with the filter as a selector, growing the candidates fetched and the lists
    probed each round until both are exhausted (then the last round is an exhaustive scan)."""
    ivf = ivf_of(index)
    nlist = int(ivf.nlist) if ivf is not None else None
    nprobe = int(ivf.nprobe) if ivf is not None else None
    selector = selection.selector() if selection is not None else None
    fetch = max(1, min(total, 2 * k))
    if selection is not None and nprobe is not None:  # probe enough lists to meet `fetch` allowed vectors
        nprobe = min(nlist, max(nprobe, math.ceil(fetch * nlist / max(1, selection.count))))
    query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    while True:
        params = _params(selector, nprobe)
        scores, ids = index.search(query, fetch, params=params)
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        yield found
        probes_left = nprobe is not None and nprobe < nlist
        if fetch >= total and not probes_left:
            return
        if probes_left and len(found) < fetch:  # the probed lists hold too few allowed vectors
            nprobe = min(nlist, nprobe * 4)
        elif fetch < total:
            fetch = min(total, fetch * 4)
        else:
            nprobe = min(nlist, nprobe * 4)


def _params(selector, nprobe: int | None):
    if nprobe is not None:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
    elif selector is not None:
        params = faiss.SearchParameters()
    else:
        return None
    if selector is not None:
        params.sel = selector
        params._selector_ref = selector  # keep the selector alive as long as the params
    return params


def candidate_rounds(index, scorer: ExactScorer, query: np.ndarray, k: int,
                     selection: Selection | None) -> tuple[str, Iterator[Candidates]]:
    """(plan name, rounds of candidates) for one query; see the module docstring."""
    total = int(index.ntotal)
    if selection is not None:
        ivf = ivf_of(index)
        plan = choose_plan(selection.count, total, k, int(ivf.nlist) if ivf is not None else None,
                           int(ivf.nprobe) if ivf is not None else None,
                           scorer.capable and selection.ids is not None)
        if plan == "exact":
            return plan, exact_rounds(scorer, np.asarray(query, dtype=np.float32).ravel(), selection.ids, k)
        total = min(total, selection.count)
    return "index", index_rounds(index, query, k, total, selection)
