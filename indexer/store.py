"""What RadLens stores: the one place that defines tables (SQLAlchemy 2.0 typed models).

An index *generation* is one complete set of embeddings and pathology scores made by one
encoder (model + adapter). Exactly one generation is active and served; `--rebuild` fills a new
one beside it and activates it in one transaction, so readers never see a half-built index.
Image rows (paths, hashes, metadata) are shared by all generations.
"""

from __future__ import annotations

import datetime as dt
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from cxrmodel.errors import DataError

DB_FILE = "radlens.db"
DB_URL_FILE = "database.url"  # a data dir that lives on a database server remembers its URL here


def utcnow() -> dt.datetime:
    """Timezone-aware current time, stored in every timestamp column."""
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class ImageRow(Base):
    """One image file: where it is, what it holds, and its non-identifying metadata."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)  # nanoseconds overflow a 32-bit INTEGER on servers
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(64), index=True)
    body_part: Mapped[str | None] = mapped_column(String(64), index=True)
    view: Mapped[str | None] = mapped_column(String(64), index=True)
    caption: Mapped[str | None] = mapped_column(Text)
    labels: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(String(256), index=True)
    study_description: Mapped[str | None] = mapped_column(Text)
    indication: Mapped[str | None] = mapped_column(Text)
    age_band: Mapped[str | None] = mapped_column(String(8))
    sex: Mapped[str | None] = mapped_column(String(8))
    study_day: Mapped[int | None] = mapped_column(Integer)  # shifted per patient (indexer.pseudonyms); never shown
    patient_hash: Mapped[str | None] = mapped_column(String(64), index=True)  # keyed HMAC; the raw key is never stored
    added_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = tuple(Index(f"ix_images_lower_{c}", func.lower(text(c))) for c in
                           ("modality", "body_part", "view", "source", "format"))  # case-insensitive filters

    METADATA_FIELDS = ("modality", "body_part", "view", "caption", "labels", "source", "study_description",
                       "indication", "age_band", "sex", "study_day")

    def to_dict(self) -> dict:
        """Public fields for APIs (never the server-side path)."""
        return {"id": self.id, "content_hash": self.content_hash, "width": self.width, "height": self.height,
                "format": self.format, "size_bytes": self.size_bytes, "file_name": Path(self.path).name,
                **{k: getattr(self, k) for k in self.METADATA_FIELDS if k != "study_day"},
                "has_priors_key": self.patient_hash is not None,
                "added_at": self.added_at.isoformat() if self.added_at else None,
                "updated_at": self.updated_at.isoformat() if self.updated_at else None}


class Generation(Base):
    """One encoder's complete set of vectors and scores; `active` marks the one being served."""

    __tablename__ = "generations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(Text)
    adapter_hash: Mapped[str | None] = mapped_column(String(64))
    adapter_path: Mapped[str | None] = mapped_column(Text)
    dim: Mapped[int] = mapped_column(Integer)
    index_type: Mapped[str | None] = mapped_column(String(128))
    numerics: Mapped[str | None] = mapped_column(String(16))  # image tower's number format (fp32, bf16...)
    model_revision: Mapped[str | None] = mapped_column(String(64))  # a hub model's resolved commit
    model_format: Mapped[str | None] = mapped_column(String(64))  # checkpoint format (encoder.checkpoint_format)
    active: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    next_revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    activated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    def matches(self, identity: dict) -> bool:
        """True when this generation was made by the encoder with `identity`, so that encoder may add to
        it: same weights (model, hub revision, adapter), same vector size and the same number format
        (bf16 vectors are not mixed into an fp32 index). Generations recorded before numerics and
        revisions were (NULL) match any. A directory whose checkpoint format changed holds another model."""
        return self.serves(identity) and _same_or_unrecorded(self.numerics, identity.get("numerics")) \
            and _same_or_unrecorded(self.model_format, identity.get("format"))

    def serves(self, identity: dict) -> bool:
        """True when the encoder with `identity` embeds queries into this generation's space (the
        number format of queries may differ from the index's, e.g. an int8 text tower)."""
        return (self.model, self.adapter_hash, self.dim) == (identity["model"], identity["adapter_hash"],
                                                              identity["dim"]) \
            and _same_or_unrecorded(self.model_revision, identity.get("revision"))

    def query_identity(self) -> dict:
        """The identity fields a query encoder must share with this generation (`serves` compares them; the
        query tower is filed under them)."""
        return {"model": self.model, "adapter_hash": self.adapter_hash, "dim": self.dim,
                "revision": self.model_revision}

    def describe(self) -> str:
        """The identity in words, for messages."""
        adapter = self.adapter_hash[:12] if self.adapter_hash else "none"
        revision = f"@{self.model_revision[:12]}" if self.model_revision else ""
        fmt = f", {self.model_format}" if self.model_format else ""
        return f"{self.model!r}{revision} (adapter {adapter}, {self.numerics or 'unrecorded numerics'}{fmt})"


