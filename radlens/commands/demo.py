"""`radlens demo`: the whole job offline -- index the bundled samples with radlens-mini, answer a text
query, a similar-case query and a labelled report, then serve the web app."""

from __future__ import annotations

import csv
from pathlib import Path

from cxrmodel.errors import DataError

from .common import tcp_port

DEMO_QUERY = "lateral chest radiograph"
SAMPLES = Path(__file__).resolve().parents[1] / "samples"  # package data: a wheel install has them too


def register(sub) -> None:
    p = sub.add_parser("demo", help="index the bundled samples with the offline model and try every feature",
                       description="Offline first run: index the bundled samples (radlens/samples) with "
                                   "radlens-mini (once), print a text search, a similar-case search and a report, "
                                   "then serve the web app.")
    p.add_argument("--data-dir", type=Path, default=Path("radlens-demo"), help="where the demo index lives")
    p.add_argument("--samples", type=Path, default=SAMPLES, help="sample folder with manifest.csv")
    p.add_argument("--model", default="radlens-mini", help="model to demo (default: the bundled radlens-mini)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=tcp_port, default=8000)
    p.add_argument("--no-serve", action="store_true", help="print the answers and exit")
    p.set_defaults(run=run)


def _first(manifest: Path, **wanted) -> Path:
    with open(manifest, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if all(row.get(k) == v for k, v in wanted.items()):
                return manifest.parent / row["file"]
    raise DataError(f"{manifest} has no row with {wanted}")


def run(args) -> int:
    from cxrmodel.model.encoder import EncoderConfig, load_encoder
    from cxrmodel.reporting.report import to_markdown
    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig

    manifest = args.samples / "manifest.csv"
    if not manifest.exists():
        raise DataError(f"no sample images at {args.samples} (run from a RadLens checkout or pass --samples)")
    encoder = load_encoder(EncoderConfig(model=args.model))
    summary = run_index(IndexJob(sources=[str(manifest)], data_dir=args.data_dir, workers=0, progress=False),
                        encoder)
    print(f"== index: {summary.line()}")
    engine = Engine.open(EngineConfig(data_dir=args.data_dir), encoder=encoder)

    print(f"\n== text search: {DEMO_QUERY!r}")
    for rank, hit in enumerate(engine.text(DEMO_QUERY, k=5), 1):
        img = hit.image
        print(f"{rank:>3}. {hit.score:.3f}  {img['file_name']:<28} {img['modality']} {img['view'] or ''}")

    query_image = _first(manifest, modality="CT", view="axial")
    print(f"\n== similar cases to {query_image.name} (CT, axial)")
    for rank, hit in enumerate(engine.image(engine.decode_upload(query_image.read_bytes(), query_image.name), k=5), 1):
        img = hit.image
        print(f"{rank:>3}. {hit.score:.3f}  {img['file_name']:<28} {img['modality']} {img['view'] or ''}")

    cxr = _first(manifest, modality="X-ray", view="PA")
    image = engine.decode_upload(cxr.read_bytes(), cxr.name)
    report = engine.report(image, {"modality": "X-ray", "body_part": "chest", "view": "PA", "file_name": cxr.name})
    print(f"\n== applicability: {report.applicability}")
    print(f"\n== report for {cxr.name}\n")
    print(to_markdown(report))
    if args.no_serve:
        return 0
    from waitress import serve

    from web import ServeConfig, create_app

    app = create_app(ServeConfig(), engine=engine)
    print(f"RadLens demo at http://{args.host}:{args.port}/  (Ctrl-C to stop)", flush=True)
    serve(app, host=args.host, port=args.port, threads=8, ident="radlens")
    return 0
