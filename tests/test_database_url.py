"""The same index/engine round trip on a database server, when one is given.

Set RADLENS_TEST_DB_URL (e.g. postgresql+psycopg://postgres@127.0.0.1:54329/radlens_test, an empty
database the test may fill) to run it; the default suite runs everything on SQLite.
"""

from __future__ import annotations

import os

import pytest

from indexer.check import check_data_dir
from indexer.pipeline import IndexJob, run_index
from tests.imagegen import gray_image

URL = os.environ.get("RADLENS_TEST_DB_URL")
pytestmark = pytest.mark.skipif(not URL, reason="RADLENS_TEST_DB_URL not set")


@pytest.fixture
def empty_db():
    from indexer.store import Base, open_db

    db = open_db(URL)
    Base.metadata.drop_all(db)
    Base.metadata.create_all(db)
    db.dispose()
    return URL


def test_index_search_priors_and_prune_on_a_database_server(tmp_path, tiny_encoder, empty_db):
    from search.engine import Engine, EngineConfig

    src = tmp_path / "src"
    src.mkdir()
    rows = ["path,modality,body_part,view,patient_id,study_date"]
    for i in range(30):
        gray_image(i).save(src / f"g{i}.png")
        rows.append(f"src/g{i}.png,X-ray,chest,PA,P{i % 3},2024-01-{i % 28 + 1:02d}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    job = dict(sources=[str(tmp_path / "m.csv")], data_dir=tmp_path / "d", db_url=empty_db, workers=0,
               progress=False)
    assert run_index(IndexJob(**job), tiny_encoder).added == 30
    assert run_index(IndexJob(**job), tiny_encoder).unchanged == 30
    assert check_data_dir(tmp_path / "d", empty_db).ok
    engine = Engine.open(EngineConfig(data_dir=tmp_path / "d", db_url=empty_db), encoder=tiny_encoder)
    hits = engine.text("x", k=5, filters=engine.parse_filters(["effusion>=0", "modality=x-ray"]))
    assert len(hits) == 5 and all(h.applicability["applicable"] for h in hits)
    assert len(engine.priors(hits[0].id)["studies"]) == 10
    engine.close()
    (src / "g0.png").unlink()
    assert run_index(IndexJob(prune=True, **job), tiny_encoder).pruned == 1
    assert check_data_dir(tmp_path / "d", empty_db).ok
