"""`Engine`: the one object the web app and the CLI ask -- text, image, label and report queries.

Opened once on a data dir; safe to share across threads. It serves the active index
generation and switches to a newer one (after `radlens index` finishes) without a restart.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrmodel.applicability import Decision, decide_from_metadata, decide_from_model
from cxrmodel.encoder import Encoder, EncoderConfig, load_encoder
from cxrmodel.errors import DataError, ModelLoadError
from cxrmodel.images import DecodedImage, ImageLimits, decode_bytes, load_image
from cxrmodel.prompts import LabelConfig, load_label_config
from cxrmodel.report import Report, compose_report
from cxrmodel.zeroshot import LabelScore, label_image

from indexer.pipeline import DEFAULT_DATA_DIR
from indexer.store import (DecisionRow, ImageRow, ScoreRow, active_generation, default_db_url, has_database,
                           open_db)
from indexer.vectors import IndexMeta, read_index

from .filters import Filters, matching_ids_query, parse_filters

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Where the index lives and how to run queries."""

    data_dir: Path = field(default_factory=lambda: Path(DEFAULT_DATA_DIR))
    db_url: str | None = None
    model: str | None = field(default=None, metadata={"help": "Override the model the index was built with."})
    precision: str = "auto"
    device: str = "auto"
    labels_file: str | None = field(default=None, metadata={"help": "JSON overriding prompts/thresholds."})
    reload_interval: float = field(default=1.0, metadata={"help": "Seconds between checks for a new index."})
    limits: ImageLimits = field(default_factory=ImageLimits)

    @property
    def url(self) -> str:
        return self.db_url or default_db_url(self.data_dir)


@dataclass
class Hit:
    """One search result."""

    id: int
    score: float
    image: dict
    pathologies: dict[str, float] = field(default_factory=dict)
    applicability: dict | None = None

    def top_pathologies(self, n: int = 3) -> list[tuple[str, float]]:
        return sorted(self.pathologies.items(), key=lambda kv: -kv[1])[:n]

    def to_dict(self) -> dict:
        return {"id": self.id, "score": round(self.score, 6), "image": self.image,
                "applicability": self.applicability,
                "pathologies": {k: round(v, 4) for k, v in self.pathologies.items()},
                "top_pathologies": [{"pathology": p, "probability": round(v, 4)} for p, v in self.top_pathologies()]}


class _Served:
    """The FAISS index of one generation, as loaded."""

    def __init__(self, generation: int, index: faiss.Index, meta: IndexMeta, stamp: float):
        self.generation, self.index, self.meta, self.stamp = generation, index, meta, stamp


