"""`Engine`: the one object the web app and the CLI ask -- text, image, label and report queries.

Opened once on a data dir; safe to share across threads. It serves the active index
generation and switches to a newer one (after `radlens index` finishes) without a restart.
"""

from __future__ import annotations

import io
import itertools
import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrmodel.applicability import Decision, decide_from_metadata, decide_from_model
from cxrmodel.constants import DEFAULT_DATA_DIR
from cxrmodel.encoder import Encoder, EncoderConfig, load_encoder
from cxrmodel.errors import DataError, ModelLoadError
from cxrmodel.images import DecodedImage, ImageLimits, decode_bytes, load_image
from cxrmodel.prompts import LabelConfig, load_label_config
from cxrmodel.report import Report, compose_report
from cxrmodel.zeroshot import LabelScore, label_image
from indexer.store import (
    DecisionRow,
    Generation,
    ImageRow,
    ScoreRow,
    active_generation,
    default_db_url,
    has_database,
    open_db,
)

from .filters import Filters, matching_ids_query, parse_filters
from .knn import Selection, candidate_rounds
from .served import ServedState, StateLoader

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
    upload_side: int | None = field(default=2048, metadata={
        "help": "Uploads are reduced to about this many pixels on the long side as they are decoded."})

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
    generation: int | None = None  # the index generation that answered (its model made the score)

    def top_pathologies(self, n: int = 3) -> list[tuple[str, float]]:
        return sorted(self.pathologies.items(), key=lambda kv: -kv[1])[:n]

    def to_dict(self) -> dict:
        return {"id": self.id, "score": round(self.score, 6), "generation": self.generation, "image": self.image,
                "applicability": self.applicability,
                "pathologies": {k: round(v, 4) for k, v in self.pathologies.items()},
                "top_pathologies": [{"pathology": p, "probability": round(v, 4)} for p, v in self.top_pathologies()]}


