"""JSON API blueprint (`/api/...`), mirroring the pages. The contract is in openapi.py."""

from __future__ import annotations

import json
import os

from flask import Blueprint, Response, jsonify, request

from cxrmodel.constants import VERSION
from cxrmodel.reporting.charts import category_heatmap, probability_chart, summary_card
from cxrmodel.reporting.documents import pdf_context
from cxrmodel.reporting.report import findings_csv, to_markdown, to_pdf

from . import HTTPError
from .auth import authorized
from .context import (
    config,
    engine,
    id_labels,
    k_param,
    label_payload,
    lang_param,
    read_upload,
    stated_metadata,
    threshold_param,
    upload_labels,
)
from .limits import heavy
from .openapi import openapi_document

api = Blueprint("api", __name__, url_prefix="/api")


@api.get("/health")
def health():
    """Liveness for anyone; the index's size and model only for callers the server trusts."""
    trusted = authorized(config().api_token)
    response = jsonify({"status": "ok", "version": VERSION, **(engine().stats() if trusted else {})})
    response.headers["X-RadLens-Worker"] = str(os.getpid())  # which server process answered (--workers N)
    return response


@api.get("/openapi.json")
def openapi():
    return jsonify(openapi_document())


def _filters():
    return engine().parse_filters(request.values.getlist("filter"))


def _arg(name: str, form: bool = False) -> str | None:
    """A single-valued parameter of the query string (or form): None when absent; 400 when it is given
    twice or empty (the pages accept a blank form field; an API client that sends one made a mistake)."""
    values = (request.form if form else request.args).getlist(name)
    if len(values) > 1:
        raise HTTPError(400, f"give {name} once (got {len(values)} values)")
    if values and not values[0].strip():
        raise HTTPError(400, f"{name} is empty")
    return values[0] if values else None


@api.get("/search")
def search():
    query = (_arg("q") or "").strip()
    if not query:
        return jsonify({"error": "missing query parameter q", "status": 400}), 400
    k = k_param(_arg("k"))
    filters = _filters()
    hits = engine().text(query, k=k, filters=filters)
    return jsonify({"query": query, "k": k, "filters": request.args.getlist("filter"),
                    "results": [h.to_dict() for h in hits]})


@api.post("/similar")
@heavy
def similar():
    k = k_param(_arg("k", form=True))
    filters = _filters()
    image = read_upload()
    hits = engine().image(image, k=k, filters=filters)
    return jsonify({"k": k, "filters": request.form.getlist("filter"), "results": [h.to_dict() for h in hits]})


@api.post("/label")
@heavy
def label():
    threshold = threshold_param(_arg("threshold", form=True))
    lang = lang_param(_arg("lang", form=True) or _arg("lang"))
    image = read_upload()
    return jsonify(label_payload(*upload_labels(image, threshold, lang, metadata=stated_metadata())))


@api.get("/images/<image_id:image_id>")
def image_metadata(image_id: int):
    meta = engine().get(image_id)
    if meta is None:
        return jsonify({"error": f"no image with id {image_id}", "status": 404}), 404
    return jsonify(meta)


@api.get("/images/<image_id:image_id>/labels")
@heavy
def image_labels(image_id: int):
    _, scores, report, decision = id_labels(image_id, threshold_param(_arg("threshold")), lang_param(_arg("lang")))
    return jsonify(label_payload(scores, report, decision))


@api.get("/images/<image_id:image_id>/similar")
def image_similar(image_id: int):
    """More like this: indexed images similar to an indexed one (its stored embedding; no upload)."""
    k = k_param(_arg("k"))
    hits = engine().similar_to(image_id, k=k, filters=_filters())
    return jsonify({"image_id": image_id, "k": k, "filters": request.args.getlist("filter"),
                    "results": [h.to_dict() for h in hits]})


@api.get("/images/<image_id:image_id>/priors")
def image_priors(image_id: int):
    return jsonify(engine().priors(image_id))