class Engine:
    """Answers queries on one data dir; thread-safe."""

    def __init__(self, config: EngineConfig, encoder: Encoder, labels: LabelConfig, owns_encoder: bool = False):
        self.config = config
        self.encoder = encoder
        self.labels = labels
        self._owns_encoder = owns_encoder  # loaded from the index's own record, so it may follow a rebuild
        if encoder.cache_dir is None:
            encoder.cache_dir = Path(config.data_dir) / "cache"
        self.db = open_db(config.url, create=False)
        self._lock = threading.Lock()
        self._served: _Served | None = None
        self._checked_at = 0.0
        self._refresh(force=True)

    @staticmethod
    def check_openable(config: EngineConfig) -> tuple[str, str | None, str | None]:
        """(model, adapter path, adapter hash) of the served index; a clear DataError when there is none."""
        if config.db_url is None and not has_database(config.data_dir):
            raise DataError(f"no RadLens index in {config.data_dir}: run `radlens index SRC --data-dir "
                            f"{config.data_dir}` first")
        db = open_db(config.url, create=False)
        try:
            with Session(db) as session:
                gen = active_generation(session)
                if gen is None:
                    raise DataError(f"the index in {config.data_dir} is empty or unfinished: run `radlens index`")
                return gen.model, gen.adapter_path, gen.adapter_hash
        finally:
            db.dispose()

    @classmethod
    def open(cls, config: EngineConfig, encoder: Encoder | None = None) -> "Engine":
        """Open a data dir, loading the encoder its index was built with (unless one is given)."""
        model, adapter, adapter_hash = cls.check_openable(config)
        labels = load_label_config(config.labels_file)
        owns = encoder is None
        if encoder is None:
            encoder = _encoder_for(config, model, adapter)
        if config.model is None and encoder.adapter_hash != adapter_hash:
            raise ModelLoadError("the adapter on disk differs from the one the index was built with; "
                                 "re-index with `radlens index --rebuild`")
        return cls(config, encoder, labels, owns_encoder=owns and config.model is None)

    def close(self) -> None:
        """Release the DB connection pool."""
        self.db.dispose()

    # -- index management -------------------------------------------------------------------
    def _refresh(self, force: bool = False) -> _Served:
        now = time.monotonic()
        served = self._served
        if not force and served is not None and now - self._checked_at < self.config.reload_interval:
            return served
        with self._lock:
            self._checked_at = now
            with Session(self.db) as session:
                gen = active_generation(session)
            if gen is None:
                raise DataError("the index has no active generation")
            meta_path = Path(self.config.data_dir) / "index" / f"g{gen.id}.json"
            try:
                stamp = meta_path.stat().st_mtime_ns
            except OSError:
                stamp = -1
            if served is None or served.generation != gen.id or served.stamp != stamp:
                if not gen.matches(self.encoder.identity):
                    if self._owns_encoder:
                        log.info("index built with %s; loading that model", gen.model)
                        self.encoder = _encoder_for(self.config, gen.model, gen.adapter_path)
                        self.encoder.cache_dir = Path(self.config.data_dir) / "cache"
                    elif served is not None:
                        log.warning("generation %d was built by another model; keep serving the previous one",
                                    gen.id)
                        return served
                    elif gen.dim != self.encoder.dim:
                        raise DataError(f"the index holds {gen.dim}-d vectors but the model makes "
                                        f"{self.encoder.dim}-d ones")
                loaded = read_index(self.config.data_dir, gen.id, mmap=True)
                if loaded is None:
                    if served is not None:
                        return served
                    raise DataError(f"the FAISS index of generation {gen.id} is missing; run `radlens index`")
                self._served = _Served(gen.id, loaded[0], loaded[1], stamp)
                log.info("serving generation %d (%d vectors)", gen.id, loaded[0].ntotal)
            return self._served

    @property
    def generation(self) -> int:
        return self._refresh().generation

    def stats(self) -> dict:
        """Size and identity of the served index."""
        served = self._refresh()
        return {"generation": served.generation, "vectors": int(served.index.ntotal),
                "index_type": served.meta.factory, "model": self.encoder.model_name, "dim": self.encoder.dim,
                "adapter": bool(self.encoder.adapter)}

    # -- queries ---------------------------------------------------------------------------------
    def parse_filters(self, expressions: list[str] | None) -> Filters:
        """Parse CLI/web filter strings against this engine's pathologies."""
        return parse_filters(expressions, list(self.labels.pathologies))

    def text(self, query: str, k: int = 10, filters: Filters | None = None) -> list[Hit]:
        """Images best matching a text query, best first."""
        if not query or not query.strip():
            raise DataError("empty query")
        return self.search_vector(self.encoder.encode_texts([query.strip()])[0], k, filters)

    def embed(self, image: Image.Image | DecodedImage) -> np.ndarray:
        """One image's unit vector (compute it once when several queries need it)."""
        return self.encoder.encode_images([_pil(image)])[0]

    def image(self, image: Image.Image | DecodedImage, k: int = 10, filters: Filters | None = None) -> list[Hit]:
        """Indexed images most similar to `image`, best first."""
        return self.search_vector(self.embed(image), k, filters)

    def search_vector(self, vector: np.ndarray, k: int = 10, filters: Filters | None = None) -> list[Hit]:
        """Nearest indexed images to a unit vector; exact duplicates (same content hash) collapse."""
        k = max(1, min(int(k), 1000))
        served = self._refresh()
        index = served.index
        allowed = None
        if filters:
            with Session(self.db) as session:
                allowed = np.fromiter(session.scalars(matching_ids_query(filters, served.generation)),
                                      dtype=np.int64)
            if len(allowed) == 0:
                return []
        total = int(index.ntotal) if allowed is None else min(int(index.ntotal), len(allowed))
        fetch = min(total, 2 * k)
        inner = faiss.downcast_index(index.index)
        nprobe = inner.nprobe if isinstance(inner, faiss.IndexIVF) else None
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        while True:
            scores, ids = index.search(query, max(fetch, 1), params=_search_params(allowed, nprobe))
            found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
            hits = self._hits(found, served.generation, k)
            exhausted = fetch >= total and (nprobe is None or nprobe >= inner.nlist)
            if len(hits) >= k or exhausted:
                return hits
            if len(found) < fetch and nprobe is not None:
                nprobe = min(inner.nlist, nprobe * 4)  # IVF found too few under the filter: probe more lists
            fetch = min(total, fetch * 4)

    def _hits(self, found: list[tuple[int, float]], generation: int, k: int) -> list[Hit]:
        if not found:
            return []
        ids = [i for i, _ in found]
        with Session(self.db) as session:
            rows = {r.id: r for r in session.scalars(select(ImageRow).where(ImageRow.id.in_(ids)))}
            scores: dict[int, dict[str, float]] = {}
            for s in session.scalars(select(ScoreRow).where(ScoreRow.generation_id == generation,
                                                            ScoreRow.image_id.in_(ids))):
                scores.setdefault(s.image_id, {})[s.pathology] = s.probability
            decisions = {d.image_id: d.to_dict() for d in session.scalars(select(DecisionRow).where(
                DecisionRow.generation_id == generation, DecisionRow.image_id.in_(ids)))}
            hits, seen = [], set()
            for image_id, score in found:
                row = rows.get(image_id)
                if row is None or row.content_hash in seen:
                    continue
                seen.add(row.content_hash)
                hits.append(Hit(image_id, score, row.to_dict(), scores.get(image_id, {}), decisions.get(image_id)))
                if len(hits) == k:
                    break
        return hits

    # -- images, labels, reports ---------------------------------------------------------------
    def get(self, image_id: int) -> dict | None:
        """Metadata and stored pathology scores of one indexed image, or None."""
        served = self._refresh()
        with Session(self.db) as session:
            row = session.get(ImageRow, int(image_id))
            if row is None:
                return None
            out = row.to_dict()
            out["scores"] = {s.pathology: {"probability": s.probability, "uncertainty": s.uncertainty}
                             for s in session.scalars(select(ScoreRow).where(
                                 ScoreRow.generation_id == served.generation, ScoreRow.image_id == row.id))}
            decision = session.get(DecisionRow, (served.generation, row.id))
            out["applicability"] = decision.to_dict() if decision else None
        return out

    def load(self, image_id: int) -> DecodedImage:
        """Decode an indexed image from its stored path (by DB id only)."""
        with Session(self.db) as session:
            row = session.get(ImageRow, int(image_id))
            path = row.path if row is not None else None
        if path is None:
            raise DataError(f"no image with id {image_id}")
        return load_image(path, self.config.limits)

    def decode_upload(self, data: bytes, name: str = "upload") -> DecodedImage:
        """Decode uploaded bytes under this engine's limits."""
        return decode_bytes(data, name=name, limits=self.config.limits)

    def label(self, image: Image.Image | DecodedImage) -> list[LabelScore]:
        """Full-ensemble zero-shot scores of the 14 pathologies for one image (whether or not they apply)."""
        return label_image(self.encoder, _pil(image), self.labels)

    def applicability(self, image: Image.Image | DecodedImage, metadata: dict | None = None,
                      vector: np.ndarray | None = None) -> Decision:
        """Do the 14 labels apply? From metadata when it settles it (no model call), else from the model
        (using `vector` when the caller already embedded the image)."""
        meta = {**(image.metadata if isinstance(image, DecodedImage) else {}), **(metadata or {})}
        decided = decide_from_metadata(meta)
        if decided is not None:
            return decided
        vec = self.embed(image) if vector is None else vector
        return decide_from_model(self.encoder, vec[None, :], self.labels.applicability)[0]

    def assess(self, image: Image.Image | DecodedImage, metadata: dict | None = None,
               vector: np.ndarray | None = None) -> tuple[Decision, list[LabelScore]]:
        """The applicability decision and, only where the labels apply, their scores."""
        decision = self.applicability(image, metadata, vector)
        return decision, (self.label(image) if decision.applicable else [])

    def report(self, image: Image.Image | DecodedImage, metadata: dict | None = None,
               threshold: float | None = None, scores: list[LabelScore] | None = None,
               decision: Decision | None = None, lang: str = "en") -> Report:
        """Structured report for one image (applicability and scores computed unless given)."""
        meta = dict(metadata or {})
        if isinstance(image, DecodedImage):
            meta = {**image.metadata, "width": image.width, "height": image.height, **meta}
        if scores is None:
            decision, scores = self.assess(image, meta)
        return compose_report(scores, meta, self.labels, threshold, decision=decision, lang=lang)

    def report_for_id(self, image_id: int, threshold: float | None = None, lang: str = "en"
                      ) -> tuple[Report, list[LabelScore], Decision, dict]:
        """Report, scores, applicability and metadata of an indexed image (DataError when unknown)."""
        meta = self.get(image_id)
        if meta is None:
            raise DataError(f"no image with id {image_id}")
        image = self.load(image_id)
        stored = meta.get("applicability")
        if stored is not None:  # the decision made at index time, so page, filters and report agree
            decision = Decision(**stored)
            scores = self.label(image) if decision.applicable else []
        else:
            decision, scores = self.assess(image, meta)
        return self.report(image, meta, threshold, scores, decision, lang), scores, decision, meta

    def priors(self, image_id: int) -> dict:
        """The same patient's indexed studies in date order, with stored scores and the change per pathology.

        Studies are linked by the salted patient hash only; no key is ever returned.
        """
        served = self._refresh()
        with Session(self.db) as session:
            row = session.get(ImageRow, int(image_id))
            if row is None:
                raise DataError(f"no image with id {image_id}")
            if row.patient_hash is None:
                return {"studies": [], "changes": [], "reason": "the metadata carries no patient key"}
            rows = session.scalars(select(ImageRow).where(ImageRow.patient_hash == row.patient_hash)
                                   .order_by(ImageRow.study_date.asc().nulls_last(), ImageRow.id)).all()
            ids = [r.id for r in rows]
            scores: dict[int, dict[str, float]] = {}
            for s in session.scalars(select(ScoreRow).where(ScoreRow.generation_id == served.generation,
                                                            ScoreRow.image_id.in_(ids))):
                scores.setdefault(s.image_id, {})[s.pathology] = round(s.probability, 4)
            studies = [{"id": r.id, "study_date": r.study_date, "file_name": Path(r.path).name,
                        "modality": r.modality, "view": r.view, "current": r.id == row.id,
                        "scores": scores.get(r.id, {})} for r in rows]
        changes = []
        for before, after in zip(studies, studies[1:]):
            common = set(before["scores"]) & set(after["scores"])
            changes.append({"from": before["id"], "to": after["id"],
                            "delta": {p: round(after["scores"][p] - before["scores"][p], 4) for p in sorted(common)}})
        return {"studies": studies, "changes": changes}

    def thumbnail(self, image_id: int, size: int = 256) -> bytes:
        """PNG thumbnail of an indexed image, generated once and cached under the data dir."""
        meta = self.get(image_id)
        if meta is None:
            raise DataError(f"no image with id {image_id}")
        cache = Path(self.config.data_dir) / "thumbs" / f"{meta['content_hash']}-{int(size)}.png"
        if cache.exists():
            return cache.read_bytes()
        image = self.load(image_id).image.copy()
        image.thumbnail((size, size))
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(cache)
        return buf.getvalue()


def _encoder_for(config: EngineConfig, model: str, adapter: str | None) -> Encoder:
    """Load the encoder an index generation was built with (or the configured override)."""
    if adapter and not Path(adapter).exists():
        raise ModelLoadError(f"the index was built with adapter {adapter}, which no longer exists")
    return load_encoder(EncoderConfig(model=config.model or model, adapter=adapter, precision=config.precision,
                                      device=config.device))


def _search_params(allowed: np.ndarray | None, nprobe: int | None):
    if allowed is None and nprobe is None:
        return None
    sel = faiss.IDSelectorBatch(allowed) if allowed is not None else None
    if nprobe is not None:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
    else:
        params = faiss.SearchParameters()
    if sel is not None:
        params.sel = sel
    params._selector_ref = sel  # keep the selector alive as long as the params
    return params


def _pil(image: Image.Image | DecodedImage) -> Image.Image:
    """The PIL image of a decoded upload (or the image itself)."""
    return image.image if isinstance(image, DecodedImage) else image
