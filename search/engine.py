"""`Engine`: the one object the web app and the CLI ask -- text, image, label and report queries.

Opened once on a data dir; safe to share across threads. It serves the active index
generation and switches to a newer one (after `radlens index` finishes) without a restart.
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from cxrmodel.constants import DEFAULT_DATA_DIR, THUMBS_DIR
from cxrmodel.errors import DataError, ModelLoadError, NotFoundError
from cxrmodel.imaging.decode import (
    FACT_TAGS,
    DecodedImage,
    ImageLimits,
    dataset_facts,
    decode_bytes,
    file_facts,
    load_image,
    shrink_to_fit,
)
from cxrmodel.imaging.plausibility import assess_image
from cxrmodel.labels.applicability import Decision
from cxrmodel.labels.prompts import LabelConfig, load_label_config
from cxrmodel.labels.zeroshot import LabelScore
from cxrmodel.reporting.report import Report
from indexer.dicomweb import fetch, instance_header, is_dicomweb
from indexer.skipped import skipped_count
from indexer.store import Generation, active_generation, default_db_url, has_database, open_db

from .catalog import Catalog, Hit
from .encoders import served_encoder
from .filters import (
    METADATA_FILTERS,
    Filters,
    calibrated_filters,
    matching_ids_query,
    parse_filters,
    suggest_value,
)
from .knn import Selection, candidate_rounds
from .labelling import Labeller, model_input, report_metadata
from .relevance import Baseline, Match, baseline_key, build_baseline, cached_baseline
from .served import ServedState, StateLoader

if TYPE_CHECKING:
    from cxrmodel.model.encoder import Encoder

__all__ = ["Engine", "EngineConfig", "Hit"]

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
    calibration: str | None = field(default=None, metadata={
        "help": "calibration.json for the served model; None: the model directory's own, if it matches."})
    reload_interval: float = field(default=1.0, metadata={"help": "Seconds between checks for a new index."})
    limits: ImageLimits = field(default_factory=ImageLimits)
    upload_side: int | None = field(default=2048, metadata={
        "help": "Uploads are reduced to about this many pixels on the long side as they are decoded."})
    query_tower: bool = field(default=True, metadata={
        "help": "Text queries through the index's ONNX text tower when it has one (no torch until an image, "
                "label or report request); False: always the torch encoder."})
    query_tower_prepack: bool = field(default=True, metadata={
        "help": "Pre-pack the tower's weights: 0.1-0.2 s more to open, a few ms less per query (one-shot CLI "
                "queries turn it off)."})

    @property
    def url(self) -> str:
        return self.db_url or default_db_url(self.data_dir)


class Engine:
    """Answers queries on one data dir; thread-safe. Every query runs on one `ServedState` snapshot."""

    def __init__(self, config: EngineConfig, encoder: Encoder, labels: LabelConfig, owns_encoder: bool = False):
        self.config = config
        self.labels = labels
        self._owns_encoder = owns_encoder  # loaded from the index's own record, so it may follow a rebuild
        self._initial_encoder = encoder
        self._set_cache_dir(encoder)
        self.db = open_db(config.url, create=False)
        self.catalog = Catalog(self.db)
        self.labeller = Labeller(labels, config.calibration)
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
            encoder = served_encoder(config, gen)
        if config.model is None and encoder.adapter_hash != gen.adapter_hash:
            raise ModelLoadError("the adapter on disk differs from the one the index was built with; "
                                 "re-index with `radlens index --rebuild`")
        engine = cls(config, encoder, labels, owns_encoder=owns and config.model is None)
        if config.calibration:  # another model's calibration is refused now, not at the first request
            try:
                engine.labeller.calibration(encoder)
            except DataError:
                engine.close()
                raise
        return engine

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
            encoder = self._set_cache_dir(served_encoder(self.config, gen))
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

    @property
    def generation(self) -> int:
        return self.state().generation

    def stats(self) -> dict:
        """Size and identity of the served index."""
        state = self.state()
        return {"generation": state.generation, "vectors": int(state.index.ntotal), "skipped": skipped_count(self.db),
                "index_type": state.meta.factory, "model": state.encoder.model_name, "dim": state.encoder.dim,
                "adapter": bool(state.encoder.adapter), "format": state.encoder.identity.get("format")}

    # -- queries ---------------------------------------------------------------------------------
    def parse_filters(self, expressions: list[str] | None) -> Filters:
        """Parse CLI/web filter strings against this engine's pathologies. A pathology bound is a calibrated
        probability, so it is refused (DataError) for a pathology the served model does not assess, and
        becomes a bound on the stored raw score otherwise."""
        filters = parse_filters(expressions, list(self.labels.pathologies))
        if not filters.scores:
            return filters
        return calibrated_filters(filters, self.labeller.calibration(self.state().encoder))

    def text(self, query: str, k: int = 10, filters: Filters | None = None) -> list[Hit]:
        """Images best matching a text query, best first."""
        if not query or not query.strip():
            raise DataError("empty query")
        state = self.state()
        hits = self._search(state, state.encoder.encode_queries([query.strip()])[0], k, filters)
        baseline = self.baseline(state)
        for hit in hits:
            hit.match = baseline.text_match(hit.score)
        return hits

    def embed(self, image: Image.Image | DecodedImage, state: ServedState | None = None) -> np.ndarray:
        """One image's unit vector (compute it once when several queries need it)."""
        encoder = (state or self.state()).encoder
        return encoder.encode_images([model_input(image, encoder)])[0]

    def image(self, image: Image.Image | DecodedImage, k: int = 10, filters: Filters | None = None) -> list[Hit]:
        """Indexed images most similar to `image`, best first."""
        state = self.state()
        return self.mark_image_matches(self._search(state, self.embed(image, state), k, filters), state, query=image)

    def assessed_pathologies(self) -> list[str]:
        """The pathologies the served model's calibration shows skill for (the only ones a filter may use)."""
        calibration = self.labeller.calibration(self.encoder)
        return calibration.assessed if calibration is not None else []

    def facets(self, filters: Filters | None = None) -> dict[str, dict[str, int]]:
        """Counts of each modality, body part, view, source and format among the images `filters` allow in
        the served index (all of them without filters), most frequent first; counted once per served state
        and filter (GROUP BY over the whole table is not free at millions of rows)."""
        state, filters = self.state(), filters or Filters()
        return state.facet_counts(filters.cache_key(), lambda: self.catalog.facet_counts(
            METADATA_FILTERS, matching_ids_query(filters, state.generation), state.generation))

    def filter_hint(self, filters: Filters) -> str | None:
        """Why a metadata filter matches nothing, with the closest value present: "no image has modality
        'xray'; did you mean 'X-ray'?" (None when every metadata value exists)."""
        for key, value in filters.metadata:
            counts = self.facets()[key]  # the values the served index holds, counted once per state
            if any(v.strip().lower() == value.strip().lower() for v in counts):
                continue
            closest = suggest_value(value, list(counts))
            present = ", ".join(f"{v} ({n})" for v, n in sorted(counts.items(), key=lambda kv: -kv[1])[:8])
            return (f"no image has {key} {value!r}" + (f"; did you mean {closest!r}?" if closest else "")
                    + (f" Values present: {present}." if present else ""))
        return None

    def similarity(self, a: int, b: int) -> float | None:
        """Cosine similarity of two indexed images' stored embeddings (None when either has none)."""
        state = self.state()
        va, vb = self.catalog.vector(a, state.generation), self.catalog.vector(b, state.generation)
        return float(va @ vb) if va is not None and vb is not None else None

    def similar_to(self, image_id: int, k: int = 10, filters: Filters | None = None) -> list[Hit]:
        """"More like this": the indexed images most similar to indexed image `image_id` (by its stored
        embedding, no decoding), best first, without the image itself or its exact duplicates.
        NotFoundError when the id is not in the served index."""
        state = self.state()
        vector = self.catalog.vector(image_id, state.generation)
        record = self.catalog.record(image_id, state.generation) if vector is not None else None
        if record is None:
            raise NotFoundError(f"no image {image_id} in the served index")
        hits = self._search(state, vector, k + 1, filters)
        hits = [h for h in hits if h.id != image_id and h.image["content_hash"] != record["content_hash"]][:k]
        return self.mark_image_matches(hits, state)

    def mark_image_matches(self, hits: list[Hit], state: ServedState | None = None,
                           query: Image.Image | DecodedImage | None = None) -> list[Hit]:
        """Give image-query hits their relevance verdict (`search.relevance`). An uploaded `query` that the
        model-free check finds not to be a radiological image (noise, a photograph, a page of text) gets
        "none" for every hit, whatever its score: the nearest indexed images are then no similar cases."""
        baseline = self.baseline(state or self.state())
        for hit in hits:
            hit.match = baseline.image_match(hit.score)
        if query is not None and hits:
            plausible = assess_image(query)
            if not plausible.radiological:
                for hit in hits:
                    hit.match = Match("none", hit.match.percentile,
                                      f"the query is not a radiological image ({plausible.reason})", by_score=False)
        return hits

    def baseline(self, state: ServedState) -> Baseline:
        """What unrelated content scores in the served index (computed once per index and model)."""
        key = baseline_key(state.generation, {"revision": state.meta.revision, "count": state.meta.count,
                                              "factory": state.meta.factory}, state.encoder.query_fingerprint)
        return state.baseline(lambda: cached_baseline(Path(self.config.data_dir) / "cache", key,
                                                      lambda: build_baseline(state.encoder, state.index, state.scorer)))

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
            hits = self.catalog.hits(found, state.generation, k)
            if len(hits) >= k:
                break
        for hit in hits:  # only calibrated probabilities of assessed pathologies are shown with a hit
            hit.pathologies = self.labeller.stored(state.encoder, hit.pathologies)
        return hits

    def selection(self, filters: Filters, state: ServedState | None = None) -> Selection:
        """The ids `filters` allow in the served generation, fetched once per state and filter."""
        state = state or self.state()

        def fetch() -> np.ndarray:
            with Session(self.db) as session:
                return np.fromiter(session.scalars(matching_ids_query(filters, state.generation)), dtype=np.int64)
        return state.selection(filters.cache_key(), fetch)

    # -- images, labels, reports ---------------------------------------------------------------
    def get(self, image_id: int, state: ServedState | None = None) -> dict | None:
        """Metadata and stored pathology scores of one indexed image, or None. `scores` holds, per
        pathology, the stored raw `score` and, where the served model assesses it, its `probability`."""
        state = state or self.state()
        record = self.catalog.record(image_id, state.generation)
        if record is not None and record.get("scores"):
            raw = {p: v["probability"] for p, v in record["scores"].items()}
            shown = self.labeller.stored(state.encoder, raw)
            record["scores"] = {
                p: {"score": raw[p], "uncertainty": v["uncertainty"], "assessed": p in shown,
                    **({"probability": shown[p]} if p in shown else {})}
                for p, v in record["scores"].items()}
        return record

    def load(self, image_id: int, window: str | None = None) -> DecodedImage:
        """Decode an indexed image from its stored path (by DB id only); `window`: a DICOM display window
        (`cxrmodel.imaging.decode.WINDOW_PRESETS`, "file" or "full")."""
        path = self.catalog.path(image_id)
        if is_dicomweb(path):  # an archived instance: fetched back from the archive, never kept here
            return decode_bytes(fetch(path, self.config.limits.max_bytes), name=Path(path).name,
                                limits=self.config.limits, window=window)
        return load_image(path, self.config.limits, window)

    def decode_upload(self, data: bytes, name: str = "upload") -> DecodedImage:
        """Decode uploaded bytes under this engine's limits, reduced to a working size (`upload_side`); the served
        model's input is made from the full decode first, so an indexed file uploaded again is given to the model
        exactly as the index gave it, whatever its size."""
        return decode_bytes(data, name=name, limits=replace(self.config.limits, max_side=self.config.upload_side),
                            model_preprocess=self.state().encoder.preprocess)

    def label(self, image: Image.Image | DecodedImage, state: ServedState | None = None) -> list[LabelScore]:
        """Full-ensemble zero-shot scores of the 14 pathologies for one image (whether or not they apply)."""
        return self.labeller.label((state or self.state()).encoder, image)

    def applicability(self, image: Image.Image | DecodedImage, metadata: dict | None = None,
                      vector: np.ndarray | None = None, state: ServedState | None = None) -> Decision:
        """Do the 14 labels apply? From metadata when it settles it (no model call), else from the model
        (using `vector` when the caller already embedded the image with `state`'s encoder)."""
        return self.labeller.applicability((state or self.state()).encoder, image, metadata, vector)

    def assess(self, image: Image.Image | DecodedImage, metadata: dict | None = None,
               vector: np.ndarray | None = None, state: ServedState | None = None
               ) -> tuple[Decision, list[LabelScore]]:
        """The applicability decision and, only where the labels apply, their scores."""
        return self.labeller.assess((state or self.state()).encoder, image, metadata, vector)

    def report(self, image: Image.Image | DecodedImage, metadata: dict | None = None,
               threshold: float | None = None, scores: list[LabelScore] | None = None,
               decision: Decision | None = None, lang: str = "en") -> Report:
        """Structured report for one image (applicability and scores computed unless given)."""
        meta = report_metadata(image, metadata)
        if scores is None:
            decision, scores = self.assess(image, meta)
        return self.labeller.report(scores, decision, meta, threshold, lang)

    def report_for_id(self, image_id: int, threshold: float | None = None, lang: str = "en"
                      ) -> tuple[Report, list[LabelScore], Decision, dict]:
        """Report, scores, applicability and metadata of an indexed image (DataError when unknown).

        The full label ensemble runs once per image and served state; page, charts and downloads
        then share it, whatever their threshold or language.
        """
        state = self.state()
        meta = self.get(image_id, state)
        if meta is None:
            raise NotFoundError(f"no image with id {image_id}")
        stored = meta.get("applicability")
        if stored is not None:  # the decision made at index time, so page, filters and report agree
            decision = Decision(**stored)
            scores = state.labels_for(image_id, lambda: self.label(self.load(image_id), state)) \
                if decision.applicable else []
            stored_raw = {p: v["score"] for p, v in (meta.get("scores") or {}).items()}
            if scores and stored_raw:  # one number: the value stored at index time
                scores = self.labeller.with_stored(state.encoder, scores, stored_raw)
        else:
            decision, scores = self.assess(self.load(image_id), meta, state=state)
        return self.labeller.report(scores, decision, {**meta, **self._file_facts(image_id)}, threshold, lang), \
            scores, decision, meta

    def _file_facts(self, image_id: int) -> dict:
        """What a report says of an indexed file beyond its pixels: its frame count and lossy compression, read
        from its header (`cxrmodel.imaging.decode.file_facts`), or for an archived instance from the archive's
        metadata of it (no pixels fetched; {} when the archive does not answer)."""
        path = self.catalog.path(image_id)
        if not is_dicomweb(path):
            return file_facts(path)
        try:
            return dataset_facts(instance_header(path, FACT_TAGS))
        except DataError:
            return {}

    def priors(self, image_id: int) -> dict:
        """The same patient's indexed studies in date order, with stored scores and the change per pathology."""
        return self.catalog.priors(image_id, self.state().generation)

    def thumbnail(self, image_id: int, size: int = 256) -> bytes:
        """PNG thumbnail of an indexed image, generated once and cached under the data dir."""
        meta = self.get(image_id)
        if meta is None:
            raise NotFoundError(f"no image with id {image_id}")
        cache = Path(self.config.data_dir) / THUMBS_DIR / f"{meta['content_hash']}-{int(size)}.png"
        if cache.exists():
            return cache.read_bytes()
        small = shrink_to_fit(self.load(image_id).image, size)
        buf = io.BytesIO()
        small.save(buf, format="PNG", optimize=True)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(buf.getvalue())
            tmp.replace(cache)
        except OSError:  # a read-only or full data dir only costs the cache
            pass
        return buf.getvalue()

