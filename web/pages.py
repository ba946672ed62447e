"""HTML pages blueprint: search grid, upload (similar cases + labels), per-image page."""

from __future__ import annotations

import base64
import io

from flask import Blueprint, render_template, request

from cxrmodel.errors import NotFoundError, RadLensError
from cxrmodel.imaging.decode import shrink_to_fit
from cxrmodel.reporting.report import languages, sections

from . import HTTPError, status_for
from .context import engine, id_labels, k_param, lang_param, read_upload, threshold_param, upload_labels
from .limits import heavy

pages = Blueprint("pages", __name__)


@pages.get("/")
def index():
    query = (request.args.get("q") or "").strip()
    filters = [f for f in request.args.getlist("filter") if f.strip()]
    like = request.args.get("like", "").strip()  # "more like this": an indexed image's id
    hits, error, like_meta = [], None, None
    try:
        if like:
            if not like.isdigit() or (like_meta := engine().get(int(like))) is None:
                raise NotFoundError(f"no indexed image with id {like!r}")
            hits = engine().similar_to(int(like), k=k_param(request.args.get("k")),
                                       filters=engine().parse_filters(filters))
        elif query:
            hits = engine().text(query, k=k_param(request.args.get("k")), filters=engine().parse_filters(filters))
    except (RadLensError, HTTPError) as exc:
        error = exc.message if isinstance(exc, HTTPError) else str(exc)
    return render_template("search.html", query=query, filters=filters, hits=hits, error=error, like=like_meta,
                           stats=engine().stats()), (400 if error else 200)


@pages.route("/upload", methods=["GET", "POST"])
def upload():
    if request.method == "GET":
        return render_template("upload.html", result=None, error=None)
    return _labelled_upload()


@heavy
def _labelled_upload():
    try:
        image = read_upload()
        k = k_param(request.form.get("k"))
        threshold = threshold_param(request.form.get("threshold"))
        lang = lang_param(request.form.get("lang"))
    except HTTPError as exc:
        return render_template("upload.html", result=None, error=exc.message), exc.status
    except RadLensError as exc:
        return render_template("upload.html", result=None, error=str(exc)), status_for(exc)
    state = engine().state()  # one model and index for the whole answer
    vector = engine().embed(image, state)  # one forward pass serves the search and the applicability check
    hits = engine().mark_image_matches(engine().search_vector(vector, k=k, state=state), state)
    scores, report, decision = upload_labels(image, threshold, lang, vector, state)
    preview = shrink_to_fit(image.image, 384)
    buf = io.BytesIO()
    preview.save(buf, format="PNG")
    result = {"hits": hits, "scores": scores, "report": report, "sections": sections(report),
              "decision": decision, "preview": base64.b64encode(buf.getvalue()).decode()}
    return render_template("upload.html", result=result, error=None, languages=languages(), lang=lang)


@pages.get("/image/<image_id:image_id>")
@heavy
def image_page(image_id: int):
    threshold = threshold_param(request.args.get("threshold"))
    lang = lang_param(request.args.get("lang"))
    meta, scores, report, decision = id_labels(image_id, threshold, lang)
    return render_template("image.html", meta=meta, scores=scores, report=report, sections=sections(report),
                           decision=decision, threshold=threshold, lang=lang, languages=languages(),
                           priors=engine().priors(image_id))
