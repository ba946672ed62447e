"""The indexing pipeline: reader -> decode -> encoder batches -> writer (rows + vectors).

A CPU model's files are decoded in this process, in turns with the model or ahead of it, as measured
fastest in the run (`schedule.py`); a GPU model's in worker processes beside it (`default_workers`). Each
decoded batch goes to the model at once.

Each chunk of images is written in one DB transaction (image rows, vectors, pathology scores,
skipped files), so a run killed at any moment loses at most the chunk in flight and a restart
continues where it stopped. The FAISS file is brought up to date from the DB at the end and
swapped in atomically; readers keep serving the previous complete index until then.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from cxrmodel.constants import DEFAULT_DATA_DIR, THUMBS_DIR
from cxrmodel.errors import DataError
from cxrmodel.imaging.decode import ImageLimits
from cxrmodel.labels.applicability import class_bank, decide
from cxrmodel.labels.calibration import for_encoder
from cxrmodel.labels.prompts import LabelConfig
from cxrmodel.labels.zeroshot import prompt_bank, score_vectors

from .dicomweb import is_dicomweb
from .faults import checkpoint
from .metadata import remove_legacy_salt, row_fields
from .prepare import CHANGED_UNREADABLE, Prepared, PrepareTask, available_cores, prepare_all
from .pseudonyms import PatientKeyConfig, Pseudonymizer
from .schedule import PlanTrial, ScheduleConfig
from .skipped import stale_paths
from .sources import ManifestProblem, SourceRecord, check_sources, iter_sources
from .store import (
    DecisionRow,
    EmbeddingRow,
    Generation,
    ImageRow,
    ScoreRow,
    SkippedRow,
    active_generation,
    default_db_url,
    next_revision,
    open_db,
    publish,
    remember_db_url,
    upsert,
    upsert_skipped,
    utcnow,
    vector_to_bytes,
    writers_lock,
)
from .vectors import INDEX_DIR, IndexConfig, remove_generation_files, sync_generation

if TYPE_CHECKING:
    from .ray_engine import RayConfig

log = logging.getLogger(__name__)

META_COLUMNS = (*ImageRow.METADATA_FIELDS, "patient_hash")
PLAN_BATCH = 2_000  # records planned per DB round trip (and the most SQL parameters of one IN list)


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of up to `size` consecutive items (itertools.batched from Python 3.12)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


@dataclass(frozen=True)
class PendingFile:
    """What planning knew of a file handed to decoding: its manifest metadata and stored row."""

    metadata: dict
    stored_hash: str | None  # None: no row yet
    in_generation: bool


def default_workers(device=None) -> int:
    """Decode processes for a model on `device`.

    A GPU model leaves the cores to decoding: one fewer processes than cores (at most 8). A CPU model
    needs every core itself, so files are decoded in this process between its batches (0): decoder
    processes running beside it oversubscribe the cores it computes on, which measured slower
    (bench/indexing.py --workers 1 vs the default).
    """
    from .prepare import available_cores

    if device is not None and getattr(device, "type", str(device)) != "cpu":
        return max(1, min(8, available_cores() - 1))
    return 0


@dataclass
class IndexJob:
    """One `radlens index` run."""

    sources: list[str]
    data_dir: Path = field(default_factory=lambda: Path(DEFAULT_DATA_DIR))
    db_url: str | None = None
    rebuild: bool = False
    prune: bool = False
    workers: int | None = None  # decode processes; None: default_workers(the encoder's device)
    chunk_size: int = 256
    index: IndexConfig = field(default_factory=IndexConfig)
    limits: ImageLimits = field(default_factory=ImageLimits)
    labels: LabelConfig = field(default_factory=LabelConfig)
    progress: bool = True
    engine: str = "local"  # or "ray": decode and embed on a Ray cluster (indexer/ray_engine.py)
    ray: RayConfig | None = None
    patient_key: PatientKeyConfig = field(default_factory=PatientKeyConfig.from_env)
    query_tower: bool = True  # export the text tower to ONNX for torch-free text queries (query_tower.py)
    onnx_image_from: int = 512  # files to embed from which an fp32 CPU run moves its image tower to ONNX Runtime
    decode: ScheduleConfig = field(default_factory=ScheduleConfig)  # in-process decoding: in turns, ahead, or measured

    @property
    def url(self) -> str:
        return self.db_url or default_db_url(self.data_dir)


@dataclass
class IndexSummary:
    """Counts and speed of one run."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    pruned: int = 0
    seconds: float = 0.0  # the whole run, from opening the DB to the query tower
    embed_seconds: float = 0.0  # the embedding phase alone: decode, model, rows and scores of every file
    tower_seconds: float = 0.0  # exporting (or checking) the ONNX query tower: once per index and model
    embedded: int = 0
    generation: int = 0
    index_type: str = ""
    query_tower: str = ""  # what became of the ONNX query tower (TowerExport.line)
    image_backend: str = ""  # which runtime embedded the images, when it was chosen (image_onnx.py)
    decode_plan: str = ""  # how in-process decoding shared the cores with the model (schedule.py)

    @property
    def images_per_second(self) -> float:
        """Images embedded per second of the whole run (its one-off costs included)."""
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def embedding_images_per_second(self) -> float:
        """Images embedded per second of the embedding phase: the rate a large run converges to."""
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        return (f"added {self.added}, updated {self.updated}, unchanged {self.unchanged}, "
                f"skipped {self.skipped}, pruned {self.pruned} in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} img/s; {self.embedding_images_per_second:.1f} img/s while "
                f"embedding; index {self.index_type})")


