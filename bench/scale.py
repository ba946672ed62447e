"""Scale benchmark: a compressed (IVF-PQ + fp16 re-rank) index over millions of synthetic vectors.

    python -m bench.scale --n 10000000          # the issue's figure (about 25 min and 12 GB of disk here)
    python -m bench.scale --n 200000            # a quick look

Vectors are clustered, not uniform: 100 broad groups, each with 100 tighter clusters, and unit
vectors scattered around those 10,000 centres, generated in seeded chunks so they can be streamed
twice without being held in RAM. 1,000 queries are drawn from the same distribution (not from the
index); their exact top-10 comes from streaming brute force over the fp32 vectors. The index is
built with `indexer.compressed.build` (the code `radlens index` uses): trained on a sample, filled in
parallel shards, merged on disk. A fresh process then maps it as a server would, tunes nprobe and
re-rank depth on 200 of the queries, and measures the other 800 one at a time: recall@10 vs exact,
p50/p95 latency, resident memory per vector (anonymous, and file pages it touched), and disk use.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import cpu_kind, table
from indexer import compressed as C

CHUNK = 250_000


def centres(dim: int, groups: int, per_group: int, seed: int) -> np.ndarray:
    """groups x per_group unit cluster centres; those of one group share a direction."""
    rng = np.random.default_rng(seed)
    broad = _unit(rng.standard_normal((groups, dim)))
    fine = broad[:, None, :] + 0.6 * _unit(rng.standard_normal((groups, per_group, dim)))
    return _unit(fine.reshape(-1, dim)).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered(centre: np.ndarray, n: int, seed: int, spread: float = 0.8) -> np.ndarray:
    """n unit vectors around random centres (`spread` = noise norm relative to the centre's)."""
    rng = np.random.default_rng(seed)
    dim = centre.shape[1]
    x = centre[rng.integers(0, len(centre), n)] + spread / np.sqrt(dim) * rng.standard_normal((n, dim),
                                                                                              dtype=np.float32)
    return _unit(x).astype(np.float32)


def corpus_chunks(centre: np.ndarray, n: int, seed: int):
    """(ids, vectors) chunks of the whole synthetic corpus, the same on every call."""
    for c, lo in enumerate(range(0, n, CHUNK)):
        hi = min(n, lo + CHUNK)
        yield np.arange(lo, hi, dtype=np.int64), clustered(centre, hi - lo, seed=seed * 100_003 + c)


def exact_top10(centre: np.ndarray, n: int, seed: int, queries: np.ndarray) -> np.ndarray:
    """Exact top-10 ids of each query over the fp32 corpus, by streaming brute force."""
    return C.exact_top_k(queries, corpus_chunks(centre, n, seed), 10)


def memory_status() -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of this process in bytes (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def serve_and_measure(work: Path, target: float) -> dict:
    """In a fresh process: map the index, tune on 200 queries, measure the other 800 one by one."""
    meta = json.loads((work / "build.json").read_text())
    before = memory_status()
    index = C.RerankedIndex.open(work / "scale.faiss", work / "scale", nprobe=8, depth=100)
    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    nprobe, depth, tuned_recall = C.tune(index, queries[:200], truth[:200], target)
    times, found = [], []
    for q in queries[200:]:
        t = time.perf_counter()
        _, ids = index.search(q[None], 10)
        times.append(time.perf_counter() - t)
        found.append(ids[0])
    after = memory_status()
    n = meta["n"]
    return {"nprobe": nprobe, "depth": depth, "tuned_recall": tuned_recall,
            "recall": C.recall_at_k(np.array(found), truth[200:], 10),
            "p50_ms": 1000 * float(np.median(times)), "p95_ms": 1000 * float(np.percentile(times, 95)),
            "rss_b_per_vector": after["VmRSS"] / n, "anon_b_per_vector": after["RssAnon"] / n,
            "file_b_per_vector": after["RssFile"] / n, "rss_before_open": before["VmRSS"]}


def build(args, work: Path) -> dict:
    """Generate, write fp16 rows, exact truth, build the compressed index; returns timings."""
    centre = centres(args.dim, 100, 100, seed=args.seed)
    out = {"n": args.n, "dim": args.dim}
    t = time.perf_counter()
    C.write_vectors(corpus_chunks(centre, args.n, args.seed), work / "scale", args.dim, args.n)
    out["write_s"] = time.perf_counter() - t
    queries = clustered(centre, args.queries, seed=999_999)
    t = time.perf_counter()
    truth = exact_top10(centre, args.n, args.seed, queries)
    out["exact_s_per_1000_queries"] = (time.perf_counter() - t) * 1000 / args.queries
    np.save(work / "queries.npy", queries)
    np.save(work / "truth.npy", truth)
    factory = C.factory_string(args.dim, args.n, C.CompressedParams())
    params = C.CompressedParams(shards=args.shards, train_sample=max(131_072, 40 * C.default_nlist(args.n)))
    stamps = {}
    t = time.perf_counter()
    C.build(work / "scale", args.dim, args.n, factory, params,
            progress=lambda msg: stamps.setdefault(msg.split()[0], time.perf_counter()))
    done = time.perf_counter()
    out.update(factory=factory, train_s=stamps["filling"] - t, fill_s=stamps["merging"] - stamps["filling"],
               merge_s=done - stamps["merging"], build_s=done - t)
    (work / "build.json").write_text(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/radlens-scale", help="scratch dir (needs ~1.1 KB per vector)")
    p.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    print(f"CPU: {cpu_kind()}")  # every speed figure names the machine kind it was measured on
    work = Path(args.work)
    if args.serve_only:
        print(json.dumps(serve_and_measure(work, args.target_recall)))
        return 0
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    built = build(args, work)
    served = json.loads(subprocess.run([sys.executable, "-m", "bench.scale", "--serve-only", "--work", str(work),
                                        "--target-recall", str(args.target_recall)], check=True,
                                       capture_output=True, text=True).stdout.strip().splitlines()[-1])
    disk = {p.name: p.stat().st_size for p in work.iterdir() if p.name.startswith("scale.")}
    n = args.n
    print(table(["figure", "value"], [
        ["vectors / dim", f"{n:,} / {args.dim} (clustered, 10,000 centres in 100 groups)"],
        ["index", f"{built['factory']} + fp16 re-rank, {args.shards} shards"],
        ["build: write fp16 rows", f"{built['write_s']:.0f} s"],
        ["build: train / fill / merge", f"{built['train_s']:.0f} / {built['fill_s']:.0f} / {built['merge_s']:.0f} s"],
        ["tuned nprobe / depth", f"{served['nprobe']} / {served['depth']} (recall {served['tuned_recall']:.3f} "
                                 "on 200 tuning queries)"],
        ["recall@10 vs exact (800 other queries)", f"{served['recall']:.3f}"],
        ["query p50 / p95 (one at a time)", f"{served['p50_ms']:.1f} / {served['p95_ms']:.1f} ms"],
        ["exact brute force (streamed, batched)", f"{built['exact_s_per_1000_queries']:.0f} ms per query"],
        ["resident RAM per vector", f"{served['rss_b_per_vector']:.0f} B (anonymous {served['anon_b_per_vector']:.0f}"
                                    f" B, mapped file pages {served['file_b_per_vector']:.0f} B)"],
        ["flat fp32 index RAM per vector", f"{4 * args.dim + 8} B"],
        ["on disk per vector", ", ".join(f"{k} {v / n:.0f} B" for k, v in sorted(disk.items()))],
    ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
