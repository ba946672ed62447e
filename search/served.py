"""The served state of a data dir -- (generation, encoder, index) as one snapshot -- and its reloads.

A query takes one `ServedState` and uses nothing else: the vector it embeds, the index it searches,
the rows and scores it reads and the labels it computes all belong to the same generation. A new
index (after `radlens index`) or a new model (after `index --rebuild` with another one) is loaded
into a new state and swapped in by one assignment; queries already running finish on the old one.
While one thread loads a new state, the others keep answering from the current one.

Each state carries its own caches (filter selections, label scores), so nothing cached can
outlive the index, the model or the metadata it was computed from.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy.engine import Engine as DB
from sqlalchemy.orm import Session

from cxrmodel.errors import DataError
from indexer.store import Generation, active_generation, published_version
from indexer.vectors import IndexMeta, index_paths, read_index

from .knn import ExactScorer, Selection

log = logging.getLogger(__name__)


class LRU:
    """A small thread-safe least-recently-used map, bounded by entries and by a byte budget."""

    def __init__(self, max_entries: int, max_bytes: int | None = None, size: Callable[[object], int] = lambda v: 0):
        self.max_entries, self.max_bytes, self.size = max_entries, max_bytes, size
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get_or_make(self, key: Hashable, make: Callable[[], object]):
        """The cached value of `key`, made (outside the lock) when missing."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self._bytes += self.size(value)
                while len(self._items) > self.max_entries or (
                        self.max_bytes is not None and self._bytes > self.max_bytes and len(self._items) > 1):
                    _, old = self._items.popitem(last=False)
                    self._bytes -= self.size(old)
            return self._items[key]

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class ServedState:
    """Everything one query needs, from one generation. Never mutated after it is served."""

    generation: int
    encoder: object  # cxrmodel.model.encoder.Encoder
    index: object  # faiss index or indexer.compressed.RerankedIndex
    meta: IndexMeta
    key: tuple  # (generation, index file stamp, published version): a change means a new state
    scorer: ExactScorer | None = None  # made for the index unless handed over (same index, see below)
    relevance: LRU | None = None  # the relevance baseline (one entry): index- and model-bound, so handed over
    selections: LRU = field(init=False)
    labels: LRU = field(init=False)
    facets: LRU = field(init=False)

    def __post_init__(self):
        self.scorer = self.scorer or ExactScorer(self.index)
        self.relevance = self.relevance or LRU(1)
        self.selections = LRU(64, max_bytes=256 << 20, size=lambda s: s.nbytes)
        self.labels = LRU(256)
        self.facets = LRU(64)

    def with_new_caches(self, key: tuple) -> ServedState:
        """The same index and encoder under a new key, with empty caches (metadata changed); the exact
        scorer's ids and direct map belong to the index, so they are kept."""
        return ServedState(self.generation, self.encoder, self.index, self.meta, key, self.scorer, self.relevance)

    def selection(self, filters: Hashable, fetch_ids: Callable[[], object]) -> Selection:
        """The cached `Selection` of a filter (fetching its ids from the DB once per state)."""
        return self.selections.get_or_make(filters, lambda: Selection.from_ids(fetch_ids()))

    def facet_counts(self, filters: Hashable, compute: Callable[[], dict]) -> dict:
        """The facet counts under a filter, counted once per state (a metadata change makes a new state)."""
        return self.facets.get_or_make(filters, compute)

    def baseline(self, compute: Callable[[], object]):
        """The relevance baseline of this index and model (`search.relevance`), computed on first use."""
        return self.relevance.get_or_make("baseline", compute)

    def labels_for(self, image_id: int, compute: Callable[[], list]) -> list:
        """An indexed image's label scores, computed once per state (copies: callers may edit them)."""
        return [replace(s) for s in self.labels.get_or_make(int(image_id), compute)]


@dataclass
class StateLoader:
    """Loads the active generation's state and reloads it when the DB or the index files change."""

    db: DB
    data_dir: Path
    reload_interval: float
    encoder_for: Callable[[Generation], object]  # the encoder that may serve a generation (may load one)
    state: ServedState | None = None
    _checked_at: float = 0.0
    _loading: threading.Lock = field(default_factory=threading.Lock)

    def current(self, force: bool = False) -> ServedState:
        """The state to answer with now (checking for a newer one at most every `reload_interval`)."""
        state = self.state
        if state is not None and not force and time.monotonic() - self._checked_at < self.reload_interval:
            return state
        if state is not None and not force:
            if not self._loading.acquire(blocking=False):
                return state  # another thread is loading a new state; keep answering from this one
        else:
            self._loading.acquire()
        try:
            self._checked_at = time.monotonic()
            self.state = self._load(self.state)
            return self.state
        finally:
            self._loading.release()

    def _load(self, state: ServedState | None) -> ServedState:
        with Session(self.db) as session:
            gen = active_generation(session)
            if gen is None:
                raise DataError("the index has no active generation")
            session.expunge(gen)
            published = published_version(session)
        _, meta_path = index_paths(self.data_dir, gen.id)
        try:
            stamp = meta_path.stat().st_mtime_ns
        except OSError:
            stamp = -1
        key = (gen.id, stamp, published)
        if state is not None and state.key == key:
            return state
        if state is not None and state.key[:2] == key[:2]:
            return state.with_new_caches(key)  # same index file, newer metadata
        try:
            encoder = self.encoder_for(gen)
        except DataError:
            if state is not None:
                log.warning("generation %d cannot be served with this model; keep serving generation %d",
                            gen.id, state.generation)
                return state
            raise
        loaded = read_index(self.data_dir, gen.id, mmap=True)
        if loaded is None:
            if state is not None:
                return state
            raise DataError(f"the FAISS index of generation {gen.id} is missing; run `radlens index`")
        log.info("serving generation %d (%d vectors)", gen.id, loaded[0].ntotal)
        return ServedState(gen.id, encoder, loaded[0], loaded[1], key)