def target_generation(session: Session, identity: dict, rebuild: bool) -> Generation:
    """The generation this run writes to: the active one, a resumable unfinished one, or a new one."""
    with writers_lock(session):
        return _target_generation(session, identity, rebuild)


def _target_generation(session: Session, identity: dict, rebuild: bool) -> Generation:
    active = active_generation(session)
    if active is not None and not rebuild:
        if not active.matches(identity):
            raise DataError(
                f"this index was built with {active.describe()}, but this run uses {_describe(identity)}. "
                "Re-run with --rebuild to embed everything again into a new index; the current one keeps "
                "serving until the new one is complete.")
        return active
    pending = session.scalars(select(Generation).where(Generation.active.is_(False))
                              .order_by(Generation.id.desc())).all()
    for gen in pending:
        if gen.matches(identity):
            return gen
    gen = Generation(model=identity["model"], adapter_hash=identity["adapter_hash"],
                     adapter_path=identity.get("adapter"), dim=identity["dim"], numerics=identity.get("numerics"),
                     model_revision=identity.get("revision"), model_format=identity.get("format"), active=False,
                     next_revision=1)
    session.add(gen)
    session.flush()
    return gen


def _describe(identity: dict) -> str:
    """An encoder identity in the words of `Generation.describe`."""
    return Generation(model=identity["model"], adapter_hash=identity["adapter_hash"], numerics=identity.get("numerics"),
                      model_revision=identity.get("revision"), model_format=identity.get("format")).describe()


LOCK_FILE = "index.lock"


