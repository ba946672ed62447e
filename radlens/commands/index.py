"""`radlens index`: build or update an index from folders and manifests."""

from __future__ import annotations

from pathlib import Path

from .common import add_data_dir, add_model, encoder_config, non_negative_int, positive_int, probability


def register(sub) -> None:
    p = sub.add_parser("index", help="index images (folders, DICOM, CSV/JSONL manifests)",
                       description="Embed images into the index: incremental by content hash, crash-safe.")
    p.add_argument("sources", nargs="+", metavar="SRC", help="folder (recursive), image file, or manifest .csv/.jsonl")
    add_data_dir(p)
    add_model(p)
    p.add_argument("--rebuild", action="store_true",
                   help="re-embed everything into a new index, swapped in when complete (needed after a model change)")
    p.add_argument("--prune", action="store_true", help="remove rows and vectors of files that no longer exist")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="decode processes (default: 0 for a CPU model, which then decodes in turns with the "
                        "model on every core; cores - 1 for a GPU model)")
    p.add_argument("--decode", default="auto", metavar="PLAN",
                   help="with decoding in this process (--workers 0, a CPU model's default): auto (a run of 4096 "
                        "files or more measures the plans below for a few batches each and keeps the fastest; "
                        "smaller runs decode in turns), turns (a batch decoded on every core, then the model on "
                        "its threads), ahead (the next batch decoded while the model runs), or ahead:D:M (D "
                        "decode threads, the model on M threads)")
    p.add_argument("--chunk-size", type=positive_int, default=256, help="images committed per transaction")
    p.add_argument("--index-type", default="auto",
                   help="auto (exact below --exact-below vectors, IVF above, IVFPQ from --compress-above), Flat, IVF, "
                        "IVFPQ or a faiss factory string")
    p.add_argument("--exact-below", type=positive_int, default=100_000, help="auto's switch to an approximate index")
    p.add_argument("--compress-above", type=positive_int, default=5_000_000,
                   help="auto's switch to IVFPQ (PQ codes on disk + fp16 re-ranking)")
    p.add_argument("--nlist", type=positive_int, default=None, help="IVFPQ: lists (default ~sqrt(N))")
    p.add_argument("--pq-bytes", type=positive_int, default=None, help="IVFPQ: code bytes per vector (default dim/8)")
    p.add_argument("--nprobe", type=positive_int, default=None,
                   help="IVF/IVFPQ: lists probed per query (default: tuned to --target-recall)")
    p.add_argument("--rerank-depth", type=positive_int, default=None,
                   help="IVFPQ: candidates re-scored exactly per query (default: tuned)")
    p.add_argument("--target-recall", type=probability, default=0.95, help="recall@10 the tuning aims for")
    p.add_argument("--shards", type=positive_int, default=2, help="IVFPQ: shards filled in parallel processes")
    p.add_argument("--labels", default=None, help="JSON file overriding prompts, weights and thresholds")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: decode processes + one model here; ray: decode tasks and embedding actors on Ray "
                        "(pip install 'radlens[ray]')")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (host:port or auto; default: a local Ray)")
    p.add_argument("--ray-actors", type=positive_int, default=1, help="embedding actors (one model each)")
    p.add_argument("--ray-gpus-per-actor", type=float, default=0.0, help="GPUs per embedding actor")
    p.add_argument("--ray-slice", type=positive_int, default=200_000,
                   help="files per Ray dataset: the plan runs in slices, so the driver never holds it all")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-query-tower", action="store_true",
                   help="do not export the text tower to ONNX beside the index (text queries then load torch)")
    p.set_defaults(run=run)


def index_config(args):
    """IndexConfig from the flags (choice of index, and the compressed index's overrides)."""
    from indexer.compressed import CompressedParams
    from indexer.vectors import IndexConfig

    return IndexConfig(index_type=args.index_type, exact_below=args.exact_below, compress_above=args.compress_above,
                       nprobe=args.nprobe, target_recall=args.target_recall,
                       compressed=CompressedParams(nlist=args.nlist, pq_bytes=args.pq_bytes, depth=args.rerank_depth,
                                                   shards=args.shards))


def run(args) -> int:
    from cxrmodel.errors import DataError
    from cxrmodel.labels.prompts import load_label_config
    from cxrmodel.model.encoder import load_encoder
    from indexer.pipeline import IndexJob, run_index
    from indexer.prepare import available_cores
    from indexer.schedule import ScheduleConfig, parse_plan
    from indexer.sources import check_sources

    ray = None
    if args.engine == "ray":
        from indexer.ray_engine import RayConfig, require_ray

        require_ray()  # before the slow model load
        ray = RayConfig(address=args.ray_address, actors=args.ray_actors, gpus_per_actor=args.ray_gpus_per_actor,
                        plan_slice=args.ray_slice)

    check_sources(args.sources)  # a wrong path or an unreachable archive fails before the slow model load
    fixed_plan = parse_plan(args.decode, available_cores())  # so does a misspelt --decode
    if args.workers and fixed_plan is not None:
        raise DataError(f"--decode {args.decode} plans decoding in this process; with --workers {args.workers} files "
                        "are decoded in worker processes instead. Use one of the two.")
    job = IndexJob(sources=args.sources, data_dir=Path(args.data_dir), db_url=args.db_url, rebuild=args.rebuild,
                   prune=args.prune, workers=args.workers, decode=ScheduleConfig(plan=args.decode),
                   chunk_size=args.chunk_size, index=index_config(args),
                   labels=load_label_config(args.labels),  # a bad file fails before the slow model load
                   progress=not args.no_progress, engine=args.engine, ray=ray,
                   query_tower=not args.no_query_tower)
    encoder = load_encoder(encoder_config(args))
    summary = run_index(job, encoder)
    print(summary.line())
    for line in (summary.image_backend, summary.decode_plan, summary.query_tower):
        if line:
            print(line)
    _print_skipped(job)
    return 0


def _print_skipped(job) -> None:
    """Which files are skipped now and why (first few; `radlens check --skipped` lists all), on stderr."""
    import sys

    from indexer.skipped import summary_lines
    from indexer.store import open_db

    db = open_db(job.url)
    try:
        for line in summary_lines(db):
            print(line, file=sys.stderr)
    finally:
        db.dispose()
