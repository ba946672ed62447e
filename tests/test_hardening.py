"""Faults a user or an unlucky operator meets: each a one-line error, and no debris left behind."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from cxrmodel.errors import DataError
from indexer.check import check_data_dir
from indexer.pipeline import IndexJob, run_index
from indexer.store import default_db_url
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


def test_a_symlink_loop_and_a_non_utf8_name_are_skipped_with_reasons_and_the_rest_indexed(tmp_path, tiny_encoder,
                                                                                          tiny_model_dir, capsys):
    import os

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from indexer.store import SkippedRow, default_db_url, open_db

    src = gray_folder(tmp_path / "src", 3)
    os.symlink(src / "loop_b.png", src / "loop_a.png")
    os.symlink(src / "loop_a.png", src / "loop_b.png")
    (src / "g0.png").rename(os.fsdecode(bytes(src / "bad") + b"\xff.png"))  # a name that is not UTF-8
    summary = run_index(IndexJob(sources=[str(src)], data_dir=tmp_path / "data", workers=0, progress=False),
                        tiny_encoder)
    assert summary.added == 2 and summary.skipped == 3
    db = open_db(default_db_url(tmp_path / "data"))
    with Session(db) as s:
        reasons = {Path(r.path).name: r.reason for r in s.scalars(select(SkippedRow))}
    db.dispose()
    assert reasons["loop_a.png"] == reasons["loop_b.png"] == "symbolic link loop"
    assert reasons["bad\\xff.png"].startswith("file name is not valid UTF-8")
    again = run_index(IndexJob(sources=[str(src)], data_dir=tmp_path / "data", workers=0, progress=False),
                      tiny_encoder)
    assert again.unchanged == 2 and again.skipped == 3  # the good files are not held back by the bad ones
    capsys.readouterr()
    # the CLI ends a run with the reasons (counted, then the first files), and `check --skipped` lists all
    assert main(["index", str(src), "--data-dir", str(tmp_path / "data"), "--model", str(tiny_model_dir),
                 "--precision", "fp32", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "3 files or manifest rows are skipped" in err and "     2  symbolic link loop" in err
    assert main(["check", "--skipped", "--data-dir", str(tmp_path / "data")]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 3 and all("\t" in line for line in listed)


@pytest.mark.parametrize("junk", [b"", b"not safetensors at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_junk_weights_are_a_one_line_model_error(tmp_path, tiny_model_dir, junk, capsys):
    import shutil

    from cxrmodel.errors import ModelLoadError
    from cxrmodel.model.encoder import EncoderConfig, load_encoder

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").write_bytes(junk)
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_encoder(EncoderConfig(model=str(model), precision="fp32"))
    assert main(["label", str(tmp_path / "x.png"), "--model", str(model)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("radlens: error:") and "Traceback" not in err


def test_one_oversized_manifest_field_rejects_that_row_only(tmp_path, tiny_encoder):
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from indexer.store import SkippedRow, default_db_url, open_db

    src = gray_folder(tmp_path / "src", 3)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,caption\n{src}/g0.png,first\n{src}/g1.png,{'x' * 200_000}\n{src}/g2.png,third\n")
    summary = run_index(IndexJob(sources=[str(manifest)], data_dir=tmp_path / "data", workers=0, progress=False),
                        tiny_encoder)
    assert summary.added == 2 and summary.skipped == 1
    db = open_db(default_db_url(tmp_path / "data"))
    with Session(db) as s:
        (row,) = s.scalars(select(SkippedRow)).all()
    db.dispose()
    assert row.path == f"{manifest}:3" and "field larger than field limit" in row.reason


def test_pruning_removes_the_thumbnails_of_pruned_images_only(tmp_path, tiny_encoder):
    src, data = gray_folder(tmp_path / "src", 3), tmp_path / "data"
    (src / "g0_copy.png").write_bytes((src / "g0.png").read_bytes())  # a duplicate shares g0's thumbnail
    job = IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False, prune=True)
    run_index(job, tiny_encoder)
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from indexer.store import ImageRow, default_db_url, open_db
    from search.engine import Engine, EngineConfig

    db = open_db(default_db_url(data))
    with Session(db) as s:
        by_name = {Path(r.path).name: r for r in s.execute(select(ImageRow.id, ImageRow.path, ImageRow.content_hash))}
    db.dispose()
    engine = Engine.open(EngineConfig(data_dir=data), encoder=tiny_encoder)
    for name in ("g1.png", "g0.png"):
        engine.thumbnail(by_name[name].id)
    engine.close()
    thumbs = {p.name for p in (data / "thumbs").iterdir()}
    assert len(thumbs) == 2
    (src / "g1.png").unlink()
    (src / "g0.png").unlink()  # its copy is still there
    assert run_index(job, tiny_encoder).pruned == 2
    left = {p.name for p in (data / "thumbs").iterdir()}
    assert left == {t for t in thumbs if t.startswith(by_name["g0.png"].content_hash)}


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 160 KiB (remount with `_resize`); skipped where this process cannot mount one."""
    import os
    import subprocess

    mount = tmp_path / "mnt"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and the right to mount)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _remount(mount: Path, options: str) -> None:
    import subprocess

    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True, capture_output=True)