@api.get("/images/<image_id:image_id>/report")
@heavy
def image_report(image_id: int):
    fmt = _arg("format") or "json"
    threshold, lang = threshold_param(_arg("threshold")), lang_param(_arg("lang"))
    meta, scores, report, decision = id_labels(image_id, threshold, lang)
    if fmt == "json":
        return jsonify(report.to_dict())
    if fmt == "md":
        return _download(to_markdown(report).encode(), "text/markdown; charset=utf-8", f"report-{image_id}.md")
    if fmt == "pdf":
        context = pdf_context(scores, decision, threshold, lang, image=engine().thumbnail(image_id, 384),
                              file_name=meta.get("file_name"), content_hash=meta.get("content_hash"),
                              encoder=engine().encoder)
        return _download(to_pdf(report, context), "application/pdf", f"report-{image_id}.pdf")
    return jsonify({"error": "format must be json, md or pdf", "status": 400}), 400


@api.get("/images/<image_id:image_id>/findings.<fmt>")
@heavy
def image_findings(image_id: int, fmt: str):
    threshold = threshold_param(_arg("threshold"))
    _, scores, _, _ = id_labels(image_id, threshold)
    if fmt == "csv":
        return _download(findings_csv(scores, threshold).encode(), "text/csv", f"findings-{image_id}.csv")
    if fmt == "json":
        rows = [{**s.to_dict(), "threshold": threshold if threshold is not None else s.threshold,
                 "positive": s.assessed and s.probability >= (threshold if threshold is not None else s.threshold)}
                for s in scores]
        return _download(json.dumps(rows, indent=2).encode(), "application/json", f"findings-{image_id}.json")
    return jsonify({"error": "format must be csv or json", "status": 400}), 400


@heavy
def _figure(image_id: int, fmt: str, kind: str):
    if fmt not in ("png", "svg"):
        return jsonify({"error": "format must be png or svg", "status": 400}), 400
    threshold = threshold_param(_arg("threshold"))
    _, scores, _, decision = id_labels(image_id, threshold)
    if kind != "summary" and not decision.applicable:
        return jsonify({"error": f"the 14 chest X-ray labels do not apply: {decision.reason}", "status": 404}), 404
    if threshold is not None:
        for s in scores:
            s.threshold = threshold
    draw = {"chart": lambda: probability_chart(scores, fmt, threshold),
            "heatmap": lambda: category_heatmap(scores, fmt),
            "summary": lambda: summary_card(scores, decision, fmt)}[kind]
    mime = "image/png" if fmt == "png" else "image/svg+xml"
    return _download(draw(), mime, f"{kind}-{image_id}.{fmt}", inline=True)


@api.get("/images/<image_id:image_id>/chart.<fmt>")
def image_chart(image_id: int, fmt: str):
    return _figure(image_id, fmt, "chart")


@api.get("/images/<image_id:image_id>/heatmap.<fmt>")
def image_heatmap(image_id: int, fmt: str):
    return _figure(image_id, fmt, "heatmap")


@api.get("/images/<image_id:image_id>/summary.<fmt>")
def image_summary(image_id: int, fmt: str):
    return _figure(image_id, fmt, "summary")


@api.get("/images/<image_id:image_id>/thumbnail")
@heavy
def thumbnail(image_id: int):
    data = engine().thumbnail(image_id, config().thumbnail_size)
    return Response(data, mimetype="image/png", headers={"Cache-Control": "private, max-age=86400"})


@api.get("/images/<image_id:image_id>/full")
@heavy
def full_image(image_id: int):
    import io

    image = engine().load(image_id, _arg("window")).image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return Response(buf.getvalue(), mimetype="image/png", headers={"Cache-Control": "private, max-age=3600"})


def _download(data: bytes, mimetype: str, filename: str, inline: bool = False) -> Response:
    """`?download=1` (or non-image files) as an attachment; images inline so pages can show them."""
    attach = not inline or request.args.get("download")
    disposition = f'{"attachment" if attach else "inline"}; filename="{filename}"'
    return Response(data, mimetype=mimetype, headers={"Content-Disposition": disposition})
