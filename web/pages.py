"""HTML pages blueprint: search grid, upload (similar cases + labels), per-image page."""

from __future__ import annotations

import base64
import io

from flask import Blueprint, render_template, request

from cxrmodel.errors import RadLensError
from cxrmodel.report import compose_report, to_markdown

from . import HTTPError, status_for
from .context import engine, id_labels, k_param, read_upload, threshold_param

pages = Blueprint("pages", __name__)


@pages.get("/")
def index():
    query = (request.args.get("q") or "").strip()
    filters = [f for f in request.args.getlist("filter") if f.strip()]
    hits, error = [], None
    if query:
        try:
            hits = engine().text(query, k=k_param(request.args.get("k")), filters=engine().parse_filters(filters))
        except RadLensError as exc:
            error = str(exc)
    return render_template("search.html", query=query, filters=filters, hits=hits, error=error,
                           stats=engine().stats()), (400 if error else 200)


@pages.route("/upload", methods=["GET", "POST"])
def upload():
    if request.method == "GET":
        return render_template("upload.html", result=None, error=None)
    try:
        image = read_upload()
        k = k_param(request.form.get("k"))
        threshold = threshold_param(request.form.get("threshold"))
    except HTTPError as exc:
        return render_template("upload.html", result=None, error=exc.message), exc.status
    except RadLensError as exc:
        return render_template("upload.html", result=None, error=str(exc)), status_for(exc)
    eng = engine()
    hits = eng.image(image, k=k)
    scores = eng.label(image)
    report = compose_report(scores, {**image.metadata, "width": image.width, "height": image.height},
                            eng.labels, threshold)
    preview = image.image.copy()
    preview.thumbnail((384, 384))
    buf = io.BytesIO()
    preview.save(buf, format="PNG")
    result = {"hits": hits, "scores": scores, "report": report, "report_md": to_markdown(report),
              "preview": base64.b64encode(buf.getvalue()).decode()}
    return render_template("upload.html", result=result, error=None)


@pages.get("/image/<int:image_id>")
def image_page(image_id: int):
    threshold = threshold_param(request.args.get("threshold"))
    meta, scores, report = id_labels(image_id, threshold)
    return render_template("image.html", meta=meta, scores=scores, report=report, report_md=to_markdown(report),
                           threshold=threshold)
