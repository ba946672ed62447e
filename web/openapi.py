"""The OpenAPI 3.1 document of the JSON API, served at /api/openapi.json.

Response schemas are generated from the typed models in `web/schemas.py`; this module lists the routes,
their parameters and every status each can answer. The API fuzzer (tests/test_api_contract.py,
schemathesis) checks the live app against this document.
"""

from __future__ import annotations

from functools import lru_cache

from cxrmodel.constants import VERSION
from search.filters import FILTER_PATTERN

from . import schemas


def _param(name, where="query", schema=None, required=False, description="", example=None):
    param = {"name": name, "in": where, "required": required, "schema": schema or {"type": "string"},
             "description": description}
    return param | ({"example": example} if example is not None else {})


_ID = _param("image_id", "path", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}, True,
             "database id of an indexed image", example=1)
_QUERY = _param("q", schema={"type": "string", "pattern": r"\S"}, required=True, description="the query (not blank)",
                example="frontal chest radiograph")
_K = _param("k", schema={"type": "integer", "minimum": 1, "maximum": 100}, description="number of results")
_FILTER = {**_param("filter", schema={"type": "array", "items": {"type": "string", "pattern": FILTER_PATTERN}},
                    description="repeatable: modality=CT, view=PA, effusion>=0.6 ..."),
           "style": "form", "explode": True}
_LANG = _param("lang", schema={"enum": ["en", "de"]}, description="report language (default en)")
_THRESHOLD = _param("threshold", schema={"type": "number", "minimum": 0, "maximum": 1},
                    description="one threshold for all pathologies")
_FMT_IMAGE = _param("fmt", "path", {"enum": ["png", "svg"]}, True)
_ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(model: type, description: str = "OK") -> dict:
    """A 200 whose JSON body is `model` (a `web.schemas` class)."""
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}


@lru_cache(maxsize=1)
def component_schemas() -> dict:
    """JSON Schemas (2020-12, OpenAPI 3.1's dialect) of every response model, by name."""
    from pydantic.json_schema import models_json_schema

    _, defs = models_json_schema([(m, "serialization") for m in schemas.RESPONSE_MODELS],
                                 ref_template="#/components/schemas/{model}")
    return defs["$defs"]
_IMAGE_PART = {"type": "string", "format": "binary",
               "description": "PNG, JPEG, TIFF, BMP, GIF, WebP or DICOM (anything else: 415)"}


def _upload(**fields: dict) -> dict:
    """A multipart body: the image and `fields`."""
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"], "properties": {"image": _IMAGE_PART, **fields}}}}}


_UPLOAD_SEARCH = _upload(k=_K["schema"], filter=_FILTER["schema"])
_UPLOAD_LABEL = _upload(
    threshold=_THRESHOLD["schema"], lang=_LANG["schema"],
    modality={"type": "string", "description": "what the uploader knows the image is, e.g. CR"},
    body_part={"type": "string", "description": "e.g. chest"},
    view={"type": "string", "description": "PA, AP or lateral"})


HEAVY = (400, 401, 404, 503)  # decodes or labels a whole image: 503 + Retry-After when the server is saturated


def _get(summary, params, ok: dict, errors=(400, 401, 404)):
    return {"get": {"summary": summary, "parameters": list(params),
                    "responses": {"200": ok, **{str(c): _ERROR for c in errors}}}}


def _binary(mime):
    return {"description": "OK", "content": {mime: {"schema": {"type": "string", "format": "binary"}}}}


_BINARY = {"type": "string", "format": "binary"}
_FIGURE = {"description": "the figure (PNG or SVG, as `fmt` says)",
           "content": {"image/png": {"schema": _BINARY}, "image/svg+xml": {"schema": {"type": "string"}}}}
_REPORT = {"description": "the report in the `format` asked for",
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Report"}},
                       "text/markdown": {"schema": {"type": "string"}}, "application/pdf": {"schema": _BINARY}}}
_FINDINGS = {"description": "the findings table (CSV or JSON rows, as `fmt` says)",
             "content": {"text/csv": {"schema": {"type": "string"}},
                         "application/json": {"schema": {"type": "array",
                                                         "items": {"$ref": "#/components/schemas/Label"}}}}}


def _post_upload(summary: str, body: dict, ok: dict) -> dict:
    return {"post": {"summary": summary, "requestBody": body,
                     "responses": {"200": ok, **{str(c): _ERROR for c in (400, 401, 413, 415, 503)}}}}


def openapi_document() -> dict:
    """The API contract as a dict."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "RadLens API", "version": VERSION,
                 "description": "Semantic search, zero-shot labels and reports for medical images. "
                                "Not for clinical use."},
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only when the server sets RADLENS_API_TOKEN"}},
        },
        "security": [{}, {"bearer": []}],
        "paths": {
            "/api/health": _get("liveness and index size", [], _ok(schemas.Health), errors=()),
            "/api/search": _get("text-to-image search", [_QUERY, _K, _FILTER], _ok(schemas.SearchResults)),
            "/api/similar": _post_upload("image-to-image search (multipart upload)", _UPLOAD_SEARCH,
                                         _ok(schemas.UploadResults)),
            "/api/label": _post_upload("zero-shot labels and report of an uploaded image", _UPLOAD_LABEL,
                                      _ok(schemas.LabelResult)),
            "/api/images/{image_id}": _get("metadata and stored scores of an indexed image", [_ID],
                                           _ok(schemas.ImageRecord)),
            "/api/images/{image_id}/labels": _get("applicability, full-ensemble labels and report",
                                                  [_ID, _THRESHOLD, _LANG], _ok(schemas.LabelResult), errors=HEAVY),
            "/api/images/{image_id}/report": _get(
                "report as JSON, Markdown or PDF",
                [_ID, _THRESHOLD, _LANG, _param("format", schema={"enum": ["json", "md", "pdf"]})], _REPORT,
                errors=HEAVY),
            "/api/images/{image_id}/similar": _get("more like this: indexed images similar to an indexed one",
                                                   [_ID, _K, _FILTER], _ok(schemas.SimilarToResults)),
            "/api/images/{image_id}/priors": _get("the same patient's studies in date order with score changes",
                                                  [_ID], _ok(schemas.Priors)),
            "/api/images/{image_id}/heatmap.{fmt}": _get(
                "category x ensemble-member heatmap", [_ID, _FMT_IMAGE], _FIGURE, errors=HEAVY),
            "/api/images/{image_id}/summary.{fmt}": _get(
                "top-findings summary card", [_ID, _FMT_IMAGE], _FIGURE, errors=HEAVY),
            "/api/images/{image_id}/findings.{fmt}": _get(
                "findings table", [_ID, _THRESHOLD, _param("fmt", "path", {"enum": ["csv", "json"]}, True)],
                _FINDINGS, errors=HEAVY),
            "/api/images/{image_id}/chart.{fmt}": _get(
                "probability bar chart", [_ID, _THRESHOLD, _FMT_IMAGE], _FIGURE, errors=HEAVY),
            "/api/images/{image_id}/thumbnail": _get("PNG thumbnail (cached)", [_ID], _binary("image/png"), HEAVY),
            "/api/images/{image_id}/full": _get(
                "full image as PNG (DICOM: in a display window)",
                [_ID, _param("window", schema={"enum": ["file", "full", "lung", "mediastinum", "bone", "brain"]},
                             description="DICOM display window; the HU presets apply to CT only")],
                _binary("image/png"), HEAVY),
            "/api/openapi.json": _get("this document", [], _ok(schemas.OpenAPIDocument), errors=(401,)),
        },
    }