def _same_or_unrecorded(stored: str | None, given: str | None) -> bool:
    return stored is None or stored == given


class EmbeddingRow(Base):
    """An image's vector in one generation; `revision` orders writes so FAISS can catch up."""

    __tablename__ = "embeddings"
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    __table_args__ = (Index("ix_embeddings_generation_revision", "generation_id", "revision"),)


class ScoreRow(Base):
    """Zero-shot probability of one pathology for one image, in one generation."""

    __tablename__ = "scores"
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    pathology: Mapped[str] = mapped_column(String(32), primary_key=True)
    probability: Mapped[float] = mapped_column(Float)
    uncertainty: Mapped[float] = mapped_column(Float)
    __table_args__ = (Index("ix_scores_lookup", "generation_id", "pathology", "probability"),)


class DecisionRow(Base):
    """Whether the 14 chest X-ray labels apply to an image (in one generation), and why."""

    __tablename__ = "applicability"
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    applicable: Mapped[bool] = mapped_column(Boolean)
    source: Mapped[str] = mapped_column(String(16))
    confidence: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(Text)
    view: Mapped[str | None] = mapped_column(String(16))
    kind: Mapped[str | None] = mapped_column(String(64))

    def to_dict(self) -> dict:
        return {"applicable": self.applicable, "source": self.source, "confidence": round(self.confidence, 4),
                "reason": self.reason, "view": self.view, "kind": self.kind}


class SettingRow(Base):
    """One named value shared by every process writing this database (e.g. the patient key's fingerprint)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class SkippedRow(Base):
    """A file the indexer could not use, and why."""

    __tablename__ = "skipped"
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="file")  # file, or manifest (path = "file:line")
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def embedded_db_url(data_dir: str | Path) -> str:
    """The embedded default: a SQLite file inside the data directory."""
    return _sqlite_url(data_dir)


def _sqlite_url(data_dir: str | Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / DB_FILE}"


def default_db_url(data_dir: str | Path) -> str:
    """The data dir's database: the URL it remembers (see `remember_db_url`), else its SQLite file."""
    try:
        remembered = (Path(data_dir) / DB_URL_FILE).read_text().strip()
    except OSError:
        remembered = ""
    return remembered or embedded_db_url(data_dir)


def remember_db_url(data_dir: str | Path, url: str) -> None:
    """Record a server URL in the data dir (mode 0600), so `serve`/`check`/`search` find it without --db-url."""
    path = Path(data_dir) / DB_URL_FILE
    if url == _sqlite_url(data_dir) or (path.exists() and path.read_text().strip() == url):
        return
    write_private_file(path, url + "\n")


