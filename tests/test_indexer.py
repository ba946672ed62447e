"""Indexer: incremental runs, updates, prune, skipped files, model changes, rebuild, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from cxrmodel.errors import DataError
from indexer.check import check_data_dir
from indexer.pipeline import IndexJob, run_index
from indexer.store import EmbeddingRow, ImageRow, ScoreRow, SkippedRow, default_db_url, open_db
from indexer.vectors import IndexConfig, index_ids, read_index
from tests.databases import dump_database, fetch
from tests.imagegen import gray_folder, gray_image, write_dicom

pytestmark = pytest.mark.usefixtures("on_backend")  # SQLite, and PostgreSQL when RADLENS_TEST_DB_URL is set


def _job(src, data, **kw):
    return IndexJob(sources=[str(s) for s in (src if isinstance(src, list) else [src])], data_dir=data,
                    workers=kw.pop("workers", 0), progress=False, chunk_size=kw.pop("chunk_size", 64), **kw)


def _check_ok(data: Path):
    report = check_data_dir(data, default_db_url(data))
    assert report.ok, report.lines()
    return report


def _snapshot(data: Path) -> dict[str, tuple[int, bytes]]:
    db = open_db(default_db_url(data))
    with Session(db) as s:
        rows = s.execute(select(ImageRow.path, ImageRow.id, EmbeddingRow.vector)
                         .join(EmbeddingRow, EmbeddingRow.image_id == ImageRow.id)).all()
    db.dispose()
    return {Path(p).name: (i, v) for p, i, v in rows}


@pytest.fixture
def corpus(tmp_path) -> Path:
    d = tmp_path / "corpus"
    (d / "a").mkdir(parents=True)
    (d / "b").mkdir()
    for i in range(200):
        gray_image(1000 + i).save(d / ("a" if i % 2 else "b") / f"img{i:03d}.png")
    return d


def test_incremental_update_and_prune(corpus, tmp_path, tiny_encoder):
    data = tmp_path / "data"
    first = run_index(_job(corpus, data), tiny_encoder)
    assert (first.added, first.updated, first.unchanged, first.skipped) == (200, 0, 0, 0)
    assert _check_ok(data).vectors == 200

    again = run_index(_job(corpus, data), tiny_encoder)
    assert (again.added, again.updated, again.embedded, again.unchanged) == (0, 0, 0, 200)
    _check_ok(data)

    before = _snapshot(data)
    changed = sorted((corpus / "a").glob("*.png"))[:5]
    for n, path in enumerate(changed):
        gray_image(5000 + n).save(path)
    third = run_index(_job(corpus, data), tiny_encoder)
    assert (third.added, third.updated, third.embedded, third.unchanged) == (0, 5, 5, 195)
    after = _snapshot(data)
    for path in changed:
        assert after[path.name][0] == before[path.name][0]  # same id ...
        assert after[path.name][1] != before[path.name][1]  # ... new vector
    _check_ok(data)

    for path in sorted((corpus / "b").glob("*.png"))[:3]:
        path.unlink()
    kept = run_index(_job(corpus, data), tiny_encoder)
    assert kept.pruned == 0 and _check_ok(data).vectors == 200  # without --prune nothing is removed
    pruned = run_index(_job(corpus, data, prune=True), tiny_encoder)
    assert pruned.pruned == 3 and pruned.embedded == 0
    assert _check_ok(data).vectors == 197


def test_same_content_touched_is_not_re_embedded(corpus, tmp_path, tiny_encoder):
    data = tmp_path / "data"
    run_index(_job(corpus, data), tiny_encoder)
    path = next((corpus / "a").glob("*.png"))
    os.utime(path, ns=(time.time_ns(), time.time_ns()))
    summary = run_index(_job(corpus, data), tiny_encoder)
    assert summary.embedded == 0 and summary.unchanged == 200
    db = open_db(default_db_url(data))
    with Session(db) as s:  # the new mtime is recorded, so the next run need not read the file again
        stored = s.scalar(select(ImageRow.mtime_ns).where(ImageRow.path == str(path.resolve())))
    db.dispose()
    assert stored == path.stat().st_mtime_ns


def test_corrupt_and_non_image_files_are_skipped_with_reason(tmp_path, tiny_encoder):
    src = gray_folder(tmp_path / "src", 4, prefix="ok")
    (src / "notes.png").write_text("not an image")
    data = (src / "ok0.png").read_bytes()
    (src / "cut.png").write_bytes(data[: len(data) // 2])
    (src / "readme.txt").write_text("ignored: not an image extension")
    out = tmp_path / "data"
    summary = run_index(_job(src, out), tiny_encoder)
    assert summary.added == 4 and summary.skipped == 2
    db = open_db(default_db_url(out))
    with Session(db) as s:
        reasons = {Path(r.path).name: r.reason for r in s.scalars(select(SkippedRow))}
    db.dispose()
    assert set(reasons) == {"notes.png", "cut.png"}
    assert "not a recognised image" in reasons["notes.png"] and "truncated" in reasons["cut.png"]
    _check_ok(out)


def test_manifest_metadata_and_dicom_without_phi(tmp_path, tiny_encoder):
    src = tmp_path / "src"
    src.mkdir()
    gray_image(1).save(src / "x1.png")
    write_dicom(src / "scan.dcm", (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16),
                Modality="DX", BodyPartExamined="CHEST", ViewPosition="AP")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"file": "src/x1.png", "caption": "frontal chest", "modality": "XR", "view": "PA"}\n'
                        '{"file": ""}\nnot json\n{"file": "src/missing.png"}\n')
    out = tmp_path / "data"
    summary = run_index(_job([src, manifest], out), tiny_encoder)
    assert summary.added == 2 and summary.skipped == 3  # empty path, bad JSON line, missing file
    db = open_db(default_db_url(out))
    with Session(db) as s:
        rows = {Path(r.path).name: r for r in s.scalars(select(ImageRow))}
        assert (rows["x1.png"].caption, rows["x1.png"].modality, rows["x1.png"].view) == ("frontal chest", "XR", "PA")
        assert (rows["scan.dcm"].modality, rows["scan.dcm"].body_part, rows["scan.dcm"].view) == ("DX", "CHEST", "AP")
        assert s.scalar(select(func.count()).select_from(ScoreRow)) == 2 * 14
    db.dispose()
    dump = dump_database(default_db_url(out))
    assert "DOE" not in dump and "PHI-123456" not in dump and "19700101" not in dump


def test_model_change_refuses_then_rebuild_swaps(corpus, tmp_path, tiny_encoder):
    from cxrmodel.model.encoder import EncoderConfig, load_encoder
    from tests.tinymodel import save_tiny_clip

    data = tmp_path / "data"
    run_index(_job(corpus / "a", data), tiny_encoder)
    other = load_encoder(EncoderConfig(model=str(save_tiny_clip(tmp_path / "other", seed=7)), precision="fp32"))
    with pytest.raises(DataError, match="--rebuild"):
        run_index(_job(corpus / "a", data), other)
    assert _check_ok(data).generation == 1  # the old index is untouched
    summary = run_index(_job(corpus / "a", data, rebuild=True), other)
    assert summary.added == 100 and summary.generation == 2
    assert _check_ok(data).generation == 2
    assert not (data / "index" / "g1.faiss").exists()
    vectors = _snapshot(data)
    one = sorted((corpus / "a").glob("*.png"))[0]
    expected = other.encode_images([gray_image(1000 + int(one.stem[3:]))])[0]
    np.testing.assert_allclose(np.frombuffer(vectors[one.name][1], "<f4"), expected, atol=1e-5)


def test_approximate_index_above_threshold_keeps_recall(corpus, tmp_path, tiny_encoder):
    data = tmp_path / "data"
    run_index(_job(corpus, data, index=IndexConfig(exact_below=50)), tiny_encoder)
    index, meta = read_index(data, 1)
    assert meta.factory.startswith("IVF") and index.ntotal == 200
    vecs = np.stack([np.frombuffer(v, "<f4") for _, v in _snapshot(data).values()])
    ids = np.array([i for i, _ in _snapshot(data).values()])
    exact = ids[np.argsort(-(vecs[:20] @ vecs.T), axis=1)[:, :10]]
    _, approx = index.search(vecs[:20], 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9, recall
    # servers map the file instead of reading it: the same index, the same answers
    mapped, mapped_meta = read_index(data, 1, mmap=True)
    assert mapped_meta.factory == meta.factory and mapped.ntotal == 200
    assert "g1.faiss" in Path("/proc/self/maps").read_text()
    np.testing.assert_array_equal(mapped.search(vecs[:20], 10)[1], approx)
    from search.engine import Engine, EngineConfig

    engine = Engine.open(EngineConfig(data_dir=data), encoder=tiny_encoder)
    try:
        assert engine.stats()["vectors"] == 200 and engine.stats()["index_type"].startswith("IVF")
        assert len(engine.text("a chest x-ray", k=5)) == 5
    finally:
        engine.close()
    assert sorted(index_ids(index)) == sorted(ids)


def test_worker_processes_give_the_same_vectors(corpus, tmp_path, tiny_encoder):
    inproc, pooled = tmp_path / "d0", tmp_path / "d1"
    run_index(_job(corpus / "a", inproc, workers=0), tiny_encoder)
    run_index(_job(corpus / "a", pooled, workers=2), tiny_encoder)
    a, b = _snapshot(inproc), _snapshot(pooled)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0]
        np.testing.assert_allclose(np.frombuffer(a[name][1], "<f4"), np.frombuffer(b[name][1], "<f4"), atol=1e-6)


def _index_cmd(model: Path, src: Path, data: Path) -> list[str]:
    default_db_url(data)  # on a server backend: provisions the data dir's database, which it then remembers
    return [sys.executable, "-m", "radlens", "index", str(src), "--data-dir", str(data), "--model", str(model),
            "--precision", "fp32", "--workers", "0", "--chunk-size", "8", "--no-progress"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(corpus, tmp_path, tiny_model_dir, on_backend):
    reference, killed = tmp_path / "ref", tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run(_index_cmd(tiny_model_dir, corpus, reference), check=True, env=env, capture_output=True)

    url = default_db_url(killed)
    kills = 0
    for threshold in (16, 80, 150):  # kill at several points of the same run
        proc = subprocess.Popen(_index_cmd(tiny_model_dir, corpus, killed), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            try:
                count = fetch(url, "select count(*) from embeddings")[0][0]
            except SQLAlchemyError:
                count = 0
            if count >= threshold:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait()
    assert kills >= 1
    subprocess.run(_index_cmd(tiny_model_dir, corpus, killed), check=True, env=env, capture_output=True)
    _check_ok(killed)
    ref, got = _snapshot(reference), _snapshot(killed)
    assert ref.keys() == got.keys() and len(ref) == 200
    for name in ref:
        if on_backend.name == "sqlite":  # PostgreSQL sequences are not transactional: a killed chunk leaves a gap
            assert ref[name][0] == got[name][0], name
        np.testing.assert_allclose(np.frombuffer(ref[name][1], "<f4"), np.frombuffer(got[name][1], "<f4"), atol=1e-6)
    k_index, _ = read_index(killed, 1)
    assert sorted(index_ids(k_index)) == sorted(i for i, _ in got.values())


def test_manifest_edits_update_rows_without_re_embedding(tmp_path, tiny_encoder):
    src = gray_folder(tmp_path / "src", 3)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,caption\nsrc/g0.png,first words\nsrc/g1.png,unchanged\n")
    data = tmp_path / "data"
    run_index(_job(manifest, data), tiny_encoder)
    manifest.write_text("path,caption\nsrc/g0.png,corrected words\nsrc/g1.png,unchanged\n")
    summary = run_index(_job(manifest, data), tiny_encoder)
    assert summary.embedded == 0 and summary.unchanged == 2
    captions = dict(fetch(default_db_url(data), "select path, caption from images"))
    assert captions[str((src / "g0.png").resolve())] == "corrected words"


def test_unbuildable_index_type_is_a_clear_error_and_rows_survive(tmp_path, tiny_encoder):
    src = gray_folder(tmp_path / "src", 5)
    data = tmp_path / "data"
    with pytest.raises(DataError, match="--index-type"):
        run_index(_job(src, data, index=IndexConfig(index_type="IVF64,PQ4")), tiny_encoder)
    summary = run_index(_job(src, data, index=IndexConfig(index_type="IVF")), tiny_encoder)
    assert summary.embedded == 0 and summary.index_type == "Flat"  # rows were kept; too few to cluster
    _check_ok(data)


def test_the_data_dir_inside_a_source_folder_is_not_indexed(tmp_path, tiny_encoder):
    from search.engine import Engine, EngineConfig

    src = gray_folder(tmp_path / "src", 4)
    data = src / "radlens-data"
    run_index(_job(src, data), tiny_encoder)
    engine = Engine.open(EngineConfig(data_dir=data), encoder=tiny_encoder)
    engine.thumbnail(engine.text("x", k=1)[0].id, 64)  # writes PNGs under the data dir
    engine.close()
    again = run_index(_job(src, data), tiny_encoder)
    assert (again.added, again.unchanged) == (0, 4)


def test_a_second_concurrent_run_is_refused_clearly(tmp_path, tiny_encoder):
    from indexer.pipeline import exclusive_run

    src = tmp_path / "src"
    src.mkdir()
    gray_image(1).save(src / "g.png")
    data = tmp_path / "data"
    # as if another process were indexing
    with exclusive_run(data), pytest.raises(DataError, match="another `radlens index` is running"):
        run_index(_job(src, data), tiny_encoder)
    assert run_index(_job(src, data), tiny_encoder).added == 1


@pytest.mark.parametrize("count", [3, 10])
def test_bounded_imap_keeps_order_and_window_and_starts_once(count):
    """Results come back in order with at most `window` in flight; the warm-up hook runs exactly once,
    after work was submitted and before the first result is taken."""
    from indexer.prepare import bounded_imap

    events: list[str] = []
    in_flight = []

    class Submitted:
        def __init__(self, value):
            self.value = value
            in_flight.append(self)
            events.append(f"submit {value}")

        def get(self):
            in_flight.remove(self)
            events.append(f"get {self.value}")
            return self.value * 2

    peak = 0

    def submit(fn, args):
        nonlocal peak
        job = Submitted(args[0])
        peak = max(peak, len(in_flight))
        return job

    out = list(bounded_imap(submit, None, range(count), window=4, while_starting=lambda: events.append("warm")))
    assert out == [2 * i for i in range(count)]
    assert peak <= 4
    assert events.count("warm") == 1
    warm = events.index("warm")
    assert events[warm - 1].startswith("submit") and events[warm + 1] == "get 0"


def test_decoding_in_turns_keeps_order_and_waits_for_the_caller(monkeypatch):
    """With workers=0 a batch is decoded on threads, and the next one only once the caller asks."""
    import threading

    from indexer import prepare as prep

    started: list[str] = []
    threads: set[str] = set()

    def fake_prepare(task, preprocess, limits):
        started.append(task.path)
        threads.add(threading.current_thread().name)
        return prep.Prepared(path=task.path)

    monkeypatch.setattr(prep, "prepare", fake_prepare)
    tasks = [prep.PrepareTask(f"f{i}") for i in range(10)]
    items = prep.prepare_all(tasks, None, None, workers=0, batch=4, threads=2)
    first = [next(items) for _ in range(4)]
    assert len(started) == 4  # the second batch has not started while the caller holds the first
    rest = list(items)
    assert [p.path for p in first + rest] == [t.path for t in tasks]
    assert all(name.startswith("radlens-decode") for name in threads)


def test_a_manifest_is_planned_as_a_stream_in_batches(tmp_path, tiny_encoder, monkeypatch):
    """The reader is consumed batch by batch: a batch's skipped rows are in the DB before the reader has
    gone much past it, so memory does not grow with the rows listed."""
    import indexer.pipeline as pipeline
    from indexer.sources import SourceRecord

    monkeypatch.setattr(pipeline, "PLAN_BATCH", 10)
    data = tmp_path / "data"
    data.mkdir()
    db = open_db(default_db_url(data))
    seen_in_db = []

    def records():
        for i in range(35):
            if i in (12, 34):
                seen_in_db.append(fetch(default_db_url(data), "SELECT count(*) FROM skipped")[0][0])
            yield SourceRecord(str(tmp_path / "missing" / f"{i}.png"))

    writer = pipeline.ChunkWriter(db, 1, tiny_encoder, pipeline.LabelConfig())
    summary = pipeline.IndexSummary()
    assert writer.plan(records(), summary) == [] and summary.skipped == 35
    assert seen_in_db == [10, 30]  # drawing item 12 found the first batch written; item 34, three batches
    db.dispose()


def test_an_unchanged_rerun_over_broken_rows_writes_nothing_for_them(tmp_path, tiny_encoder):
    src = gray_folder(tmp_path / "src", 2)
    manifest = tmp_path / "m.csv"
    rows = [f"{p}" for p in sorted(src.iterdir())] + [f"gone/{i}.png" for i in range(50)] + ["", ""]
    manifest.write_text("path\n" + "\n".join(rows[:-2]) + "\n,\n,\n")
    job = IndexJob(sources=[str(manifest)], data_dir=tmp_path / "data", workers=0, progress=False)
    first = run_index(job, tiny_encoder)
    before = fetch(default_db_url(tmp_path / "data"), "SELECT path, reason, at FROM skipped ORDER BY path")
    second = run_index(job, tiny_encoder)
    after = fetch(default_db_url(tmp_path / "data"), "SELECT path, reason, at FROM skipped ORDER BY path")
    assert (first.added, first.skipped, second.unchanged, second.skipped) == (2, 52, 2, 52)
    assert len(before) == 52 and after == before  # not rewritten: same rows, same times


def test_a_wrong_source_is_refused_before_the_data_dir_is_made(tmp_path, tiny_encoder):
    manifest = tmp_path / "m.csv"
    manifest.write_text("colour,shape\nred,circle\n")
    with pytest.raises(DataError, match="no such file or folder"):
        run_index(IndexJob(sources=[str(tmp_path / "src-that-exists-not"), str(manifest)], data_dir=tmp_path / "d",
                           workers=0, progress=False), tiny_encoder)
    with pytest.raises(DataError, match="no path column"):
        run_index(IndexJob(sources=[str(manifest)], data_dir=tmp_path / "d", workers=0, progress=False), tiny_encoder)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("index", [IndexConfig(index_type="Flat"), IndexConfig(index_type="IVF"),
                                   IndexConfig(index_type="IVF4,PQ8x4", target_recall=0.9)],
                         ids=["Flat", "IVF", "IVFPQ"])
def test_an_indexed_file_that_changes_into_an_unreadable_one_is_said_stale_and_pruned(tmp_path, tiny_encoder, index):
    """A file overwritten by a truncated copy keeps its row (nothing indexed is lost by a bad file), but the
    run says that row now holds content the file no longer has, and `--prune` removes it from every index
    type; a plainly unreadable new file is not called changed. Before, the stale row was kept silently and
    forever (`--prune` only removed files that no longer exist)."""
    from search.engine import Engine, EngineConfig

    src = gray_folder(tmp_path / "src", 300)
    data = tmp_path / "data"
    run_index(_job(src, data, index=index), tiny_encoder)
    victim = sorted(src.glob("*.png"))[7]
    victim.write_bytes(victim.read_bytes()[:-40])  # truncated in place
    (src / "new-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    kept = run_index(_job(src, data, index=index), tiny_encoder)
    assert kept.skipped == 2 and kept.pruned == 0 and _check_ok(data).vectors == 300
    db = open_db(default_db_url(data))
    with Session(db) as s:
        skipped = {Path(p).name: (k, r) for p, k, r in s.execute(select(SkippedRow.path, SkippedRow.kind,
                                                                          SkippedRow.reason))}
        victim_id = s.scalar(select(ImageRow.id).where(ImageRow.path == str(victim.resolve())))
    assert skipped[victim.name][0] == "changed" and "--prune" in skipped[victim.name][1]
    assert skipped["new-broken.png"][0] == "file" and "changed" not in skipped["new-broken.png"][1]
    pruned = run_index(_job(src, data, index=index, prune=True), tiny_encoder)
    assert pruned.pruned == 1 and _check_ok(data).vectors == 299
    with Session(db) as s:
        assert s.get(ImageRow, victim_id) is None
        kind, reason = s.execute(select(SkippedRow.kind, SkippedRow.reason)
                                 .where(SkippedRow.path == str(victim.resolve()))).one()
    db.dispose()
    assert kind == "file" and "--prune" not in reason  # still unreadable, and no longer said to be indexed
    engine = Engine.open(EngineConfig(data_dir=data, reload_interval=0.0), encoder=tiny_encoder)
    try:
        assert engine.stats()["vectors"] == 299
        assert victim_id not in {h.id for h in engine.text("x", k=299)}
    finally:
        engine.close()


def test_check_files_says_which_indexed_files_are_gone_changed_or_unreadable(tmp_path, tiny_encoder, capsys):
    """`radlens check --files` compares the disk with the index: a deleted file, one changed after the last
    run, and one a run found changed into something that does not decode are each listed with what fixes
    them, and the command exits 1; after `index --prune` it is clean again."""
    from radlens.cli import main

    src = gray_folder(tmp_path / "src", 6)
    data = tmp_path / "data"
    run_index(_job(src, data), tiny_encoder)
    assert main(["check", "--data-dir", str(data), "--files"]) == 0
    assert "OK: 6 indexed files checked on disk" in capsys.readouterr().out
    unreadable = src / "g2.png"
    unreadable.write_bytes(unreadable.read_bytes()[:-40])
    run_index(_job(src, data), tiny_encoder)
    (src / "g0.png").unlink()
    gray_image(99).save(src / "g1.png")  # changed after the last run
    assert main(["check", "--data-dir", str(data), "--files"]) == 1
    out = capsys.readouterr().out
    assert "FILES CHANGED: 6 indexed files checked on disk" in out
    for name, what in (("g0.png", "1 no longer exist"), ("g1.png", "1 changed since they were indexed"),
                       ("g2.png", "1 changed into files that do not decode")):
        assert what in out and str(src / name) in out.split(what, 1)[1].splitlines()[1]
    run_index(_job(src, data, prune=True), tiny_encoder)
    assert main(["check", "--data-dir", str(data), "--files"]) == 0
    assert "OK: 4 indexed files checked on disk" in capsys.readouterr().out
