"""Flask app factory: pages and JSON API over one `search.Engine`.

`create_app(ServeConfig(...), engine=Engine.open(...))`. The engine is attached to the app once
(`app.extensions["radlens"]`), never imported as a global. Every error is JSON under /api and a
short page elsewhere -- never a traceback.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

from cxrmodel.errors import ImageTooLargeError, NotFoundError, RadLensError, UnsupportedImageError

log = logging.getLogger(__name__)

TOKEN_ENV = "RADLENS_API_TOKEN"
OPEN_ENDPOINTS = {"api.health", "static", "auth.login", "auth.logout"}


@dataclass
class ServeConfig:
    """How the web app behaves."""

    max_upload_bytes: int = field(default=32 * 1024 * 1024, metadata={"help": "Largest accepted upload."})
    api_token: str | None = field(default_factory=lambda: os.environ.get(TOKEN_ENV) or None,
                                  metadata={"help": "When set, every route but health requires it."})
    thumbnail_size: int = 256
    heavy_requests: int = field(default=2, metadata={
        "help": "Requests that decode or label a whole image at once (per process); more wait, then get 503."})
    heavy_wait_seconds: float = field(default=30.0, metadata={"help": "How long a heavy request waits for a slot."})
    retry_after_seconds: int = 5
    default_k: int = 12
    max_k: int = 100


class ImageIdConverter(IntegerConverter):
    """`<image_id:...>`: a non-negative 64-bit id; a larger number matches no route (404), never a 500."""

    def __init__(self, url_map):
        super().__init__(url_map, max=2**63 - 1)


class HTTPError(Exception):
    """An error with an HTTP status and a message for the user."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


STATUS_BY_ERROR = ((NotFoundError, 404), (ImageTooLargeError, 413), (UnsupportedImageError, 415))


def status_for(exc: RadLensError) -> int:
    """HTTP status of a user-fixable error, from its type (most specific first); 400 otherwise."""
    return next((status for kind, status in STATUS_BY_ERROR if isinstance(exc, kind)), 400)


def create_app(config: ServeConfig | None = None, engine=None) -> Flask:
    """Build the Flask app around an opened `search.Engine`."""
    from . import limits
    from .api import api
    from .auth import auth, authorized
    from .pages import pages

    config = config or ServeConfig()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes
    app.extensions["radlens"] = engine
    app.extensions["radlens_config"] = config
    app.url_map.converters["image_id"] = ImageIdConverter
    limits.install(app, config.heavy_requests)
    app.register_blueprint(api)
    app.register_blueprint(pages)
    app.register_blueprint(auth)

    @app.before_request
    def require_token():
        if request.endpoint in OPEN_ENDPOINTS or authorized(config.api_token):
            return None
        if not request.path.startswith("/api/") and request.accept_mimetypes.best != "application/json":
            return render_template("login.html", next=request.full_path.rstrip("?"), error=None), 401
        return _error(401, "missing or wrong API token (send 'Authorization: Bearer TOKEN')")

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    @app.errorhandler(HTTPError)
    def on_http_error(exc: HTTPError):
        body, status = _error(exc.status, exc.message)
        return body, status, exc.headers

    @app.errorhandler(RadLensError)
    def on_user_error(exc: RadLensError):
        return _error(status_for(exc), str(exc))

    @app.errorhandler(HTTPException)
    def on_werkzeug(exc: HTTPException):
        if exc.code == 413:  # the request body passed MAX_CONTENT_LENGTH before any view ran
            from .context import upload_limit_message

            if request.path == "/upload":  # keep the form: the user picks another file
                return render_template("upload.html", result=None, error=upload_limit_message()), 413
            return _error(413, upload_limit_message())
        body, status = _error(exc.code or 500, exc.description or exc.name)
        allow = [(k, v) for k, v in exc.get_headers() if k.lower() == "allow"]  # a 405 names what is allowed
        return body, status, allow

    @app.errorhandler(Exception)
    def on_unexpected(exc: Exception):
        log.exception("unexpected error on %s", request.path)
        return _error(500, "internal error; see the server log")

    return app


def _error(status: int, message: str):
    if request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json":
        return jsonify({"error": message, "status": status}), status
    return render_template("error.html", status=status, message=message), status
