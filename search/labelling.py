"""Labels and reports for one image with a served state's encoder: where the 14 labels apply, their
full-ensemble scores, and the structured report. No DB access; `Engine` hands in what it read.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cxrmodel.imaging.decode import DecodedImage
from cxrmodel.labels.applicability import Decision, decide_from_metadata, decide_from_model
from cxrmodel.labels.prompts import LabelConfig
from cxrmodel.labels.zeroshot import LabelScore, label_image
from cxrmodel.reporting.report import Report, compose_report


def pil(image: Image.Image | DecodedImage) -> Image.Image:
    """The PIL image of a decoded upload (or the image itself)."""
    return image.image if isinstance(image, DecodedImage) else image


class Labeller:
    """Applicability, zero-shot labels and reports under one `LabelConfig`."""

    def __init__(self, labels: LabelConfig):
        self.labels = labels

    def label(self, encoder, image: Image.Image | DecodedImage) -> list[LabelScore]:
        """Full-ensemble zero-shot scores of the 14 pathologies (whether or not they apply)."""
        return label_image(encoder, pil(image), self.labels)

    def applicability(self, encoder, image: Image.Image | DecodedImage, metadata: dict | None,
                      vector: np.ndarray | None) -> Decision:
        """From metadata when it settles it (no model call), else from the model (using `vector`, the
        image's embedding by `encoder`, when the caller already has it)."""
        meta = {**(image.metadata if isinstance(image, DecodedImage) else {}), **(metadata or {})}
        decided = decide_from_metadata(meta)
        if decided is not None:
            return decided
        vec = encoder.encode_images([pil(image)])[0] if vector is None else vector
        return decide_from_model(encoder, vec[None, :], self.labels.applicability)[0]

    def assess(self, encoder, image: Image.Image | DecodedImage, metadata: dict | None = None,
               vector: np.ndarray | None = None) -> tuple[Decision, list[LabelScore]]:
        """The applicability decision and, only where the labels apply, their scores."""
        decision = self.applicability(encoder, image, metadata, vector)
        return decision, (self.label(encoder, image) if decision.applicable else [])

    def report(self, scores: list[LabelScore], decision: Decision | None, metadata: dict,
               threshold: float | None, lang: str) -> Report:
        """The structured report of scored labels (pure: no model call)."""
        return compose_report(scores, metadata, self.labels, threshold, decision=decision, lang=lang)
