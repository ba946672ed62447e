"""Query latency at scale: text encode + search + DB fetch, exact vs approximate, 10k / 100k / 1M vectors.

    python -m bench.query [--sizes 10000,100000,1000000] [--queries 60] [--out bench-out/query]

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

from bench.common import table
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


def make_data_dir(path: Path, n: int, index: faiss.Index, factory: str, nprobe: int | None) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    db = open_db(default_db_url(path))
    rows = [{"id": i, "path": f"/archive/img{i:07d}.png", "content_hash": f"{i:064x}", "size_bytes": 1000,
             "mtime_ns": 0, "width": 1024, "height": 1024, "format": "PNG", "modality": "X-ray"}
            for i in range(1, n + 1)]
    with Session(db) as s, s.begin():
        for start in range(0, n, 50_000):
            s.execute(insert(ImageRow), rows[start : start + 50_000])
        s.add(Generation(id=1, model="bench", adapter_hash=None, dim=DIM, active=True, next_revision=2,
                         index_type=factory))
    db.dispose()
    write_index_atomic(path, index, IndexMeta(generation=1, revision=1, count=n, factory=factory, nprobe=nprobe))


def latency(engine, queries: list[str]) -> tuple[float, float]:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        hits = engine.text(q, k=10)
        times.append((time.perf_counter() - t0) * 1000)
        assert len(hits) == 10
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("bench-out/query"))
    args = parser.parse_args(argv)
    from cxrmodel.encoder import EncoderConfig, load_encoder
    from search.engine import Engine, EngineConfig

    encoder = load_encoder(EncoderConfig(model=str(vit_b32_dir(args.out.parent / "indexing" / "vit-b32"))))
    queries = [f"{q} {i}" if i else q for i in range(args.queries // len(QUERIES) + 1) for q in QUERIES][: args.queries]
    encoder.encode_texts(QUERIES[:4])  # warm-up
    t0 = time.perf_counter()
    encoder.encode_texts(QUERIES)
    encode_ms = (time.perf_counter() - t0) * 1000 / len(QUERIES)
    print(f"text encode alone: {encode_ms:.1f} ms/query (ViT-B/32 text tower, {encoder.dtype})")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        everything = clustered_vectors(n + 200, seed=1)
        vectors, probe = everything[:n], everything[n:]  # probes: same distribution, not indexed
        results = {}
        for label, factory in (("exact", "Flat"), ("approx", choose_factory(n, IndexConfig(index_type="IVF")))):
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
            _, found = engine._refresh().index.search(probe, 10)
            results[label] = found
            p50, p95 = latency(engine, queries)
            engine.close()
            del index
            recall = 1.0 if label == "exact" else recall_at_k(found, results["exact"], 10)
            rows.append([n, factory, p50, p95, recall, ram, build_s])
            shutil.rmtree(data)
        print(table(["vectors", "index", "p50 ms", "p95 ms", "recall@10", "bytes/vector", "build s"], rows[-2:]))
    print()
    print(table(["vectors", "index", "p50 ms", "p95 ms", "recall@10", "bytes/vector", "build s"], rows))
    for n in sorted({r[0] for r in rows}):
        exact, approx = [r for r in rows if r[0] == n]
        print(f"{n:>9,} vectors: approximate p50 is {exact[2] / approx[2]:.1f}x faster than exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