@contextmanager
def exclusive_run(data_dir: Path):
    """One `radlens index` per data dir at a time; a second one fails at once with a clear message."""
    import fcntl

    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a directory; choose a directory (it is created "
                        "when missing)")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / LOCK_FILE).touch()
    except OSError as exc:
        raise DataError(f"cannot write to the data dir {data_dir} ({exc.strerror or exc}); `radlens index` needs "
                        "a writable directory (search and serve can read a read-only one)") from None
    with open(data_dir / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another `radlens index` is running on {data_dir}; wait for it to finish") from None
        try:
            remove_temporary_files(data_dir)  # left by a run that was killed or ran out of disk
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_temporary_files(data_dir: Path) -> list[Path]:
    """Delete the `*.tmp<pid>` files an interrupted run left beside the DB and the index files (only ever
    called under the run lock, and only index runs write there, so no live writer owns one; servers'
    cache and thumbnail folders are left alone); returns what was removed."""
    import re

    pattern = re.compile(r"\.tmp\d+$")
    removed = []
    for folder in (data_dir, data_dir / INDEX_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.is_file() and pattern.search(path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def run_index(job: IndexJob, encoder) -> IndexSummary:
    """Index `job.sources` into `job.data_dir` with `encoder`; returns the run's summary."""
    check_sources(job.sources)  # before the data dir is made: a wrong source leaves nothing behind
    with exclusive_run(job.data_dir), storage_errors_explained(job.data_dir):
        if encoder.cache_dir is None:
            encoder.cache_dir = job.data_dir / "cache"
        return _run_index(job, encoder)


STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_STATE, READ_ONLY_STATE = "53100", "25006"  # PostgreSQL's disk_full, read_only_sql_transaction


@contextmanager
def storage_errors_explained(data_dir: Path):
    """A full disk or a read-only database, wherever the run meets it, as one clear DataError. Each
    chunk is its own transaction, so what was committed stays and a rerun continues from there."""
    from sqlalchemy.exc import OperationalError

    advice = "free some space (or use another --data-dir) and run `radlens index` again: what was committed is kept"
    try:
        yield
    except OperationalError as exc:
        code = (getattr(exc.orig, "sqlite_errorcode", None) or 0) & 0xFF  # primary code of an extended one
        state = getattr(exc.orig, "sqlstate", None)  # PostgreSQL
        if code == sqlite3.SQLITE_FULL or state == DISK_FULL_STATE:
            raise DataError(f"the disk holding {data_dir} is full: {advice}") from None
        if code == sqlite3.SQLITE_READONLY or state == READ_ONLY_STATE:
            raise DataError(f"the database of {data_dir} cannot be written (read-only); `radlens index` needs "
                            "write access to it") from None
        raise
    except OSError as exc:
        if exc.errno in STORAGE_FULL:
            raise DataError(f"the disk holding {data_dir} is full ({exc.filename or exc}): {advice}") from None
        raise


def _run_index(job: IndexJob, encoder) -> IndexSummary:
    started = time.perf_counter()
    db = open_db(job.url)
    if job.db_url:
        remember_db_url(job.data_dir, job.db_url)
    summary = IndexSummary()
    try:
        pseudonyms = Pseudonymizer(job.patient_key, job.data_dir)
        with Session(db) as session, session.begin():
            gen = target_generation(session, encoder.identity, job.rebuild)
            gen_id = gen.id
        writer = ChunkWriter(db, gen_id, encoder, job.labels, pseudonyms)
        tasks = writer.plan(iter_sources(job.sources, exclude=job.data_dir), summary)
        switch = job.engine == "local" and len(tasks) >= job.onnx_image_from and encoder.image_tower is None
        if switch:
            from cxrmodel.model.image_onnx import use_onnx_image_tower

            summary.image_backend = use_onnx_image_tower(encoder)  # a few seconds to export: for large runs only
        embedding = time.perf_counter()
        try:
            _embed(job, encoder, writer, tasks, summary)
        finally:
            summary.embed_seconds = time.perf_counter() - embedding
            if switch:
                encoder.image_tower = None  # the caller's encoder is as it was (a server may share it)
        if job.prune:
            summary.pruned = prune_missing(db, job.data_dir, listed_remote(job.sources, writer.listed_remote))
        meta = sync_generation(db, job.data_dir, gen_id, job.index)
        summary.index_type = meta.factory
        summary.generation = gen_id
        activate(db, job.data_dir, gen_id)
        with Session(db) as session, session.begin():
            publish(session)  # servers drop caches made from the metadata before this run
        remove_legacy_salt(job.data_dir)
        if job.query_tower:
            exporting = time.perf_counter()
            summary.query_tower = _export_query_tower(encoder, job.data_dir)
            summary.tower_seconds = time.perf_counter() - exporting
    finally:
        db.dispose()
    summary.seconds = time.perf_counter() - started
    return summary


def _export_query_tower(encoder, data_dir: Path) -> str:
    from cxrmodel.model.tower_export import export_query_tower

    result = export_query_tower(encoder, data_dir)
    log.info("%s", result.line())
    return result.line()


def _embed(job: IndexJob, encoder, writer: ChunkWriter, tasks: list[PrepareTask], summary: IndexSummary) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="img", desc="indexing", disable=not job.progress or not tasks,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    chunk: list[Prepared] = []
    trial: PlanTrial | None = None
    workers = 0
    model_threads = ModelThreads()
    try:
        if job.engine == "ray":
            from .ray_engine import RayConfig, embed_with_ray

            for chunk, vectors in embed_with_ray(tasks, encoder, job.limits, job.ray or RayConfig(), job.chunk_size):
                writer.write_embedded(chunk, vectors, summary)
                bar.update(len(chunk))
            return
        # The model takes each batch as soon as it is decoded (not each 256-file chunk), so it starts
        # after the first batch_size files; rows are still committed one chunk per transaction.
        batches: list[np.ndarray] = []
        fresh: list[Prepared] = []
        workers = default_workers(encoder.device) if job.workers is None else job.workers
        if workers == 0:
            cpu_model = getattr(encoder.device, "type", "cpu") == "cpu"
            trial = PlanTrial(available_cores(), len(tasks), job.decode, can_set_threads=cpu_model
                              and encoder.image_tower is None, model_threads=model_threads.current() if cpu_model
                              else None)
        items = prepare_all(tasks, encoder.preprocess, job.limits, workers, batch=encoder.batch_size,
                            while_starting=writer.warm_up, trial=trial, set_model_threads=model_threads.set)
        for item in items:
            checkpoint("decode")
            chunk.append(item)
            if item.needs_vector:
                fresh.append(item)
            if len(fresh) >= encoder.batch_size:
                batches.append(writer.embed(fresh))
                fresh = []
            if len(chunk) >= job.chunk_size:
                batches.append(writer.embed(fresh))
                writer.write_embedded(chunk, np.concatenate(batches), summary)
                bar.update(len(chunk))
                bar.set_postfix(img_s=f"{summary.embedded / max(time.perf_counter() - t0, 1e-9):.1f}")
                chunk, fresh, batches = [], [], []
        if chunk:
            batches.append(writer.embed(fresh))
            writer.write_embedded(chunk, np.concatenate(batches), summary)
            bar.update(len(chunk))
    finally:
        model_threads.restore()
        if trial is not None and tasks:  # a run with nothing to read decoded nothing
            summary.decode_plan = trial.describe()
        elif workers and tasks:
            summary.decode_plan = f"decode: in {workers} worker process{'es' if workers != 1 else ''} beside the model"
        bar.close()


class ModelThreads:
    """torch's intra-op threads as a decode plan sets them, put back as they were after the run."""

    def __init__(self) -> None:
        self.before: int | None = None

    @staticmethod
    def current() -> int:
        """The threads the model runs on now (torch's default, or what OMP_NUM_THREADS set)."""
        import torch

        return torch.get_num_threads()

    def set(self, threads: int) -> None:
        """Run the model on `threads` threads from now on."""
        import torch

        if self.before is None:
            self.before = torch.get_num_threads()
        torch.set_num_threads(threads)

    def restore(self) -> None:
        """The thread count before the first `set`."""
        if self.before is not None:
            import torch

            torch.set_num_threads(self.before)
            self.before = None


class ChunkWriter:
    """Writer stage: turns prepared files into rows, vectors and scores, one transaction per chunk."""

    def __init__(self, db, generation: int, encoder, labels: LabelConfig, pseudonyms: Pseudonymizer | None = None):
        self.db = db
        self.pseudonyms = pseudonyms
        self.generation = generation
        self.encoder = encoder
        self.labels = labels
        calibration = for_encoder(encoder)  # the model's own, as pages without --calibration read it
        self.applicability_calibration = calibration.applicability if calibration else None
        self.pending: dict[str, PendingFile] = {}  # files handed to decoding, until their chunk is written
        self.listed_remote: set[int] = set()  # hashes of the DICOMweb locators listed in this run (for --prune)

    def plan(self, items: Iterable[SourceRecord | ManifestProblem], summary: IndexSummary) -> list[PrepareTask]:
        """Files that need reading: new, or changed size/mtime, or not yet embedded in this generation.

        The reader's items are planned in batches as they stream in (the DB is asked about each batch's
        paths only), so memory grows with the files to read, not with the rows listed; problems (rows
        without a usable path, files that cannot be used) go to the skipped table with their batch.
        """
        tasks: list[PrepareTask] = []
        for batch in batched(items, PLAN_BATCH):
            records = [item for item in batch if isinstance(item, SourceRecord)]
            problems = {p.key: dict(path=p.key, kind="file" if p.line is None else "manifest", reason=p.reason,
                                    at=utcnow()) for p in batch if isinstance(p, ManifestProblem)}
            with Session(self.db) as session, session.begin():
                tasks += self._plan_batch(session, records, summary) if records else []
                upsert_skipped(session, problems)
                self._verify_key(session)
            summary.skipped += len(batch) - len(records)
        return tasks

    def _plan_batch(self, session: Session, records: list[SourceRecord], summary: IndexSummary
                    ) -> list[PrepareTask]:
        paths = [r.path for r in records]
        stored = {row.path: row for row in session.execute(
            select(ImageRow.id, ImageRow.path, ImageRow.content_hash, ImageRow.size_bytes, ImageRow.mtime_ns,
                   *[getattr(ImageRow, f) for f in META_COLUMNS]).where(ImageRow.path.in_(paths)))}
        embedded = set(session.scalars(select(EmbeddingRow.image_id).where(
            EmbeddingRow.generation_id == self.generation,
            EmbeddingRow.image_id.in_([row.id for row in stored.values()])))) if stored else set()
        tasks, meta_updates, missing = [], [], {}
        for record, path in zip(records, paths, strict=True):
            row = stored.get(path)
            remote = is_dicomweb(path)
            if remote:  # an archived instance: immutable by its UIDs, so the locator is its identity
                self.listed_remote.add(hash(path))
                size_mtime = (row.size_bytes, row.mtime_ns) if row is not None else None
            else:
                try:
                    st = os.stat(path)
                except OSError:
                    missing[path] = dict(path=path, kind="file", reason="file not found", at=utcnow())
                    continue
                size_mtime = (st.st_size, st.st_mtime_ns)
            in_gen = row is not None and row.id in embedded
            if in_gen and (row.size_bytes, row.mtime_ns) == size_mtime:
                summary.unchanged += 1
                if record.metadata:
                    changed = {k: v for k, v in row_fields(record.metadata, self.pseudonyms).items()
                               if v is not None and getattr(row, k) != v}
                    if changed:  # a manifest edit: update the row, no re-embedding
                        meta_updates.append((row.id, changed))
                continue
            self.pending[path] = PendingFile(record.metadata, row.content_hash if row is not None else None, in_gen)
            tasks.append(PrepareTask(path, row.content_hash if in_gen else None))
        summary.skipped += len(missing)
        upsert_skipped(session, missing)
        self._update_metadata(session, meta_updates)
        return tasks

    @staticmethod
    def _update_metadata(session: Session, updates: list[tuple[int, dict]]) -> None:
        """Manifest edits (captions, labels, ...) reach unchanged files without re-embedding."""
        for image_id, fields in updates:
            session.execute(update(ImageRow).where(ImageRow.id == image_id).values(**fields))

    def embed(self, items: list[Prepared]) -> np.ndarray:
        """Vectors of decoded items, in order: (len(items), dim)."""
        vectors = self.encoder.encode_arrays([p.pixels for p in items])
        checkpoint("embed")
        return vectors

    def warm_up(self) -> None:
        """Build what every chunk needs (the text embeddings of the label prompts and of the
        applicability classes) while the decode workers start."""
        prompt_bank(self.encoder, self.labels)
        class_bank(self.encoder, self.labels.applicability)

    def write_embedded(self, chunk: list[Prepared], vectors: np.ndarray, summary: IndexSummary) -> None:
        """Commit a chunk whose fresh (decoded, new or changed) items were embedded elsewhere, in order.

        One statement per table (not per image): the writer is the one serial stage of a distributed
        run, so its rate caps the whole cluster's (see bench/writer.py).
        """
        self._write_chunk(chunk, vectors, summary)
        for item in chunk:
            self.pending.pop(item.path, None)

    def _write_chunk(self, chunk: list[Prepared], vectors: np.ndarray, summary: IndexSummary) -> None:
        # vector n belongs to chunk[fresh_at[n]]
        fresh_at = [i for i, p in enumerate(chunk) if p.needs_vector]
        picked = sorted({chunk[i].path: n for n, i in enumerate(fresh_at)}.values())  # a path twice: the last wins
        fresh = [chunk[fresh_at[n]] for n in picked]
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(fresh_at), self.encoder.dim)[picked]
        probs, spread = score_vectors(vectors, prompt_bank(self.encoder, self.labels), self.labels) \
            if fresh else (None, None)
        decisions = decide(self.encoder, vectors, [self._metadata(p) for p in fresh], self.labels.applicability,
                           self.applicability_calibration)
        pathologies = list(self.labels.pathologies)
        now = utcnow()
        with Session(self.db) as session, session.begin():
            revision = next_revision(session, self.generation)
            errors = {item.path: dict(path=item.path, kind=item.skip_kind, reason=item.error, at=now)
                      for item in chunk if item.error is not None}
            upsert_skipped(session, errors)
            summary.skipped += len(errors)
            summary.unchanged += self._touch_unchanged(session, [p for p in chunk if p.error is None and p.unchanged])
            if not fresh:
                self._verify_key(session)
                return
            ids = self._upsert_images(session, fresh, now, summary)
            keys = [dict(generation_id=self.generation, image_id=ids[item.path]) for item in fresh]
            upsert(session, EmbeddingRow, [dict(**k, revision=revision, vector=vector_to_bytes(v))
                                           for k, v in zip(keys, vectors, strict=True)],
                   keys=("generation_id", "image_id"))
            upsert(session, DecisionRow, [dict(**k, applicable=d.applicable, source=d.source, confidence=d.confidence,
                                               reason=d.reason, view=d.view, kind=d.kind)
                                          for k, d in zip(keys, decisions, strict=True)],
                   keys=("generation_id", "image_id"))
            # images the 14 labels do not apply to get no scores at all
            upsert(session, ScoreRow, [dict(**keys[i], pathology=p, probability=float(probs[i, j]),
                                            uncertainty=float(spread[i, j]))
                                       for i, d in enumerate(decisions) if d.applicable
                                       for j, p in enumerate(pathologies)],
                   keys=("generation_id", "image_id", "pathology"))
            unscored = [k["image_id"] for k, d in zip(keys, decisions, strict=True) if not d.applicable]
            if unscored:
                session.execute(delete(ScoreRow).where(ScoreRow.generation_id == self.generation,
                                                       ScoreRow.image_id.in_(unscored)))
            session.execute(delete(SkippedRow).where(SkippedRow.path.in_([item.path for item in fresh])))
            self._verify_key(session)
            session.flush()
            checkpoint("commit")
        summary.embedded += len(fresh)

    def _verify_key(self, session: Session) -> None:
        if self.pseudonyms is not None:
            self.pseudonyms.verify(session)

    def _touch_unchanged(self, session: Session, items: list[Prepared]) -> int:
        """Record new size/mtime (and header/manifest fields) of files whose content did not change: one
        executemany UPDATE per set of columns (usually one per chunk), not one statement per file."""
        groups: dict[tuple, list[dict]] = {}
        for item in items:
            fields = {k: v for k, v in row_fields(self._metadata(item), self.pseudonyms).items() if v is not None}
            row = {"mtime_ns": item.mtime_ns, "size_bytes": item.size_bytes, **fields}
            groups.setdefault(tuple(sorted(row)), []).append({"row_path": item.path, **{f"new_{k}": v
                                                                                       for k, v in row.items()}})
        images = ImageRow.__table__  # Core: an executemany by path (the ORM would want primary keys)
        for columns, rows in groups.items():
            stmt = (update(images).where(images.c.path == bindparam("row_path"))
                    .values({c: bindparam(f"new_{c}") for c in columns}))
            session.connection().execute(stmt, rows)
        return len(items)

    def _metadata(self, item: Prepared) -> dict:
        """DICOM metadata overlaid by the manifest row's (the manifest wins)."""
        pending = self.pending.get(item.path)
        return {**item.metadata, **(pending.metadata if pending else {})}

    def _upsert_images(self, session: Session, items: list[Prepared], now, summary: IndexSummary) -> dict[str, int]:
        """Insert or update the chunk's image rows in one statement; path -> id."""
        rows = [dict(path=item.path, added_at=now, content_hash=item.content_hash, size_bytes=item.size_bytes,
                     mtime_ns=item.mtime_ns, width=item.width, height=item.height, format=item.format,
                     updated_at=now, **row_fields(self._metadata(item), self.pseudonyms)) for item in items]
        returned = upsert(session, ImageRow, rows, keys=("path",), returning=(ImageRow.path, ImageRow.id))
        if returned is None:  # a database without native upserts
            returned = session.execute(select(ImageRow.path, ImageRow.id)
                                       .where(ImageRow.path.in_([r["path"] for r in rows]))).all()
        for item in items:
            pending = self.pending.get(item.path)
            if pending is None or pending.stored_hash is None or (
                    pending.stored_hash == item.content_hash and not pending.in_generation):
                summary.added += 1  # new, or the same file's first time in this generation
            else:
                summary.updated += 1
        return {path: image_id for path, image_id in returned}


@dataclass(frozen=True)
class RemoteListing:
    """What this run's DICOMweb sources listed: their locator prefixes and the locators' hashes."""

    prefixes: tuple[str, ...]
    listed: set[int]

    def gone(self, path: str) -> bool:
        """An instance of an archive this run listed that the archive no longer lists."""
        return path.startswith(self.prefixes) and hash(path) not in self.listed


def listed_remote(sources: list[str], listed: set[int]) -> RemoteListing:
    """The `RemoteListing` of a run over `sources`."""
    from .dicomweb import DicomwebSource

    prefixes = tuple(DicomwebSource.parse(str(s)).url + "/studies/" for s in sources if is_dicomweb(str(s)))
    return RemoteListing(prefixes, listed)


def _gone(path: str, remote: RemoteListing | None) -> bool:
    """A file that no longer exists, or an archived instance its archive no longer lists (instances of
    archives this run did not list are kept: nothing is known about them)."""
    if is_dicomweb(path):
        return remote is not None and remote.gone(path)
    return not os.path.exists(path)


def prune_missing(db, data_dir: Path | None = None, remote: RemoteListing | None = None) -> int:
    """Delete rows (and their vectors, scores and cached thumbnails) of files that no longer exist, of
    archived instances that this run's DICOMweb sources no longer list, and of indexed files whose content
    changed into something that does not decode (skipped as "changed"); returns how many."""
    with Session(db) as session, session.begin():
        changed = stale_paths(session)
        gone_rows = [row for row in session.execute(select(ImageRow.id, ImageRow.path, ImageRow.content_hash))
                     if row.path in changed or _gone(row.path, remote)]
        gone = [row.id for row in gone_rows]
        for start in range(0, len(gone), 500):
            ids = gone[start : start + 500]
            session.execute(delete(ScoreRow).where(ScoreRow.image_id.in_(ids)))
            session.execute(delete(DecisionRow).where(DecisionRow.image_id.in_(ids)))
            session.execute(delete(EmbeddingRow).where(EmbeddingRow.image_id.in_(ids)))
            session.execute(delete(ImageRow).where(ImageRow.id.in_(ids)))
        files = select(SkippedRow.path).where(SkippedRow.kind.in_(("file", "changed")))
        skipped_gone = [p for p in session.scalars(files) if _gone(p, remote)]
        if skipped_gone:
            session.execute(delete(SkippedRow).where(SkippedRow.path.in_(skipped_gone)))
        # no row holds their earlier content now: they are plain unreadable files
        session.execute(update(SkippedRow).where(SkippedRow.kind == "changed").values(
            kind="file", reason=func.replace(SkippedRow.reason, f"; {CHANGED_UNREADABLE}", "")))
        session.flush()
        checkpoint("prune")
        hashes = {row.content_hash for row in gone_rows}
        kept = set(session.scalars(select(ImageRow.content_hash).where(ImageRow.content_hash.in_(hashes)))) \
            if hashes else set()
    if data_dir is not None:
        remove_thumbnails(data_dir, hashes - kept)  # a copy still indexed keeps the shared thumbnail
    return len(gone)


def remove_thumbnails(data_dir: Path, content_hashes: set[str]) -> None:
    """Delete the cached thumbnails (every size) of images no longer indexed."""
    folder = Path(data_dir) / THUMBS_DIR
    for content_hash in content_hashes:
        for path in folder.glob(f"{content_hash}-*.png"):
            path.unlink(missing_ok=True)


def activate(db, data_dir: Path, generation: int) -> None:
    """Make `generation` the served one and retire the others (rows and files)."""
    with Session(db) as session, session.begin(), writers_lock(session):
        gen = session.get(Generation, generation)
        if gen.active:
            return
        old = [g.id for g in session.scalars(select(Generation).where(Generation.id != generation))]
        session.execute(update(Generation).where(Generation.id != generation).values(active=False))
        gen.active = True
        gen.activated_at = utcnow()
        for old_id in old:
            session.execute(delete(ScoreRow).where(ScoreRow.generation_id == old_id))
            session.execute(delete(DecisionRow).where(DecisionRow.generation_id == old_id))
            session.execute(delete(EmbeddingRow).where(EmbeddingRow.generation_id == old_id))
            session.execute(delete(Generation).where(Generation.id == old_id))
        session.flush()
        checkpoint("swap")
    for old_id in old:
        remove_generation_files(data_dir, old_id)