def write_private_file(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only (mode 0600), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def has_database(data_dir: str | Path) -> bool:
    """True when the data dir has an embedded DB file or remembers a server URL."""
    return (Path(data_dir) / DB_FILE).exists() or (Path(data_dir) / DB_URL_FILE).exists()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def open_db(url: str, create: bool = True) -> Engine:
    """Connect to the metadata DB (SQLite by default, any SQLAlchemy URL); create or upgrade its schema.

    With `create=False` (readers) the schema is only checked: an old one is a clear error, never a
    silent upgrade under a running indexer.
    """
    from .migrations import ensure_schema

    read_only = not create and _read_only_sqlite(url)
    try:
        engine = create_engine(_immutable_sqlite_url(url) if read_only else url)
    except (ArgumentError, ImportError, ModuleNotFoundError) as exc:
        raise DataError(f"cannot use database URL {redact_url(url)!r}: {exc}. Server databases need their "
                        "driver, e.g. `pip install 'radlens[postgres]'` for postgresql+psycopg://...") from None
    if engine.dialect.name == "sqlite" and not read_only:
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        ensure_schema(engine, upgrade=create)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _read_only_sqlite(url: str) -> bool:
    """True for a SQLite file whose folder cannot be written (a read-only mount, a read-only copy)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return False
    folder = Path(parsed.database).parent
    return folder.exists() and not os.access(folder, os.W_OK)


def _immutable_sqlite_url(url: str) -> str:
    """Open a SQLite file in a read-only folder as immutable (no locks, no WAL index to create).

    That is only right when no write is pending in its write-ahead log: a cleanly finished index run
    leaves none; otherwise the DB must be opened read-write once.
    """
    path = Path(make_url(url).database)
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise DataError(f"{path} is in a read-only folder but holds unfinished writes ({wal.name}); open it once "
                        "where it can be written (e.g. `radlens check`), then make it read-only again")
    return f"sqlite:///file:{path}?mode=ro&immutable=1&uri=true"


def redact_url(url: str) -> str:
    """A database URL with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def upsert(session: Session, model, rows: list[dict], keys: tuple[str, ...], returning: tuple = None,
           update: bool = True):
    """INSERT ... ON CONFLICT (keys) DO UPDATE: safe when several writers meet the same row at once.

    PostgreSQL and SQLite use the native statement; other databases fall back to `Session.merge`
    (correct for one writer at a time) and return None. `update=False` keeps an existing row as it is;
    `returning` columns come back as rows (e.g. the ids of inserted-or-updated rows).
    """
    if not rows:
        return None
    dialect = session.get_bind().dialect.name
    if dialect not in ("postgresql", "sqlite"):
        for row in rows:
            if update or session.get(model, tuple(row[k] for k in keys)) is None:
                session.merge(model(**row))
        session.flush()
        return None
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    changing = [c for c in rows[0] if c not in keys and c != "added_at"] if update else []
    stmt = insert(model)
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in changing}) \
        if changing else stmt.on_conflict_do_nothing(index_elements=list(keys))
    # one statement compiled once, many parameter sets: SQLAlchemy batches them ("insertmanyvalues"), where
    # a multi-row VALUES clause would be compiled afresh for every row (seconds per 100k rows)
    if returning is None:
        session.execute(stmt, rows)
        return None
    return session.execute(stmt.returning(*returning, sort_by_parameter_order=True), rows).all()


def upsert_skipped(session: Session, rows: dict[str, dict]) -> None:
    """Skipped files by path (`rows`: path -> SkippedRow fields). A row already stored with the same kind
    and reason is left as it is, so a rerun over the same broken files writes nothing."""
    if not rows:
        return
    paths = list(rows)
    same = set()
    for lo in range(0, len(paths), 5_000):
        stored = session.execute(select(SkippedRow.path, SkippedRow.kind, SkippedRow.reason)
                                 .where(SkippedRow.path.in_(paths[lo:lo + 5_000])))
        same |= {path for path, kind, reason in stored if (kind, reason) == (rows[path]["kind"], rows[path]["reason"])}
    upsert(session, SkippedRow, [row for path, row in rows.items() if path not in same], keys=("path",))


def next_revision(session: Session, generation: int) -> int:
    """Take the generation's next write revision; the row stays locked until the transaction ends,
    so concurrent writers commit their chunks in revision order."""
    taken = session.execute(update(Generation).where(Generation.id == generation)
                            .values(next_revision=Generation.next_revision + 1)
                            .returning(Generation.next_revision)).scalar_one()
    return taken - 1


@contextmanager
def writers_lock(session: Session):
    """Serialise generation bookkeeping (create, activate) between processes writing one server DB.

    A transaction-scoped advisory lock on PostgreSQL; SQLite serialises writers by itself and one
    data dir admits one `radlens index` at a time.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _WRITERS_LOCK})
    yield


_WRITERS_LOCK = 0x5261644C  # "RadL"


PUBLISHED_KEY = "published"


def publish(session: Session) -> str:
    """Mark the end of an index run (rows, metadata or files changed): servers drop their caches."""
    import time

    value = str(time.time_ns())
    upsert(session, SettingRow, [dict(key=PUBLISHED_KEY, value=value)], keys=("key",))
    return value


def published_version(session: Session) -> str | None:
    """The mark of the last finished index run (None before the first)."""
    row = session.get(SettingRow, PUBLISHED_KEY)
    return row.value if row is not None else None


def active_generation(session: Session) -> Generation | None:
    """The generation being served, if any."""
    return session.scalars(select(Generation).where(Generation.active.is_(True))).first()


def vector_to_bytes(vector: np.ndarray) -> bytes:
    """float32 little-endian bytes of one vector."""
    return np.asarray(vector, dtype="<f4").tobytes()


def vectors_from_bytes(blobs: list[bytes], dim: int) -> np.ndarray:
    """Stack stored vector blobs into an (N, dim) float32 array."""
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim).astype(np.float32)
