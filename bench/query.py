"""Query latency at scale: text encode + search + DB fetch, exact vs approximate, 10k / 100k / 1M vectors.

    python -m bench.query [--sizes 10000,100000,1000000] [--queries 60] [--out bench-out/query]
    python -m bench.query --filters [--sizes 1000000]

`--filters`: one auto-sized IVF index per size, queried unfiltered and with filters matching 0.1%,
10%, 50% and 100% of rows: end-to-end text query and search-only p50/p95 (filter selection cached,
as a server has it after the first query), the first (cold) query that fetches the selection from
the DB, the plan taken, and recall@10 against brute force over the allowed rows.

Vectors are synthetic unit vectors drawn around 2,000 cluster centres (embeddings of real corpora are
clustered; uniformly random vectors would make every approximate index look bad). Each size gets a real
data dir (SQLite rows + FAISS file) and is queried end to end through `search.Engine.text` with the
ViT-B/32 text tower (bf16), p50/p95 over distinct queries. Recall@10 of the approximate index is measured
against exact search on held-out vectors from the same distribution.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import insert
from sqlalchemy.orm import Session

from bench.common import cpu_kind, table
from bench.models import vit_b32_dir
from indexer.compressed import recall_at_k
from indexer.store import Generation, ImageRow, default_db_url, open_db
from indexer.vectors import IndexConfig, IndexMeta, choose_factory, new_index, tune_nprobe, write_index_atomic

DIM = 512
QUERIES = ["lateral chest radiograph", "axial CT of the chest", "MRI of the brain", "pleural effusion",
           "enlarged heart on a frontal film", "pneumothorax on the right", "AP supine portable chest x-ray",
           "coronal CT of the lungs", "lung nodule", "hiatal hernia behind the heart", "normal chest x-ray",
           "brain tumour with contrast", "consolidation in the left lower lobe", "pulmonary edema",
           "emphysema with flattened diaphragms", "rib fracture", "lateral lumbar spine", "knee radiograph"]


def clustered_vectors(n: int, seed: int, centres: int = 2000, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, DIM)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        noise = rng.standard_normal((m, DIM)).astype(np.float32)
        block = c[rng.integers(0, centres, m)] + spread / np.sqrt(DIM) * noise
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def build(vectors: np.ndarray, factory: str) -> tuple[faiss.Index, float]:
    t0 = time.perf_counter()
    index = new_index(DIM, factory)
    if not index.is_trained:
        nlist = faiss.downcast_index(index.index).nlist
        step = max(1, len(vectors) // (64 * nlist))
        index.train(vectors[::step])
    index.add_with_ids(vectors, np.arange(1, len(vectors) + 1, dtype=np.int64))
    return index, time.perf_counter() - t0


FILTER_CASES = [("none", [], 1.0), ("0.1%", ["body_part=knee"], 0.001), ("10%", ["view=LAT"], 0.1),
                ("50%", ["modality=CT"], 0.5), ("100%", ["source=archive"], 1.0)]


def _metadata(i: int) -> dict:
    """Columns whose values split the rows 0.1% / 10% / 50% / 100% (see FILTER_CASES)."""
    return {"modality": "CT" if i % 2 else "X-ray", "view": "LAT" if i % 10 == 3 else "PA",
            "body_part": "knee" if i % 1000 == 7 else "chest", "source": "archive"}


def make_data_dir(path: Path, n: int, index: faiss.Index, factory: str, nprobe: int | None) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    db = open_db(default_db_url(path))
    rows = [{"id": i, "path": f"/archive/img{i:07d}.png", "content_hash": f"{i:064x}", "size_bytes": 1000,
             "mtime_ns": 0, "width": 1024, "height": 1024, "format": "PNG", **_metadata(i)}
            for i in range(1, n + 1)]
    with Session(db) as s, s.begin():
        for start in range(0, n, 50_000):
            s.execute(insert(ImageRow), rows[start : start + 50_000])
        s.add(Generation(id=1, model="bench", adapter_hash=None, dim=DIM, active=True, next_revision=2,
                         index_type=factory))
    db.dispose()
    write_index_atomic(path, index, IndexMeta(generation=1, revision=1, count=n, factory=factory, nprobe=nprobe))


def latency(engine, queries: list, filters=None, search=None) -> tuple[float, float]:
    """p50/p95 ms of `search(query)` (default: `engine.text`) over the queries."""
    search = search or (lambda q: engine.text(q, k=10, filters=filters))
    times = []
    for q in queries:
        t0 = time.perf_counter()
        hits = search(q)
        times.append((time.perf_counter() - t0) * 1000)
        assert len(hits) == 10
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def filter_rows(engine, encoder, n: int, vectors: np.ndarray, probe: np.ndarray, queries: list[str],
                factory: str) -> list[list]:
    """One row per FILTER_CASES entry: latencies, cold first query, plan and recall@10 (see --filters)."""
    from search.knn import candidate_rounds

    state = engine.state()
    latency(engine, queries)  # warm-up: page cache, allocator, text tower
    latency(engine, list(probe), search=lambda v: engine.search_vector(v, k=10))
    rows, base = [], None
    ids = np.arange(1, n + 1)
    meta = {key: np.array([_metadata(i)[key] for i in ids]) for key in ("modality", "view", "body_part")}
    for name, expressions, _share in FILTER_CASES:
        filters = engine.parse_filters(expressions) if expressions else None
        t0 = time.perf_counter()
        engine.search_vector(probe[0], k=10, filters=filters)  # the first query also fetches the selection
        cold = (time.perf_counter() - t0) * 1000
        text_p50, text_p95 = latency(engine, queries, filters)
        search_p50, search_p95 = latency(engine, list(probe), search=lambda v, f=filters: engine.search_vector(
            v, k=10, filters=f))
        allowed = np.ones(n, dtype=bool)
        for expr in expressions:
            key, value = expr.split("=")
            if key in meta:
                allowed &= meta[key] == value
        selection = engine.selection(filters) if filters else None
        plan = candidate_rounds(state.index, state.scorer, probe[0], 10, selection)[0]
        allowed_ids, allowed_vectors = ids[allowed], vectors[allowed]
        truth = [allowed_ids[np.argsort(-(allowed_vectors @ q))[:10]] for q in probe[:20]]
        del allowed_vectors
        found = [[h.id for h in engine.search_vector(q, k=10, filters=filters)] for q in probe[:20]]
        recall = recall_at_k(np.array(found), np.array(truth), 10)
        base = base or search_p50
        rows.append([n, factory, name, int(allowed.sum()), plan, text_p50, text_p95, search_p50, search_p95,
                     search_p50 / base, cold, recall])
    return rows


FILTER_HEADERS = ["vectors", "index", "filter", "allowed", "plan", "text p50", "text p95", "search p50",
                  "search p95", "x unfiltered", "cold ms", "recall@10"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("bench-out/query"))
    parser.add_argument("--filters", action="store_true", help="filtered queries on the approximate index")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_kind()}")  # every speed figure names the machine kind it was measured on
    from cxrmodel.model.encoder import EncoderConfig, load_encoder
    from search.engine import Engine, EngineConfig

    encoder = load_encoder(EncoderConfig(model=str(vit_b32_dir(args.out.parent / "indexing" / "vit-b32"))))
    queries = [f"{q} {i}" if i else q for i in range(args.queries // len(QUERIES) + 1) for q in QUERIES][: args.queries]
    encoder.encode_texts(QUERIES[:4])  # warm-up
    t0 = time.perf_counter()
    encoder.encode_texts(QUERIES)
    encode_ms = (time.perf_counter() - t0) * 1000 / len(QUERIES)
    print(f"text encode alone: {encode_ms:.1f} ms/query (ViT-B/32 text tower, {encoder.dtype})")
    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.filters:
        sizes = [max(sizes)] if args.sizes != parser.get_default("sizes") else [1_000_000]
    for n in sizes:
        everything = clustered_vectors(n + 200, seed=1)
        vectors, probe = everything[:n], everything[n:]  # probes: same distribution, not indexed
        results = {}
        kinds = (("exact", "Flat"), ("approx", choose_factory(n, IndexConfig(index_type="IVF"))))
        for label, factory in kinds[1:] if args.filters else kinds:
            index, build_s = build(vectors, factory)
            nprobe = None
            if factory.startswith("IVF"):  # as `radlens index` does: tune on a sample of stored vectors
                t0 = time.perf_counter()
                nprobe, _ = tune_nprobe(index, vectors[:: max(1, n // 200)][:200])
                build_s += time.perf_counter() - t0
                factory = f"{factory} nprobe={nprobe}"
            ram = len(faiss.serialize_index(index)) / n
            data = args.out / f"data-{n}-{label}"
            make_data_dir(data, n, index, factory.split()[0], nprobe)
            engine = Engine.open(EngineConfig(data_dir=data), encoder=encoder)
            if args.filters:
                rows += filter_rows(engine, encoder, n, vectors, probe[:args.queries], queries, factory)
                print(table(FILTER_HEADERS, rows))
                engine.close()
                shutil.rmtree(data)
                continue
            _, found = engine.state().index.search(probe, 10)
            results[label] = found
            p50, p95 = latency(engine, queries)
            engine.close()
            del index
            recall = 1.0 if label == "exact" else recall_at_k(found, results["exact"], 10)
            rows.append([n, factory, p50, p95, recall, ram, build_s])
            shutil.rmtree(data)
        if not args.filters:
            print(table(["vectors", "index", "p50 ms", "p95 ms", "recall@10", "bytes/vector", "build s"], rows[-2:]))
    if args.filters:
        return 0
    print()
    print(table(["vectors", "index", "p50 ms", "p95 ms", "recall@10", "bytes/vector", "build s"], rows))
    for n in sorted({r[0] for r in rows}):
        exact, approx = [r for r in rows if r[0] == n]
        print(f"{n:>9,} vectors: approximate p50 is {exact[2] / approx[2]:.1f}x faster than exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
