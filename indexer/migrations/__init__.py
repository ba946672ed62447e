"""Schema creation and upgrades (Alembic), run by the project itself when a database is opened.

Writers (`radlens index`) upgrade an old schema in place; readers (`serve`, `check`) only check it.
Two processes opening a fresh database at once are serialised (an advisory lock on PostgreSQL, a
file lock beside a SQLite file), so the schema is created exactly once.
"""

from __future__ import annotations

import fcntl
import zlib
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from cxrmodel.errors import DataError

BASELINE = "0001"  # the schema databases made before migrations existed have
HEAD = "0005"  # the newest script in versions/ (a test checks it against Alembic's own head)
_LOCK_KEY = zlib.crc32(b"radlens-schema")


def alembic_config():
    """Alembic configuration pointing at this package's scripts (Alembic is imported only to migrate:
    a reader of an up-to-date database, such as `radlens search`, never pays for it)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    return config


def head_revision() -> str:
    """The schema revision this version of RadLens writes."""
    return HEAD


def current_revision(conn: Connection) -> str | None:
    """The revision a database is at (None: never migrated), from Alembic's version table."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def ensure_schema(engine: Engine, upgrade: bool = True) -> None:
    """Create or upgrade the schema to head (`upgrade`), or check that it is there."""
    head = head_revision()
    with engine.connect() as conn:
        current = current_revision(conn)
        populated = inspect(conn).has_table("images")
    if current == head:
        return
    if current is None and populated:
        with engine.connect() as conn:
            if _holds_no_rows(conn):
                populated = False  # an interrupted first run: a partial schema and nothing in it
    if not upgrade:
        if populated:
            raise DataError(f"this database's schema is at revision {current or 'pre-' + BASELINE}, this RadLens "
                            f"needs {head}: run `radlens index` once to upgrade it")
        raise DataError("this database holds no RadLens index yet (a first `radlens index` may have been "
                        "interrupted): run `radlens index` to build it")
    with _schema_lock(engine) as conn:
        if current_revision(conn) is None and inspect(conn).has_table("images"):
            if _holds_no_rows(conn):
                _drop_partial_schema(conn)  # SQLite committed some CREATE TABLEs of a first run that then failed
            else:
                _run(conn, "stamp", BASELINE)  # made by create_all before migrations existed
        _run(conn, "upgrade", "head")


SCHEMA_TABLES = ("applicability", "scores", "embeddings", "skipped", "settings", "generations", "images",
                 "alembic_version")  # dependents first


def _holds_no_rows(conn: Connection) -> bool:
    """True when every RadLens table present is empty (no index run ever committed a chunk)."""
    present = [t for t in SCHEMA_TABLES if inspect(conn).has_table(t) and t != "alembic_version"]
    return all(conn.execute(text(f'SELECT COUNT(*) FROM "{t}"')).scalar() == 0 for t in present)


def _drop_partial_schema(conn: Connection) -> None:
    """Remove the empty tables an interrupted first run left, so the schema is created whole."""
    for table in SCHEMA_TABLES:
        if inspect(conn).has_table(table):
            conn.execute(text(f'DROP TABLE "{table}"'))
    conn.commit()


def _run(conn: Connection, action: str, target: str) -> None:
    from alembic import command

    config = alembic_config()
    config.attributes["connection"] = conn
    getattr(command, action)(config, target)
    conn.commit()


@contextmanager
def _schema_lock(engine: Engine):
    """A connection holding the one-migrator-at-a-time lock of this database."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
            conn.commit()
            try:
                yield conn
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                conn.commit()
        return
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        with engine.connect() as conn:
            yield conn
        return
    with open(f"{database}.migrate-lock", "w") as lock, engine.connect() as conn:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield conn
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
