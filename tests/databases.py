"""Database backends the indexer/engine/web tests run on: the embedded SQLite, and PostgreSQL.

Set RADLENS_TEST_DB_URL to an admin URL of a PostgreSQL server (e.g.
postgresql+psycopg://postgres@127.0.0.1:54329/postgres; `.ci/run` starts one) and every test that
uses the `backend` fixture also runs there, each data dir on a fresh database of its own, which the
data dir remembers (its `database.url` file) just as a user's does after `--db-url`.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from sqlalchemy import MetaData, create_engine, text

from indexer.store import embedded_db_url, remember_db_url

ADMIN_URL = os.environ.get("RADLENS_TEST_DB_URL")


class SqliteBackend:
    """The embedded default: nothing to provision."""

    name = "sqlite"

    def url_for(self, data_dir: str | Path) -> str:
        return embedded_db_url(data_dir)

    def close(self) -> None:
        pass


class PostgresBackend:
    """One fresh database per data dir on the server at ADMIN_URL, dropped at the end."""

    name = "postgresql"
    _counter = itertools.count()

    def __init__(self, admin_url: str):
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.admin_url = admin_url
        self.made: dict[str, str] = {}

    def url_for(self, data_dir: str | Path) -> str:
        key = str(Path(data_dir).resolve())
        if key not in self.made:
            name = f"radlens_t{os.getpid()}_{next(self._counter)}"
            with self.admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            url = self.admin.url.set(database=name).render_as_string(hide_password=False)
            remember_db_url(data_dir, url)
            self.made[key] = name
        return (Path(data_dir) / "database.url").read_text().strip()

    def close(self) -> None:
        with self.admin.connect() as conn:
            for name in self.made.values():
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()


def dump_database(url: str) -> str:
    """Every row of every table as text (a DB-agnostic `iterdump`), to search for leaked values."""
    engine = create_engine(url)
    meta = MetaData()
    meta.reflect(engine)
    lines = []
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            lines += [f"{table.name}: {tuple(row)!r}" for row in conn.execute(table.select())]
    engine.dispose()
    return "\n".join(lines)


def fetch(url: str, sql: str) -> list[tuple]:
    """Rows of one SQL query."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()
