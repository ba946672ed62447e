"""`radlens serve`: the web app on a production WSGI server.

One process (waitress, threads) by default; `--workers N` runs N processes under gunicorn (POSIX,
`pip install 'radlens[serve]'`). Each worker opens its own engine: DB connections of its own, the
FAISS index memory-mapped read-only (so the workers share one copy in the page cache), and each
switches to a new index generation by itself, without a restart.
"""

from __future__ import annotations

from cxrmodel.errors import DataError

from .common import add_data_dir, positive_float, positive_int, tcp_port


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the web app and JSON API",
                       description="Serve search pages and the JSON API (waitress; gunicorn with --workers N).")
    add_data_dir(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=tcp_port, default=8000, help="port (default 8000)")
    p.add_argument("--threads", type=positive_int, default=8, help="threads per process")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="server processes (more than 1 needs gunicorn: pip install 'radlens[serve]')")
    p.add_argument("--model", default=None, help="override the model the index was built with")
    p.add_argument("--labels", default=None, help="JSON file overriding prompts, weights and thresholds")
    p.add_argument("--calibration", default=None,
                   help="calibration.json of the model (default: the model directory's own, if it has one)")
    p.add_argument("--max-upload-mb", type=positive_float, default=32.0, help="largest accepted upload")
    p.add_argument("--heavy-requests", type=positive_int, default=None,
                   help="requests that decode or label a whole image at once, per process (default 2); more "
                        "wait, then get 503 + Retry-After")
    p.set_defaults(run=run)


def build_app(args):
    """Open the engine and wrap it in the Flask app (once per server process)."""
    from search.engine import Engine, EngineConfig
    from web import ServeConfig, create_app
    from web.limits import return_large_buffers_to_the_os

    return_large_buffers_to_the_os()
    engine = Engine.open(EngineConfig(data_dir=args.data_dir, db_url=args.db_url, model=args.model,
                                      labels_file=args.labels, calibration=args.calibration))
    limits = {"heavy_requests": args.heavy_requests} if args.heavy_requests else {}
    return create_app(ServeConfig(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), **limits), engine=engine)


def run(args) -> int:
    if args.workers > 1:
        return _run_gunicorn(args)
    app = build_app(args)
    from waitress import serve

    print(f"RadLens serving {args.data_dir} at http://{args.host}:{args.port}/", flush=True)
    serve(app, host=args.host, port=args.port, threads=args.threads, ident="radlens")
    return 0


def _run_gunicorn(args) -> int:
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError:
        raise DataError("--workers needs gunicorn: pip install 'radlens[serve]' (or run one process without "
                        "--workers)") from None
    from search.engine import Engine, EngineConfig

    # Fail here, once, with a clear message, rather than in every worker.
    Engine.check_openable(EngineConfig(data_dir=args.data_dir, db_url=args.db_url))

    class RadLensServer(BaseApplication):
        def load_config(self):
            for key, value in {"bind": f"{args.host}:{args.port}", "workers": args.workers,
                               "threads": args.threads, "worker_class": "gthread", "preload_app": False,
                               "timeout": 120, "accesslog": None, "proc_name": "radlens"}.items():
                self.cfg.set(key, value)

        def load(self):
            return build_app(args)

    print(f"RadLens serving {args.data_dir} at http://{args.host}:{args.port}/ with {args.workers} workers",
          flush=True)
    RadLensServer().run()
    return 0
