"""What both blueprints need: the engine, the config, upload reading, and label/report payloads."""

from __future__ import annotations

from flask import current_app, request

from cxrmodel.reporting.report import languages

from . import HTTPError, ServeConfig


def engine():
    """The app's `search.Engine`."""
    return current_app.extensions["radlens"]


def config() -> ServeConfig:
    return current_app.extensions["radlens_config"]


def upload_limit_message() -> str:
    """What a too-large upload is told, with the limit in plain words."""
    return (f"the file is larger than this server's upload limit of {config().max_upload_bytes / 2**20:.0f} MB; "
            "choose a smaller file (e.g. a PNG or DICOM export at a lower resolution)")


def read_upload(field: str = "image"):
    """Decode the uploaded file of a multipart request; HTTPError 400/413/415 when unusable."""
    upload = request.files.get(field)
    if upload is None:
        raise HTTPError(400, f"no file in the multipart field {field!r}")
    data = upload.read(config().max_upload_bytes + 1)
    if len(data) > config().max_upload_bytes:
        raise HTTPError(413, upload_limit_message())
    name = "upload.dcm" if (upload.filename or "").lower().endswith((".dcm", ".dicom")) else "upload"
    return engine().decode_upload(data, name=name)


def upload_provenance(field: str = "image") -> tuple[str | None, str | None]:
    """(base name as the browser sent it, SHA-256 of the content) of an upload, for the report's provenance."""
    import hashlib

    upload = request.files.get(field)
    if upload is None:
        return None, None
    upload.stream.seek(0)
    digest = hashlib.sha256(upload.stream.read(config().max_upload_bytes + 1)).hexdigest()
    name = (upload.filename or "").replace("\\", "/").rsplit("/", 1)[-1][:200]
    return name or None, digest


def k_param(value) -> int:
    """Parse k within the configured bounds."""
    try:
        k = int(value) if value not in (None, "") else config().default_k
    except (TypeError, ValueError):
        raise HTTPError(400, "k must be an integer") from None
    if not 1 <= k <= config().max_k:
        raise HTTPError(400, f"k must be between 1 and {config().max_k}")
    return k


def threshold_param(value) -> float | None:
    """Parse an optional threshold in [0, 1]."""
    if value in (None, ""):
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise HTTPError(400, "threshold must be a number") from None
    if not 0.0 <= t <= 1.0:
        raise HTTPError(400, "threshold must lie in [0, 1]")
    return t


def lang_param(value) -> str:
    """A report language code (default English)."""
    lang = value or "en"
    if lang not in languages():
        raise HTTPError(400, f"lang must be one of {', '.join(languages())}")
    return lang


def id_labels(image_id: int, threshold: float | None, lang: str = "en"):
    """(metadata, scores, report, decision) of an indexed image (NotFoundError, a 404, when unknown)."""
    report, scores, decision, meta = engine().report_for_id(image_id, threshold, lang)
    return meta, scores, report, decision


STATED_FIELDS = ("modality", "body_part", "view")  # what an uploader may state about the image


def stated_metadata() -> dict:
    """Modality, body part and view the uploader stated (form fields), which decide applicability as an
    index's metadata would; at most 64 characters each."""
    return {key: request.form[key].strip()[:64] for key in STATED_FIELDS if (request.form.get(key) or "").strip()}


def upload_labels(image, threshold: float | None, lang: str = "en", vector=None, state=None,
                  metadata: dict | None = None):
    """(scores, report, decision) of an uploaded image (`vector`: its embedding by `state`'s encoder, if
    already computed; `metadata`: what the uploader stated)."""
    eng = engine()
    decision, scores = eng.assess(image, metadata, vector=vector, state=state)
    return scores, eng.report(image, metadata or {}, threshold, scores, decision, lang), decision


def label_payload(scores, report, decision) -> dict:
    """JSON body shared by /api/label and /api/images/<id>/labels."""
    return {"applicability": decision.to_dict(), "labels": [s.to_dict() for s in scores],
            "report": report.to_dict()}
