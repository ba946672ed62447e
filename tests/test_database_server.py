"""Schema migrations (Alembic) and several writers on one database server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text

from cxrmodel.errors import DataError
from indexer.check import check_data_dir
from indexer.migrations import BASELINE, alembic_config, current_revision, head_revision
from indexer.pipeline import IndexJob, run_index
from indexer.store import Base, default_db_url, open_db
from tests.databases import fetch
from tests.imagegen import gray_folder

pytestmark = pytest.mark.usefixtures("on_backend")


def test_the_head_revision_in_code_is_alembics_head():
    """`HEAD` spares readers the Alembic import; a new migration script must move it."""
    from alembic.script import ScriptDirectory

    assert head_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_migrations_create_exactly_the_models_schema(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    (tmp_path / "d").mkdir()
    db = open_db(default_db_url(tmp_path / "d"))
    with db.connect() as conn:
        assert current_revision(conn) == head_revision()
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    db.dispose()


def test_a_database_from_before_migrations_is_upgraded_by_the_indexer_and_refused_by_readers(tmp_path, tiny_encoder):
    (tmp_path / "d").mkdir()
    url = default_db_url(tmp_path / "d")
    old = create_engine(url)  # the schema such a database has: the baseline's, with no alembic_version
    with old.connect() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, BASELINE)
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("INSERT INTO images (path, content_hash, size_bytes, mtime_ns, width, height, format, "
                          "added_at, updated_at) VALUES ('/old/a.png', 'h', 1, 0, 8, 8, 'PNG', CURRENT_TIMESTAMP, "
                          "CURRENT_TIMESTAMP)"))  # it holds an index
        conn.commit()
    old.dispose()
    with pytest.raises(DataError, match="run `radlens index` once to upgrade"):
        open_db(url, create=False)
    summary = run_index(IndexJob(sources=[str(gray_folder(tmp_path / "src", 3))], data_dir=tmp_path / "d",
                                 workers=0, progress=False), tiny_encoder)
    assert summary.added == 3
    db = open_db(url, create=False)
    with db.connect() as conn:
        assert current_revision(conn) == head_revision() and inspect(conn).has_table("settings")
        assert conn.execute(text("SELECT count(*) FROM images WHERE path = '/old/a.png'")).scalar() == 1  # kept
    db.dispose()


def test_a_data_dir_with_salted_hashes_and_exact_dates_is_migrated_by_the_next_run(tmp_path, tiny_encoder,
                                                                                  monkeypatch):
    """Schema 0004: the old salted patient hashes and exact study dates are forgotten at the upgrade, the
    next run re-reads the files' headers (no re-embedding) and writes pseudonyms and shifted days."""
    import datetime as dt
    import hashlib

    import numpy as np

    from indexer.metadata import LEGACY_SALT_FILE
    from search.engine import Engine, EngineConfig
    from tests.databases import dump_database
    from tests.imagegen import write_dicom

    monkeypatch.setenv("RADLENS_PATIENT_KEY_FILE", str(tmp_path / "key"))
    src, data = tmp_path / "src", tmp_path / "d"
    src.mkdir()
    for name, date in (("a.dcm", "20230314"), ("b.dcm", "20240105")):
        write_dicom(src / name, (np.arange(32 * 32).reshape(32, 32) * 3 % 4096).astype(np.uint16),
                    PatientID="MRN-0815", StudyDate=date, Modality="DX", BodyPartExamined="CHEST")
    job = IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False)
    run_index(job, tiny_encoder)
    url = default_db_url(data)
    old = create_engine(url)  # make it what RadLens before 0004 wrote: salted hashes and exact dates
    with old.connect() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.downgrade(config, "0003")
        salted = hashlib.sha256(b"salt" + b"MRN-0815").hexdigest()
        conn.execute(text("UPDATE images SET patient_hash = :h, study_date = '2023-03-14'"), {"h": salted})
        conn.execute(text("INSERT INTO settings (key, value) VALUES ('patient_salt_fingerprint', 'f')"))
        conn.commit()
    old.dispose()
    (data / LEGACY_SALT_FILE).write_text(b"salt".hex())
    with pytest.raises(DataError, match="run `radlens index` once to upgrade"):
        open_db(url, create=False)

    summary = run_index(job, tiny_encoder)
    assert summary.embedded == 0 and summary.unchanged == 2  # headers re-read, nothing re-embedded
    dump = dump_database(url)
    assert salted not in dump and "2023-03-14" not in dump and "patient_salt_fingerprint" not in dump
    assert not (data / LEGACY_SALT_FILE).exists()
    days = [d for (d,) in fetch(url, "SELECT study_day FROM images ORDER BY path")]
    assert days[1] - days[0] == (dt.date(2024, 1, 5) - dt.date(2023, 3, 14)).days
    assert days[0] < dt.date(2023, 3, 14).toordinal() - 364
    engine = Engine.open(EngineConfig(data_dir=data), encoder=tiny_encoder)
    first = min(h.id for h in engine.text("x", k=2))
    assert [st["days_from_this"] for st in engine.priors(first)["studies"]] == [0, 297]
    engine.close()