class Engine:
    """Answers queries on one data dir; thread-safe. Every query runs on one `ServedState` snapshot."""

    def __init__(self, config: EngineConfig, encoder: Encoder, labels: LabelConfig, owns_encoder: bool = False):
        self.config = config
        self.labels = labels
        self._owns_encoder = owns_encoder  # loaded from the index's own record, so it may follow a rebuild
        self._initial_encoder = encoder
        self._set_cache_dir(encoder)
        self.db = open_db(config.url, create=False)
        self._loader = StateLoader(self.db, Path(config.data_dir), config.reload_interval, self._encoder_for)
        self._loader.current(force=True)

    @staticmethod
    def check_openable(config: EngineConfig) -> Generation:
        """The served generation (detached); a clear DataError when there is none."""
        if config.db_url is None and not has_database(config.data_dir):
            raise DataError(f"no RadLens index in {config.data_dir}: run `radlens index SRC --data-dir "
                            f"{config.data_dir}` first")
        db = open_db(config.url, create=False)
        try:
            with Session(db) as session:
                gen = active_generation(session)
                if gen is None:
                    raise DataError(f"the index in {config.data_dir} is empty or unfinished: run `radlens index`")
                session.expunge(gen)
                return gen
        finally:
            db.dispose()

    @classmethod
    def open(cls, config: EngineConfig, encoder: Encoder | None = None) -> Engine:
        """Open a data dir, loading the encoder its index was built with (unless one is given)."""
        gen = cls.check_openable(config)
        labels = load_label_config(config.labels_file)
        owns = encoder is None
        if encoder is None:
            encoder = _encoder_for(config, gen)
        if config.model is None and encoder.adapter_hash != gen.adapter_hash:
            raise ModelLoadError("the adapter on disk differs from the one the index was built with; "
                                 "re-index with `radlens index --rebuild`")
        return cls(config, encoder, labels, owns_encoder=owns and config.model is None)

    def close(self) -> None:
        """Release the DB connection pool."""
        self.db.dispose()

    # -- the served state ------------------------------------------------------------------------
    def state(self) -> ServedState:
        """The snapshot (generation, encoder, index, caches) a query should use now."""
        return self._loader.current()

    @property
    def encoder(self) -> Encoder:
        """The encoder of the served generation."""
        return self.state().encoder

    def _set_cache_dir(self, encoder: Encoder) -> Encoder:
        if encoder.cache_dir is None:
            encoder.cache_dir = Path(self.config.data_dir) / "cache"
        return encoder

    def _encoder_for(self, gen: Generation) -> Encoder:
        """The encoder that serves `gen`: the current one when it made it, a freshly loaded one when this
        engine follows the index's model, else a DataError (the loader then keeps the old state)."""
        state = self._loader.state
        current = state.encoder if state is not None else self._initial_encoder
        if gen.serves(current.identity):
            return current
        if self._owns_encoder:
            log.info("generation %d was built with %s; loading that model", gen.id, gen.describe())
            encoder = self._set_cache_dir(_encoder_for(self.config, gen))
            if not gen.serves(encoder.identity):
                raise DataError(f"generation {gen.id} was built with {gen.describe()}, which cannot be loaded "
                                f"as it was (got {encoder.identity['model']!r})")
            return encoder
        if state is None and gen.dim == current.dim:
            log.warning("serving generation %d (built with %s) with the model given: %s", gen.id, gen.describe(),
                        current.model_name)
            return current
        raise DataError(f"the index (generation {gen.id}) holds {gen.dim}-d vectors built with {gen.describe()}, "
                        f"but the model given makes {current.dim}-d ones ({current.model_name})")

    def _valid_id(self, image_id) -> bool:
        """True for ids this database can hold (a larger one can name no image, and must not reach SQL)."""
        try:
            return 0 <= int(image_id) <= MAX_ID.get(self.db.dialect.name, 2**63 - 1)
        except (TypeError, ValueError):
            return False

    @property
    def generation(self) -> int:
        return self.state().generation

    def stats(self) -> dict:
        """Size and identity of the served index."""
        state = self.state()
        return {"generation": state.generation, "vectors": int(state.index.ntotal),
                "index_type": state.meta.factory, "model": state.encoder.model_name, "dim": state.encoder.dim,
                "adapter": bool(state.encoder.adapter)}

    # -- queries ---------------------------------------------------------------------------------
    def parse_filters(self, expressions: list[str] | None) -> Filters:
        """Parse CLI/web filter strings against this engine's pathologies."""
        return parse_filters(expressions, list(self.labels.pathologies))

    def text(self, query: str, k: int = 10, filters: Filters | None = None) -> list[Hit]:
        """Images best matching a text query, best first."""
        if not query or not query.strip():
            raise DataError("empty query")
        state = self.state()
        return self._search(state, state.encoder.encode_texts([query.strip()])[0], k, filters)

    def embed(self, image: Image.Image | DecodedImage, state: ServedState | None = None) -> np.ndarray:
        """One image's unit vector (compute it once when several queries need it)."""
        return (state or self.state()).encoder.encode_images([_pil(image)])[0]

    def image(self, image: Image.Image | DecodedImage, k: int = 10, filters: Filters | None = None) -> list[Hit]:
        """Indexed images most similar to `image`, best first."""
        state = self.state()
        return self._search(state, self.embed(image, state), k, filters)

    def search_vector(self, vector: np.ndarray, k: int = 10, filters: Filters | None = None,
                      state: ServedState | None = None) -> list[Hit]:
        """Nearest indexed images to a unit vector made by `state`'s encoder (default: the served one);
        exact duplicates (same content hash) collapse. Returns min(k, distinct allowed images) hits."""
        return self._search(state or self.state(), vector, k, filters)

    def _search(self, state: ServedState, vector: np.ndarray, k: int, filters: Filters | None) -> list[Hit]:
        k = max(1, min(int(k), 1000))
        vector = np.ascontiguousarray(vector, dtype=np.float32).ravel()
        if vector.shape[0] != state.encoder.dim:
            raise DataError(f"a {vector.shape[0]}-d query cannot search a {state.encoder.dim}-d index")
        selection = self.selection(filters, state) if filters else None
        if selection is not None and selection.count == 0:
            return []
        hits: list[Hit] = []
        _, rounds = candidate_rounds(state.index, state.scorer, vector, k, selection)
        for found in rounds:
            hits = self._hits(found, state.generation, k)
            if len(hits) >= k:
                break
        return hits

    def selection(self, filters: Filters, state: ServedState | None = None) -> Selection:
        """The ids `filters` allow in the served generation, fetched once per state and filter."""
        state = state or self.state()

        def fetch() -> np.ndarray:
            with Session(self.db) as session:
                return np.fromiter(session.scalars(matching_ids_query(filters, state.generation)), dtype=np.int64)
        return state.selection(filters.cache_key(), fetch)

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
                hits.append(Hit(image_id, score, row.to_dict(), scores.get(image_id, {}), decisions.get(image_id),
                                generation))
                if len(hits) == k:
                    break
        return hits

    # -- images, labels, reports ---------------------------------------------------------------
    def get(self, image_id: int, state: ServedState | None = None) -> dict | None:
        """Metadata and stored pathology scores of one indexed image, or None."""
        state = state or self.state()
        if not self._valid_id(image_id):
            return None
        with Session(self.db) as session:
            row = session.get(ImageRow, int(image_id))
            if row is None:
                return None
            out = row.to_dict()
            out["scores"] = {s.pathology: {"probability": s.probability, "uncertainty": s.uncertainty}
                             for s in session.scalars(select(ScoreRow).where(
                                 ScoreRow.generation_id == state.generation, ScoreRow.image_id == row.id))}
            decision = session.get(DecisionRow, (state.generation, row.id))
            out["applicability"] = decision.to_dict() if decision else None
        return out

    def load(self, image_id: int) -> DecodedImage:
        """Decode an indexed image from its stored path (by DB id only)."""
        path = None
        if self._valid_id(image_id):
            with Session(self.db) as session:
                row = session.get(ImageRow, int(image_id))
                path = row.path if row is not None else None
        if path is None:
            raise DataError(f"no image with id {image_id}")
        return load_image(path, self.config.limits)

    def decode_upload(self, data: bytes, name: str = "upload") -> DecodedImage:
        """Decode uploaded bytes under this engine's limits, reduced to a working size (`upload_side`)."""
        return decode_bytes(data, name=name, limits=replace(self.config.limits, max_side=self.config.upload_side))

    def label(self, image: Image.Image | DecodedImage, state: ServedState | None = None) -> list[LabelScore]:
        """Full-ensemble zero-shot scores of the 14 pathologies for one image (whether or not they apply)."""
        return label_image((state or self.state()).encoder, _pil(image), self.labels)

    def applicability(self, image: Image.Image | DecodedImage, metadata: dict | None = None,
                      vector: np.ndarray | None = None, state: ServedState | None = None) -> Decision:
        """Do the 14 labels apply? From metadata when it settles it (no model call), else from the model
        (using `vector` when the caller already embedded the image with `state`'s encoder)."""
        meta = {**(image.metadata if isinstance(image, DecodedImage) else {}), **(metadata or {})}
        decided = decide_from_metadata(meta)
        if decided is not None:
            return decided
        state = state or self.state()
        vec = self.embed(image, state) if vector is None else vector
        return decide_from_model(state.encoder, vec[None, :], self.labels.applicability)[0]

    def assess(self, image: Image.Image | DecodedImage, metadata: dict | None = None,
               vector: np.ndarray | None = None, state: ServedState | None = None
               ) -> tuple[Decision, list[LabelScore]]:
        """The applicability decision and, only where the labels apply, their scores."""
        state = state or self.state()
        decision = self.applicability(image, metadata, vector, state)
        return decision, (self.label(image, state) if decision.applicable else [])

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
        """Report, scores, applicability and metadata of an indexed image (DataError when unknown).

        The full label ensemble runs once per image and served state; page, charts and downloads
        then share it, whatever their threshold or language.
        """
        state = self.state()
        meta = self.get(image_id, state)
        if meta is None:
            raise DataError(f"no image with id {image_id}")
        stored = meta.get("applicability")
        if stored is not None:  # the decision made at index time, so page, filters and report agree
            decision = Decision(**stored)
            scores = state.labels_for(image_id, lambda: self.label(self.load(image_id), state)) \
                if decision.applicable else []
        else:
            image = self.load(image_id)
            decision, scores = self.assess(image, meta, state=state)
        size = {"width": meta.get("width"), "height": meta.get("height")}
        return compose_report(scores, {**size, **meta}, self.labels, threshold, decision=decision, lang=lang), \
            scores, decision, meta

    def priors(self, image_id: int) -> dict:
        """The same patient's indexed studies in date order, with stored scores and the change per pathology.

        Studies are linked by the salted patient hash only; no key is ever returned.
        """
        state = self.state()
        with Session(self.db) as session:
            row = session.get(ImageRow, int(image_id)) if self._valid_id(image_id) else None
            if row is None:
                raise DataError(f"no image with id {image_id}")
            if row.patient_hash is None:
                return {"studies": [], "changes": [], "reason": "the metadata carries no patient key"}
            rows = session.scalars(select(ImageRow).where(ImageRow.patient_hash == row.patient_hash)
                                   .order_by(ImageRow.study_date.asc().nulls_last(), ImageRow.id)).all()
            ids = [r.id for r in rows]
            scores: dict[int, dict[str, float]] = {}
            for s in session.scalars(select(ScoreRow).where(ScoreRow.generation_id == state.generation,
                                                            ScoreRow.image_id.in_(ids))):
                scores.setdefault(s.image_id, {})[s.pathology] = round(s.probability, 4)
            studies = [{"id": r.id, "study_date": r.study_date, "file_name": Path(r.path).name,
                        "modality": r.modality, "view": r.view, "current": r.id == row.id,
                        "scores": scores.get(r.id, {})} for r in rows]
        changes = []
        for before, after in itertools.pairwise(studies):
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


def _encoder_for(config: EngineConfig, gen: Generation) -> Encoder:
    """Load the encoder a generation was built with (or the configured override)."""
    if gen.adapter_path and not Path(gen.adapter_path).exists():
        raise ModelLoadError(f"the index was built with adapter {gen.adapter_path}, which no longer exists")
    return load_encoder(EncoderConfig(model=config.model or gen.model, adapter=gen.adapter_path,
                                      precision=config.precision, device=config.device,
                                      revision=None if config.model else gen.model_revision))


MAX_ID = {"postgresql": 2**31 - 1}  # images.id is INTEGER: 32-bit there, 64-bit on SQLite


def _pil(image: Image.Image | DecodedImage) -> Image.Image:
    """The PIL image of a decoded upload (or the image itself)."""
    return image.image if isinstance(image, DecodedImage) else image
