"""Labels and reports for one image with a served state's encoder: where the 14 labels apply, their
full-ensemble scores, and the structured report. No DB access; `Engine` hands in what it read.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
from PIL import Image

from cxrmodel.imaging.decode import DecodedImage
from cxrmodel.imaging.plausibility import assess_image
from cxrmodel.labels.applicability import Decision, decide_from_metadata, decide_from_model
from cxrmodel.labels.calibration import Calibration, for_encoder
from cxrmodel.labels.prompts import LabelConfig
from cxrmodel.labels.zeroshot import LabelScore, apply_calibration, label_image
from cxrmodel.reporting.report import Report, compose_report


def model_input(image: Image.Image | DecodedImage, encoder) -> Image.Image:
    """What `encoder` is given of an image: a decoded file's model-sized input (`DecodedImage.model_input`,
    made as `radlens index` makes it), or the PIL image itself."""
    return image.model_input(encoder.preprocess) if isinstance(image, DecodedImage) else image


def report_metadata(image: Image.Image | DecodedImage, metadata: dict | None) -> dict:
    """What a report knows of an image: a decoded file's own metadata, size and (when it holds more than one)
    frame count, overlaid by `metadata`."""
    meta = dict(metadata or {})
    if isinstance(image, DecodedImage):
        width, height = image.file_size
        frames = {"frames": image.frames} if image.frames > 1 else {}
        meta = {**image.metadata, "width": width, "height": height, **frames, **meta}
    return meta


class Labeller:
    """Applicability, zero-shot labels and reports under one `LabelConfig` and, per encoder, the
    calibration that applies to it (`cxrmodel.labels.calibration.for_encoder`)."""

    def __init__(self, labels: LabelConfig, calibration_file: str | None = None):
        self.labels = labels
        self.calibration_file = calibration_file
        self._lock = threading.Lock()

    def calibration(self, encoder) -> Calibration | None:
        """The encoder's calibration (loaded once per encoder), or None: uncalibrated."""
        with self._lock:
            cache = encoder.__dict__.setdefault("_calibrations", {})
            if self.calibration_file not in cache:
                cache[self.calibration_file] = for_encoder(encoder, self.calibration_file)
            return cache[self.calibration_file]

    def label(self, encoder, image: Image.Image | DecodedImage) -> list[LabelScore]:
        """The 14 pathologies' scores (whether or not they apply), read through the calibration: calibrated
        probabilities where it shows skill, raw scores marked not assessed elsewhere."""
        scores = label_image(encoder, model_input(image, encoder), self.labels)
        return apply_calibration(scores, self.calibration(encoder))

    def with_stored(self, encoder, scores: list[LabelScore], stored: dict[str, float]) -> list[LabelScore]:
        """`scores` of an indexed image with their values replaced by the ones stored at index time, so that
        page, reports and downloads show exactly what the grid and the filters use (one number per image
        and pathology); the ensemble's members and other variants are kept, the stored value standing for the
        original view."""
        raw = []
        for s in scores:
            value = stored.get(s.pathology, s.raw)
            variants = {**s.variants, "original": value} if s.variants else {}
            raw.append(replace(s, raw=value, variants=variants,
                               threshold=float(self.labels.thresholds.get(s.pathology, 0.5))))
        return apply_calibration(raw, self.calibration(encoder))

    def stored(self, encoder, scores: dict[str, float]) -> dict[str, float]:
        """Index-time raw scores as they may be shown: calibrated, and only for assessed pathologies."""
        calibration = self.calibration(encoder)
        if calibration is None:
            return {}
        out = {}
        for pathology, raw in scores.items():
            cal = calibration.pathologies.get(pathology)
            if cal is not None and cal.assessed:
                out[pathology] = float(cal.probability(raw))
        return out

    def applicability(self, encoder, image: Image.Image | DecodedImage, metadata: dict | None,
                      vector: np.ndarray | None) -> Decision:
        """From metadata when it settles it (no model call), else from the model (using `vector`, the
        image's embedding by `encoder`, when the caller already has it)."""
        meta = {**(image.metadata if isinstance(image, DecodedImage) else {}), **(metadata or {})}
        decided = decide_from_metadata(meta)
        if decided is not None:
            return decided
        plausible = assess_image(image)
        if not plausible.radiological:  # noise, flat colours, photographs...: no model is asked about them
            return Decision(False, "image statistics", 1.0, f"not a radiological image: {plausible.reason}",
                            kind="not a radiological image")
        vec = encoder.encode_images([model_input(image, encoder)])[0] if vector is None else vector
        calibration = self.calibration(encoder)
        return decide_from_model(encoder, vec[None, :], self.labels.applicability,
                                 calibration.applicability if calibration else None)[0]

    def assess(self, encoder, image: Image.Image | DecodedImage, metadata: dict | None = None,
               vector: np.ndarray | None = None) -> tuple[Decision, list[LabelScore]]:
        """The applicability decision and, only where the labels apply, their scores."""
        decision = self.applicability(encoder, image, metadata, vector)
        return decision, (self.label(encoder, image) if decision.applicable else [])

    def report(self, scores: list[LabelScore], decision: Decision | None, metadata: dict,
               threshold: float | None, lang: str) -> Report:
        """The structured report of scored labels (pure: no model call)."""
        return compose_report(scores, metadata, self.labels, threshold, decision=decision, lang=lang)
