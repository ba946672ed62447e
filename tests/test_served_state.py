"""One served state: a model switch under concurrent queries never mixes an encoder with another
model's index, and a generation built with other numerics or another hub revision is refused."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrmodel.errors import DataError
from indexer.pipeline import IndexJob, run_index
from indexer.store import EmbeddingRow, Generation, default_db_url, open_db
from tests.imagegen import gray_folder, shape_image
from tests.tinymodel import save_tiny_clip


def _vectors(data) -> dict[int, dict[int, np.ndarray]]:
    """generation -> image id -> stored vector."""
    db = open_db(default_db_url(data))
    with Session(db) as s:
        out: dict[int, dict[int, np.ndarray]] = {}
        for gen, image_id, blob in s.execute(select(EmbeddingRow.generation_id, EmbeddingRow.image_id,
                                                    EmbeddingRow.vector)):
            out.setdefault(gen, {})[image_id] = np.frombuffer(blob, "<f4")
    db.dispose()
    return out


@pytest.mark.slow
def test_a_model_switch_under_concurrent_queries_never_mixes_encoder_and_index(tmp_path, tiny_model_dir):
    from cxrmodel.model.encoder import EncoderConfig, load_encoder
    from search.engine import Engine, EngineConfig

    other_model = save_tiny_clip(tmp_path / "other", seed=1, projection_dim=24)  # another space, another size
    encoders = {1: load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32")),
                2: load_encoder(EncoderConfig(model=str(other_model), precision="fp32"))}
    src, data = gray_folder(tmp_path / "src", 12), tmp_path / "data"
    run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False), encoders[1])
    stored = _vectors(data)
    engine = Engine.open(EngineConfig(data_dir=data, precision="fp32", reload_interval=0.0))
    image = shape_image("circle", "red", seed=3)
    results, errors, stop = [], [], threading.Event()

    def ask():
        while not stop.is_set():
            try:
                results.append(("text", engine.text("a chest x-ray", k=4)))
                results.append(("image", engine.image(image, k=4)))
                results.append(("filtered", engine.text("a chest x-ray", k=4,
                                                        filters=engine.parse_filters(["format=png"]))))
            except Exception as exc:  # noqa: BLE001 -- any error at all fails the test
                errors.append(repr(exc))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False, rebuild=True), encoders[2])
        stored.update(_vectors(data))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(h.generation == 2 for _, hits in results[-9:] for h in hits):
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    engine.close()
    assert not errors, errors[:3]
    generations = {h.generation for _, hits in results for h in hits}
    assert generations == {1, 2}, generations  # queries ran before and after the switch
    for kind, hits in results:
        assert len({h.generation for h in hits}) == 1  # one state per query
        encoder = encoders[hits[0].generation]
        query = encoder.encode_images([image])[0] if kind == "image" else encoder.encode_texts(["a chest x-ray"])[0]
        for hit in hits:  # the score is that generation's model's query against that generation's vector
            assert hit.score == pytest.approx(float(stored[hit.generation][hit.id] @ query), abs=1e-4)


def test_an_index_is_not_extended_with_other_numerics_or_another_hub_revision(tmp_path, tiny_encoder):
    src, data = gray_folder(tmp_path / "src", 3), tmp_path / "data"
    run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False), tiny_encoder)
    db = open_db(default_db_url(data))
    with Session(db) as s:
        gen = s.scalars(select(Generation)).one()
        assert (gen.numerics, gen.model_revision) == ("fp32", None)
        identity = dict(tiny_encoder.identity)
        assert gen.matches(identity)
        assert not gen.matches({**identity, "numerics": "bf16"})  # bf16 vectors are not mixed into fp32 ones
        assert gen.serves({**identity, "numerics": "bf16"})  # but a bf16 query encoder may search it
        gen.model_revision = "a" * 40  # as if built from a hub model at one commit
        assert not gen.matches({**identity, "revision": "b" * 40})
        assert not gen.serves({**identity, "revision": "b" * 40})
        gen.numerics = None  # generations recorded before numerics existed match any
        assert Generation(model=gen.model, adapter_hash=gen.adapter_hash, dim=gen.dim).matches(identity)
    db.dispose()

    class Bf16Encoder:  # the same model embedding in bf16: the index must refuse it without --rebuild
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        @property
        def identity(self):
            return {**self.inner.identity, "numerics": "bf16"}

    (src / "new.png").write_bytes((src / next(p.name for p in src.iterdir())).read_bytes())
    with pytest.raises(DataError, match="fp32.*bf16|--rebuild"):
        run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False), Bf16Encoder(tiny_encoder))


def test_a_hub_model_records_the_commit_it_loaded(tmp_path, tiny_model_dir, monkeypatch):
    """A hub id is resolved (here from an offline hub cache) and its commit becomes part of the index's
    identity; asking for another revision of the same id is refused as another model."""
    import shutil

    from cxrmodel.model.encoder import EncoderConfig, load_encoder

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--radlens-test--tiny-clip"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    encoder = load_encoder(EncoderConfig(model="radlens-test/tiny-clip", precision="fp32"))
    assert encoder.revision == commit and encoder.identity["revision"] == commit
    src, data = gray_folder(tmp_path / "src", 2), tmp_path / "data"
    run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False), encoder)
    db = open_db(default_db_url(data))
    with Session(db) as s:
        gen = s.scalars(select(Generation)).one()
        assert gen.model == "radlens-test/tiny-clip" and gen.model_revision == commit
    db.dispose()
    local = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32"))
    assert local.revision is None  # a local directory has no hub commit
