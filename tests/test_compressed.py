"""Compressed indexes (IVF-PQ on disk, filled in shards, fp16 re-ranking) on their own and behind `radlens index`."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexer import compressed as C
from indexer.check import check_data_dir
from indexer.pipeline import IndexJob, run_index
from indexer.store import default_db_url
from indexer.vectors import IndexConfig, read_meta
from tests.imagegen import gray_folder


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.7 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """20,000 clustered 64-d vectors with sparse ids, built in two parallel shards."""
    work = tmp_path_factory.mktemp("compressed")
    vectors, ids = _clustered(20_000, 64, seed=0), np.arange(20_000, dtype=np.int64) * 7 + 3
    stem = work / "g1-1"
    C.write_vectors(C.chunks_of(vectors, ids, size=3000), stem, 64, len(ids))
    path = C.build(stem, 64, len(ids), "IVF64,PQ16", C.CompressedParams(shards=2))
    return path, stem, vectors, ids


def test_every_vector_is_in_the_merged_shards_exactly_once(built):
    path, stem, _, ids = built
    index = C.RerankedIndex.open(path, stem, nprobe=8, depth=50)
    assert index.ntotal == len(ids)
    assert np.array_equal(np.sort(index.all_ids()), ids)
    assert not list(stem.parent.glob("*.shard*")) and not list(stem.parent.glob("*.trained*"))


def test_tuned_recall_and_exact_rescoring(built):
    path, stem, vectors, ids = built
    index = C.RerankedIndex.open(path, stem, nprobe=1, depth=10)
    queries = _clustered(300, 64, seed=9)
    truth = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    assert C.recall_at_k(index.search(queries, 10)[1], truth, 10) < 0.95  # untuned: too few lists and candidates
    nprobe, depth, recall = C.tune(index, queries[:100], truth[:100], target=0.95)
    assert recall >= 0.95 and (nprobe, depth) != (1, 10)
    scores, found = index.search(queries[100:], 10)
    assert C.recall_at_k(found, truth[100:], 10) >= 0.93  # held out from tuning
    by_id = dict(zip(ids.tolist(), range(len(ids)), strict=True))
    exact = np.array([[vectors[by_id[i]] @ q for i in row] for row, q in zip(found, queries[100:], strict=True)])
    np.testing.assert_allclose(scores, exact, atol=2e-3)  # fp16 rows: re-scored, not PQ-approximated


def test_filters_reach_inside_the_compressed_search(built):
    path, stem, _, ids = built
    index = C.RerankedIndex.open(path, stem, nprobe=64, depth=200)
    allowed = ids[::97]
    params = faiss.SearchParametersIVF(sel=faiss.IDSelectorBatch(allowed), nprobe=64)
    _, found = index.search(_clustered(5, 64, seed=3), 10, params=params)
    assert set(found[found >= 0].tolist()) <= set(allowed.tolist()) and (found >= 0).all()


@pytest.mark.usefixtures("on_backend")
def test_radlens_index_builds_tunes_and_serves_a_compressed_index(tmp_path, tiny_encoder):
    from search.engine import Engine, EngineConfig

    src = gray_folder(tmp_path / "src", 300)
    data = tmp_path / "data"
    config = IndexConfig(index_type="IVF4,PQ8x4", target_recall=0.9, compressed=C.CompressedParams(shards=2))
    summary = run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False, index=config),
                        tiny_encoder)
    assert summary.index_type == "IVF4,PQ8x4"
    meta = read_meta(data, summary.generation)
    assert meta.stem and meta.depth and meta.nprobe and meta.measured_recall >= 0.9
    assert check_data_dir(data, default_db_url(data)).ok
    engine = Engine.open(EngineConfig(data_dir=data, reload_interval=0.0), encoder=tiny_encoder)
    assert engine.stats()["vectors"] == 300
    hit = engine.image(engine.load(engine.text("x", k=1)[0].id), k=1)[0]
    assert hit.score == pytest.approx(1.0, abs=2e-3)  # an indexed image finds itself, re-scored exactly
    gray_folder(tmp_path / "src2", 20, prefix="more")
    run_index(IndexJob(sources=[str(src), str(tmp_path / "src2")], data_dir=data, workers=0, progress=False,
                       index=config), tiny_encoder)
    assert engine.stats()["vectors"] == 320  # the server switched to the rebuilt index
    assert len(list((data / "index").glob("*.ivfdata"))) == 1  # the old parts are gone
    run_index(IndexJob(sources=[str(src), str(tmp_path / "src2")], data_dir=data, workers=0, progress=False,
                       index=IndexConfig(index_type="Flat")), tiny_encoder)
    assert engine.stats()["index_type"] == "Flat" and engine.stats()["vectors"] == 320
    assert not list((data / "index").glob("g*-*"))  # back to a plain index: no compressed parts left
    assert check_data_dir(data, default_db_url(data)).ok
    engine.close()


@pytest.mark.usefixtures("on_backend")
def test_small_changes_sit_beside_the_compressed_build_until_a_rebuild(tmp_path, tiny_encoder):
    from search.engine import Engine, EngineConfig
    from tests.imagegen import gray_image

    src = gray_folder(tmp_path / "src", 300)
    data = tmp_path / "data"
    config = IndexConfig(index_type="IVF4,PQ8x4",
                         target_recall=0.9, compressed=C.CompressedParams(shards=1, delta_fraction=0.05))

    def index(prune=False):
        return run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False, index=config,
                                  prune=prune), tiny_encoder)
    index()
    built = read_meta(data, 1)
    engine = Engine.open(EngineConfig(data_dir=data, reload_interval=0.0), encoder=tiny_encoder)
    gray_image(90_001).save(src / "new.png")  # added
    gray_image(90_002).save(src / "g7.png")  # changed content: re-embedded under the same id
    (src / "g8.png").unlink()  # deleted
    summary = index(prune=True)
    assert (summary.added, summary.updated, summary.pruned) == (1, 1, 1)
    meta = read_meta(data, 1)
    assert meta.stem == built.stem and meta.delta and meta.removed  # no rebuild
    assert check_data_dir(data, default_db_url(data)).ok
    assert engine.stats()["vectors"] == 300
    for name in ("new.png", "g7.png"):  # the changed images are found, once, by their new content
        hits = engine.image(gray_image(90_001 if name == "new.png" else 90_002), k=5)
        assert hits[0].image["file_name"] == name and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert [h.image["file_name"] for h in hits].count(name) == 1
    assert "g8.png" not in {h.image["file_name"] for h in engine.text("x", k=300)}
    for i in range(20):  # past delta_fraction: rebuilt, changes folded in
        gray_image(91_000 + i).save(src / f"more{i}.png")
    index()
    rebuilt = read_meta(data, 1)
    assert rebuilt.stem != built.stem and rebuilt.delta is None and engine.stats()["vectors"] == 320
    assert check_data_dir(data, default_db_url(data)).ok
    engine.close()
