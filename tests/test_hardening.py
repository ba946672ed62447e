"""Faults a user or an unlucky operator meets: each a one-line error, and no debris left behind."""

from __future__ import annotations

import sqlite3

import pytest

from cxrmodel.errors import DataError
from indexer.pipeline import IndexJob, run_index
from radlens.cli import main
from tests.imagegen import gray_folder


def test_a_data_dir_that_is_a_file_is_a_clear_error(tmp_path, tiny_encoder, capsys):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(DataError, match="is a file, not a directory"):
        run_index(IndexJob(sources=[str(gray_folder(tmp_path / "src", 1))], data_dir=tmp_path / "data",
                           workers=0, progress=False), tiny_encoder)
    assert main(["search", "x", "--data-dir", str(tmp_path / "data")]) == 1
    assert capsys.readouterr().err.startswith("radlens: error:")


def test_temporary_files_of_a_killed_run_are_removed_by_the_next(tmp_path, tiny_encoder):
    src, data = gray_folder(tmp_path / "src", 2), tmp_path / "data"
    job = IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False)
    run_index(job, tiny_encoder)
    debris = [data / "index" / "g1.faiss.tmp4242", data / "index" / "g1.json.tmp4242", data / "patient-key.salt.tmp77"]
    for path in debris:
        path.write_bytes(b"half-written")
    keep = data / "index" / "g1.faiss"
    assert run_index(job, tiny_encoder).unchanged == 2
    assert not any(p.exists() for p in debris) and keep.exists()


def test_a_database_without_tables_is_no_index_for_readers(tmp_path, capsys):
    """An interrupted first run can leave an empty radlens.db: readers say so in one line."""
    from search.engine import Engine, EngineConfig

    (tmp_path / "data").mkdir()
    sqlite3.connect(tmp_path / "data" / "radlens.db").close()
    with pytest.raises(DataError, match="no RadLens index yet"):
        Engine.check_openable(EngineConfig(data_dir=tmp_path / "data"))
    for argv in (["search", "lung"], ["check"]):
        assert main([*argv, "--data-dir", str(tmp_path / "data")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("radlens: error:") and "radlens index" in err and "Traceback" not in err