def test_a_second_data_dir_with_another_patient_key_is_refused(tmp_path, tiny_encoder, monkeypatch):
    src = gray_folder(tmp_path / "src", 2)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,patient_id\n" + "".join(f"{p},P{i}\n" for i, p in enumerate(sorted(src.iterdir()))))
    url = default_db_url(tmp_path / "a")
    monkeypatch.setenv("RADLENS_PATIENT_KEY_FILE", str(tmp_path / "key-a"))
    run_index(IndexJob(sources=[str(manifest)], data_dir=tmp_path / "a", workers=0, progress=False), tiny_encoder)
    monkeypatch.setenv("RADLENS_PATIENT_KEY_FILE", str(tmp_path / "key-b"))
    with pytest.raises(DataError, match="hashed with another key"):
        run_index(IndexJob(sources=[str(manifest)], data_dir=tmp_path / "b", db_url=url, workers=0, progress=False),
                  tiny_encoder)
    monkeypatch.setenv("RADLENS_PATIENT_KEY_FILE", str(tmp_path / "key-a"))
    assert run_index(IndexJob(sources=[str(manifest)], data_dir=tmp_path / "b", db_url=url, workers=0,
                              progress=False), tiny_encoder).unchanged == 2


@pytest.mark.slow
def test_two_index_runs_at_once_on_one_server_store_every_row_exactly_once(tmp_path, tiny_model_dir, on_backend):
    if on_backend.name == "sqlite":
        pytest.skip("concurrent writers are a database-server feature (SQLite has one writer; one run per data dir)")
    shared = gray_folder(tmp_path / "shared", 40, prefix="s")
    only_a = gray_folder(tmp_path / "only_a", 30, prefix="a")
    only_b = gray_folder(tmp_path / "only_b", 30, prefix="b")
    url = default_db_url(tmp_path / "a")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def cmd(data, *sources):
        return [sys.executable, "-m", "radlens", "index", *map(str, sources), "--data-dir", str(data),
                "--db-url", url, "--model", str(tiny_model_dir), "--precision", "fp32", "--workers", "0",
                "--chunk-size", "4", "--no-progress"]
    runs = [subprocess.Popen(cmd(tmp_path / "a", shared, only_a), env=env, stderr=subprocess.PIPE, text=True),
            subprocess.Popen(cmd(tmp_path / "b", only_b, shared), env=env, stderr=subprocess.PIPE, text=True)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    paths = [p for (p,) in fetch(url, "select path from images")]
    assert len(paths) == len(set(paths)) == 100
    assert fetch(url, "select count(*) from generations") == [(1,)]
    assert fetch(url, "select count(*), count(distinct image_id) from embeddings") == [(100, 100)]
    assert fetch(url, "select count(*) from applicability") == [(100,)]
    assert fetch(url, "select count(*) from (select image_id, pathology from scores group by image_id, pathology "
                      "having count(*) > 1) d") == [(0,)]
    for data in (tmp_path / "a", tmp_path / "b"):  # a data dir's FAISS file catches up with the other's rows
        subprocess.run(cmd(data, shared), env=env, check=True, capture_output=True)
        report = check_data_dir(data, url)
        assert report.ok and report.vectors == 100, report.lines()
