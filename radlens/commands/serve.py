"""`radlens serve`: the web app on a production WSGI server (waitress)."""

from __future__ import annotations

from .common import add_data_dir


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the web app and JSON API",
                       description="Serve search pages and the JSON API with waitress.")
    add_data_dir(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--threads", type=int, default=8, help="worker threads")
    p.add_argument("--model", default=None, help="override the model the index was built with")
    p.add_argument("--labels", default=None, help="JSON file overriding prompts, weights and thresholds")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest accepted upload")
    p.set_defaults(run=run)


def run(args) -> int:
    from search.engine import Engine, EngineConfig
    from web import ServeConfig, create_app

    engine = Engine.open(EngineConfig(data_dir=args.data_dir, db_url=args.db_url, model=args.model,
                                      labels_file=args.labels))
    app = create_app(ServeConfig(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024)), engine=engine)
    from waitress import serve

    print(f"RadLens serving {args.data_dir} at http://{args.host}:{args.port}/", flush=True)
    serve(app, host=args.host, port=args.port, threads=args.threads, ident="radlens")
    return 0
