"""The context that makes a downloaded PDF report stand alone: thumbnail, provenance and figures.

One builder for the web API, the upload page and `radlens label --report pdf`, so the three PDFs agree.
"""

from __future__ import annotations

import datetime as dt
import io

from PIL import Image

from cxrmodel.imaging.decode import shrink_to_fit
from cxrmodel.reporting.charts import category_heatmap, probability_chart
from cxrmodel.reporting.report import PdfContext, text_for

THUMBNAIL_SIDE = 384


def png_thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> bytes:
    """A PNG of `image` shrunk to fit `side` pixels."""
    buf = io.BytesIO()
    small = shrink_to_fit(image, side)
    (small if small.mode in ("L", "RGB") else small.convert("RGB")).save(buf, format="PNG")
    return buf.getvalue()


def pdf_context(scores, decision, threshold: float | None, lang: str, *, image: Image.Image | bytes | None,
                file_name: str | None, content_hash: str | None, encoder=None) -> PdfContext:
    """Everything a PDF report prints beside the report itself (figures only where the labels apply)."""
    t = text_for(lang)
    figures = []
    if scores and (decision is None or decision.applicable):
        figures = [(t["pdf_chart"], probability_chart(scores, "png", threshold)),
                   (t["pdf_heatmap"], category_heatmap(scores, "png"))]
    png = image if isinstance(image, bytes | None) else png_thumbnail(image)
    return PdfContext(image_png=png, file_name=file_name, content_hash=content_hash,
                      model=getattr(encoder, "model_name", None),
                      model_fingerprint=getattr(encoder, "fingerprint", None),
                      threshold=threshold, generated=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                      figures=figures)
