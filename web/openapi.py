"""The OpenAPI 3.1 document of the JSON API, served at /api/openapi.json."""

from __future__ import annotations

from cxrmodel.constants import VERSION


def _param(name, where="query", schema=None, required=False, description=""):
    return {"name": name, "in": where, "required": required, "schema": schema or {"type": "string"},
            "description": description}


_ID = _param("image_id", "path", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}, True,
             "database id of an indexed image")
_K = _param("k", schema={"type": "integer", "minimum": 1, "maximum": 100}, description="number of results")
_FILTER = {**_param("filter", schema={"type": "array", "items": {"type": "string"}},
                    description="repeatable: modality=CT, view=PA, effusion>=0.6 ..."),
           "style": "form", "explode": True}
_LANG = _param("lang", schema={"enum": ["en", "de"]}, description="report language (default en)")
_THRESHOLD = _param("threshold", schema={"type": "number", "minimum": 0, "maximum": 1},
                    description="one threshold for all pathologies")
_FMT_IMAGE = _param("fmt", "path", {"enum": ["png", "svg"]}, True)
_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_JSON = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
_UPLOAD = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"],
    "properties": {"image": {"type": "string", "format": "binary"}, "k": {"type": "integer"},
                   "threshold": {"type": "number"}, "filter": {"type": "array", "items": {"type": "string"}},
                   "modality": {"type": "string", "description": "what the uploader knows, e.g. CR (label only)"},
                   "body_part": {"type": "string", "description": "e.g. chest (label only)"},
                   "view": {"type": "string", "description": "PA, AP or lateral (label only)"}}}}}}


HEAVY = (400, 401, 404, 503)  # decodes or labels a whole image: 503 + Retry-After when the server is saturated


def _get(summary, params=(), ok=None, errors=(400, 401, 404)):
    return {"get": {"summary": summary, "parameters": list(params),
                    "responses": {"200": ok or _JSON, **{str(c): _ERROR for c in errors}}}}


def _binary(mime):
    return {"description": "OK", "content": {mime: {"schema": {"type": "string", "format": "binary"}}}}


def openapi_document() -> dict:
    """The API contract as a dict."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "RadLens API", "version": VERSION,
                 "description": "Semantic search, zero-shot labels and reports for medical images. "
                                "Not for clinical use."},
        "components": {
            "schemas": {"Error": {"type": "object", "required": ["error", "status"],
                                  "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only when the server sets RADLENS_API_TOKEN"}},
        },
        "security": [{}, {"bearer": []}],
        "paths": {
            "/api/health": _get("liveness and index size", errors=()),
            "/api/search": _get("text-to-image search", [_param("q", required=True), _K, _FILTER]),
            "/api/similar": {"post": {"summary": "image-to-image search (multipart upload)", "requestBody": _UPLOAD,
                                      "responses": {"200": _JSON,
                                                    **{str(c): _ERROR for c in (400, 401, 413, 415, 503)}}}},
            "/api/label": {"post": {"summary": "zero-shot labels and report of an uploaded image",
                                    "requestBody": _UPLOAD,
                                    "responses": {"200": _JSON,
                                                  **{str(c): _ERROR for c in (400, 401, 413, 415, 503)}}}},
            "/api/images/{image_id}": _get("metadata and stored scores of an indexed image", [_ID]),
            "/api/images/{image_id}/labels": _get("applicability, full-ensemble labels and report",
                                                  [_ID, _THRESHOLD, _LANG], errors=HEAVY),
            "/api/images/{image_id}/report": _get(
                "report as JSON, Markdown or PDF",
                [_ID, _THRESHOLD, _LANG, _param("format", schema={"enum": ["json", "md", "pdf"]})], errors=HEAVY),
            "/api/images/{image_id}/similar": _get("more like this: indexed images similar to an indexed one",
                                                   [_ID, _K, _FILTER]),
            "/api/images/{image_id}/priors": _get("the same patient's studies in date order with score changes",
                                                  [_ID]),
            "/api/images/{image_id}/heatmap.{fmt}": _get(
                "category x ensemble-member heatmap", [_ID, _FMT_IMAGE], errors=HEAVY),
            "/api/images/{image_id}/summary.{fmt}": _get(
                "top-findings summary card", [_ID, _FMT_IMAGE], errors=HEAVY),
            "/api/images/{image_id}/findings.{fmt}": _get(
                "findings table", [_ID, _THRESHOLD, _param("fmt", "path", {"enum": ["csv", "json"]}, True)],
                errors=HEAVY),
            "/api/images/{image_id}/chart.{fmt}": _get(
                "probability bar chart", [_ID, _THRESHOLD, _FMT_IMAGE],
                errors=HEAVY),
            "/api/images/{image_id}/thumbnail": _get("PNG thumbnail (cached)", [_ID], _binary("image/png"), HEAVY),
            "/api/images/{image_id}/full": _get(
                "full image as PNG (DICOM: in a display window)",
                [_ID, _param("window", schema={"enum": ["file", "full", "lung", "mediastinum", "bone", "brain"]},
                             description="DICOM display window; the HU presets apply to CT only")],
                _binary("image/png"), HEAVY),
            "/api/openapi.json": _get("this document", errors=(401,)),
        },
    }