def test_a_full_disk_is_a_clear_error_and_a_rerun_with_space_completes(small_disk, tmp_path, tiny_encoder, capsys):
    from search.engine import Engine, EngineConfig

    data = small_disk / "data"
    job = IndexJob(sources=[str(gray_folder(tmp_path / "src", 30))], data_dir=data, workers=0, progress=False,
                   chunk_size=8)
    with pytest.raises(DataError, match="is full"):  # too small even for the schema
        run_index(job, tiny_encoder)
    with pytest.raises(DataError, match="no RadLens index yet"):  # not a half-made index
        Engine.check_openable(EngineConfig(data_dir=data))
    _remount(small_disk, "size=20m")
    run_index(IndexJob(sources=[str(tmp_path / "src")], data_dir=data, workers=0, progress=False), tiny_encoder)
    filler = small_disk / "filler"  # now fill the disk in the middle of a run that adds files
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 48 * 1024))
    more = gray_folder(tmp_path / "more", 200, prefix="m")
    job = IndexJob(sources=[str(tmp_path / "src"), str(more)], data_dir=data, workers=0, progress=False,
                   chunk_size=8)
    with pytest.raises(DataError, match="full"):
        run_index(job, tiny_encoder)
    assert check_data_dir(data, default_db_url(data)).ok  # what is served stayed whole
    filler.unlink()
    summary = run_index(job, tiny_encoder)
    assert summary.unchanged >= 30 and check_data_dir(data, default_db_url(data)).ok
    assert Engine.check_openable(EngineConfig(data_dir=data)).id == 1
    assert not [p for p in data.rglob("*") if ".tmp" in p.name]


def test_a_read_only_data_dir_answers_searches_and_refuses_index_runs_clearly(small_disk, tmp_path, tiny_encoder,
                                                                             capsys):
    from search.engine import Engine, EngineConfig

    _remount(small_disk, "size=20m")
    data = small_disk / "data"
    job = IndexJob(sources=[str(gray_folder(tmp_path / "src", 6))], data_dir=data, workers=0, progress=False)
    run_index(job, tiny_encoder)
    _remount(small_disk, "ro")
    engine = Engine.open(EngineConfig(data_dir=data), encoder=tiny_encoder)
    hits = engine.text("a chest x-ray", k=3)
    assert len(hits) == 3 and engine.thumbnail(hits[0].id)  # served without caching the thumbnail
    engine.close()
    assert check_data_dir(data, default_db_url(data)).ok
    with pytest.raises(DataError, match="cannot write to the data dir"):
        run_index(job, tiny_encoder)
    assert main(["check", "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out.startswith("OK")
