"""HTML pages blueprint: search grid, upload (similar cases + labels), per-image page."""

from __future__ import annotations

import base64
import copy
import io

from flask import Blueprint, render_template, request, url_for

from cxrmodel.errors import NotFoundError, RadLensError
from cxrmodel.imaging.decode import HU_MODALITIES, WINDOW_PRESETS, shrink_to_fit
from cxrmodel.reporting.charts import category_matrix, summary_lines
from cxrmodel.reporting.documents import pdf_context
from cxrmodel.reporting.report import findings_csv, languages, sections, to_markdown, to_pdf
from search.filters import split_filter_text

from . import HTTPError, status_for
from .context import (
    engine,
    id_labels,
    k_param,
    lang_param,
    read_upload,
    stated_metadata,
    threshold_param,
    upload_labels,
    upload_provenance,
)
from .limits import heavy

pages = Blueprint("pages", __name__)


MAX_RESULTS = 1000  # the deepest page reaches this many results (the engine's own cap)


@pages.get("/")
def index():
    query = (request.args.get("q") or "").strip()
    typed = [f for f in request.args.getlist("filter") if f.strip()]
    filters = [part for f in typed for part in split_filter_text(f)]  # several filters in one box
    pathology, at_least = request.args.get("pathology", "").strip(), request.args.get("min", "").strip()
    if pathology and at_least:  # the range control: only pathologies the served model assesses are offered
        filters.append(f"{pathology}>={at_least}")
    like = request.args.get("like", "").strip()  # "more like this": an indexed image's id
    hits, error, like_meta, hint, page, k, more, allowed = [], None, None, None, 1, None, False, None
    try:
        k = k_param(request.args.get("k"))
        page = _page_param(request.args.get("page"), k)
        parsed = engine().parse_filters(filters)
        wanted = k * page  # one ranked list, sliced: the same query gives the same pages
        if like:
            if not like.isdigit() or (like_meta := engine().get(int(like))) is None:
                raise NotFoundError(f"no indexed image with id {like!r}")
            ranked = engine().similar_to(int(like), k=wanted, filters=parsed)
        elif query:
            ranked = engine().text(query, k=wanted, filters=parsed)
        else:
            ranked = []
        hits, more = ranked[(page - 1) * k:], len(ranked) == wanted and wanted < MAX_RESULTS
        if (query or like) and parsed:
            allowed = engine().selection(parsed).count
            if not ranked:
                hint = engine().filter_hint(parsed)
        facets = engine().facets(parsed) if (query or like) else {}
    except (RadLensError, HTTPError) as exc:
        error, facets = (exc.message if isinstance(exc, HTTPError) else str(exc)), {}

    def link(with_filters: list[str]) -> str:  # this search with other filters, from page 1
        return url_for("pages.index", q=query or None, like=like or None, k=k or None,
                       filter=", ".join(with_filters) or None)

    facet_links = {field: [(value, count, link(filters + [f"{field}={value}"]))
                           for value, count in values.items() if f"{field}={value}".lower() not in
                           {f.lower() for f in filters}]
                   for field, values in facets.items()}
    chips = [(f, link([g for g in filters if g != f])) for f in filters]
    return render_template("search.html", query=query, filters=filters, hits=hits, error=error, like=like_meta,
                           hint=hint, page=page, k=k or 12, more=more, allowed=allowed, first=(page - 1) * (k or 0) + 1,
                           facets={f: v for f, v in facet_links.items() if v}, chips=chips,
                           assessed=engine().assessed_pathologies(),
                           stats=engine().stats()), (400 if error else 200)


@pages.get("/compare")
@heavy
def compare():
    """Two indexed images side by side: image, metadata, applicability, findings and impression, and how
    similar their stored embeddings are."""
    try:
        a, b = (int(request.args.get(k, "")) for k in ("a", "b"))
    except ValueError:
        raise HTTPError(400, "compare needs two image ids: /compare?a=ID&b=ID") from None
    lang = lang_param(request.args.get("lang"))
    threshold = threshold_param(request.args.get("threshold"))
    sides = []
    for image_id in (a, b):
        meta, scores, report, decision = id_labels(image_id, threshold, lang)
        sides.append({"meta": meta, "scores": scores, "report": report, "decision": decision,
                      "findings": [s for s in scores if s.assessed and s.probability >= (threshold or s.threshold)]})
    return render_template("compare.html", sides=sides, similarity=engine().similarity(a, b), lang=lang)


def _page_param(value, k: int) -> int:
    """A 1-based page number whose results stay within MAX_RESULTS."""
    try:
        page = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError):
        raise HTTPError(400, "page must be an integer") from None
    last = max(1, MAX_RESULTS // k)
    if not 1 <= page <= last:
        raise HTTPError(400, f"page must be between 1 and {last} at {k} results per page")
    return page


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
    hits = engine().mark_image_matches(engine().search_vector(vector, k=k, state=state), state, query=image)
    scores, report, decision = upload_labels(image, threshold, lang, vector, state, metadata=stated_metadata())
    preview = shrink_to_fit(image.image, 384)
    buf = io.BytesIO()
    preview.save(buf, format="PNG")
    name, digest = upload_provenance()
    context = pdf_context(scores, decision, threshold, lang, image=buf.getvalue(), file_name=name,
                          content_hash=digest, encoder=state.encoder)
    downloads = [("report (PDF)", "report.pdf", "application/pdf", to_pdf(report, context)),
                 ("report (Markdown)", "report.md", "text/markdown", to_markdown(report).encode()),
                 ("findings (CSV)", "findings.csv", "text/csv", findings_csv(scores, threshold).encode())]
    result = {"hits": hits, "scores": scores, "report": report, "sections": sections(report),
              "decision": decision, "preview": base64.b64encode(buf.getvalue()).decode(),
              "downloads": [(label, name, f"data:{mime};base64,{base64.b64encode(data).decode()}")
                            for label, name, mime, data in downloads]}
    return render_template("upload.html", result=result, error=None, languages=languages(), lang=lang)


@pages.get("/image/<image_id:image_id>")
@heavy
def image_page(image_id: int):
    threshold = threshold_param(request.args.get("threshold"))
    lang = lang_param(request.args.get("lang"))
    meta, scores, report, decision = id_labels(image_id, threshold, lang)
    windows = []  # DICOM viewing: the file's own window, the full range, and CT's Hounsfield presets
    if str(meta.get("format") or "").upper() == "DICOM":
        windows = ["file", "full"] + (list(WINDOW_PRESETS) if str(meta.get("modality") or "").upper()
                                      in HU_MODALITIES else [])
    window = request.args.get("window") if request.args.get("window") in windows else None
    shown = [copy.copy(s) for s in scores]  # the summary at the page's threshold; cached scores stay as they are
    for s in shown if threshold is not None else []:
        s.threshold = threshold
    heatmap = category_matrix(scores) if decision.applicable and scores else None
    return render_template("image.html", meta=meta, scores=scores, report=report, sections=sections(report),
                           decision=decision, threshold=threshold, lang=lang, languages=languages(),
                           priors=engine().priors(image_id), windows=windows, window=window,
                           presets=WINDOW_PRESETS, summary_text=summary_lines(shown, decision), heatmap=heatmap)
