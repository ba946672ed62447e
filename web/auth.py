"""Who may use a server started with an API token (`RADLENS_API_TOKEN`).

API clients send `Authorization: Bearer TOKEN`, and only there: a token in a URL ends up in access
logs and browser history. Browsers log in once on `/login`, which sets an HttpOnly, SameSite=Strict
cookie holding a value derived from the token (HMAC-SHA256), so the pages and their downloads work
while the token itself never travels again and never sits in the browser.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlparse

from flask import Blueprint, current_app, redirect, render_template, request

SESSION_COOKIE = "radlens_session"
auth = Blueprint("auth", __name__)


def session_value(token: str) -> str:
    """The cookie value a browser holds after logging in with `token`."""
    return hmac.new(token.encode(), b"radlens browser session v1", hashlib.sha256).hexdigest()


def authorized(token: str | None) -> bool:
    """True when no token is configured, or this request carries the token (header) or its session cookie."""
    if not token:
        return True
    auth_header = request.headers.get("Authorization", "")
    if auth_header.lower().startswith("bearer ") and hmac.compare_digest(auth_header[7:].strip().encode(),
                                                                       token.encode()):
        return True
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), session_value(token).encode())


def _safe_next(target: str | None) -> str:
    """Only a path on this server (never another site) to return to after logging in."""
    parsed = urlparse(target or "/")
    return target if target and not parsed.scheme and not parsed.netloc and target.startswith("/") else "/"


@auth.route("/login", methods=["GET", "POST"])
def login():
    token = current_app.extensions["radlens_config"].api_token
    target = _safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template("login.html", next=target, error=None)
    given = request.form.get("token", "")
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        return render_template("login.html", next=target, error="wrong token"), 401
    response = redirect(target, code=303)
    response.set_cookie(SESSION_COOKIE, session_value(token), httponly=True, samesite="Strict",
                        secure=request.is_secure)
    return response


@auth.post("/logout")
def logout():
    response = redirect("/login", code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response
