"""Do the 14 chest X-ray labels apply to this image? From metadata when it says, else from the model.

The 14 ChestX-ray14 findings are chest radiograph findings. Before labelling, RadLens decides whether
an image is a chest radiograph and which view (PA / AP / lateral): first from DICOM or manifest
metadata (modality, body part, view), otherwise by a zero-shot check with the same encoder, whose
prompts are data (`ApplicabilityConfig`) like the pathology prompts.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field

import numpy as np

RADIOGRAPH_MODALITIES = {"X-RAY", "XRAY", "XR", "CR", "DX", "DR", "RADIOGRAPH", "RADIOGRAPHY", "RG"}
OTHER_MODALITIES = {"CT": "CT", "MR": "MRI", "MRI": "MRI", "US": "ultrasound", "NM": "nuclear medicine",
                    "PT": "PET", "PET": "PET", "MG": "mammography", "XA": "angiography", "OT": "other", "SC": None}
CHEST_PARTS = {"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST LAT", "CHEST PA", "CXR"}  # as `_norm` writes them
VIEW_ALIASES = {"PA": "PA", "AP": "AP", "AP SUPINE": "AP", "APSUPINE": "AP", "AP ERECT": "AP", "LL": "lateral",
                "RL": "lateral", "LAT": "lateral", "LATERAL": "lateral", "LLD": "lateral", "RLD": "lateral"}
_lock = threading.Lock()


@dataclass(frozen=True)
class Decision:
    """Whether the pathology labels apply, why, and how sure RadLens is."""

    applicable: bool
    source: str  # "metadata", "image statistics", "model" (uncalibrated share) or "calibrated"
    confidence: float
    reason: str
    view: str | None = None
    kind: str | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "confidence": round(self.confidence, 4), "basis": self.basis()}

    def basis(self) -> str:
        """What the decision rests on, in words that say how far to trust `confidence`: a rule on metadata
        or image statistics, or the model's zero-shot share (a softmax, not a calibrated probability)."""
        if self.source == "model":
            return f"the model's zero-shot share {self.confidence:.2f} (uncalibrated)"
        if self.source == "calibrated":
            return f"a calibrated probability {self.confidence:.2f} (measured by radlens calibrate)"
        return self.source


@dataclass(frozen=True)
class ApplicabilityConfig:
    """Zero-shot classes (prompt lists) and which of them are chest radiographs, with their view."""

    classes: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "chest_pa": ("a PA chest radiograph", "a frontal chest x-ray, posteroanterior view"),
        "chest_ap": ("an AP chest radiograph", "a portable supine chest x-ray"),
        "chest_lateral": ("a lateral chest radiograph", "a lateral view chest x-ray"),
        "ct": ("an axial CT image", "a CT scan slice", "a coronal CT reconstruction"),
        "mri": ("an MRI of the brain", "a magnetic resonance image"),
        "other_xray": ("a radiograph of the knee", "an x-ray of the hand", "a lumbar spine radiograph",
                       "a pelvis x-ray", "a skull radiograph"),
        "not_medical": ("a photograph", "a diagram", "a screenshot of text", "a blank image"),
    })
    chest_views: dict[str, str] = field(default_factory=lambda: {
        "chest_pa": "PA", "chest_ap": "AP", "chest_lateral": "lateral"})
    # the model's view guess is shown only when a calibration measured it right this often (the lower
    # bound of its 95% interval); otherwise the view is "not assessed"
    min_view_accuracy: float = 0.8
    kind_words: dict[str, str] = field(default_factory=lambda: {
        "ct": "CT", "mri": "MRI", "other_xray": "another radiograph", "not_medical": "not a medical image"})


def _norm(value) -> str:
    """Upper case, '-' and '_' as spaces (DICOM's CHEST_LAT and a manifest's chest-lat are one value)."""
    return " ".join(str(value or "").upper().replace("-", " ").replace("_", " ").split())


def stated_view(metadata: dict) -> str | None:
    """PA, AP or lateral when the metadata's view says so (DICOM ViewPosition or a manifest's spelling)."""
    return VIEW_ALIASES.get(_norm(metadata.get("view")))


def decide_from_metadata(metadata: dict) -> Decision | None:
    """A decision when modality/body part/view settle it; None when the model must decide."""
    modality = _norm(metadata.get("modality"))
    body = _norm(metadata.get("body_part"))
    view = stated_view(metadata)
    if modality in OTHER_MODALITIES and OTHER_MODALITIES[modality]:
        return Decision(False, "metadata", 1.0, f"modality is {OTHER_MODALITIES[modality]}, not a chest radiograph",
                        kind=OTHER_MODALITIES[modality])
    if modality.replace(" ", "") in RADIOGRAPH_MODALITIES or modality in RADIOGRAPH_MODALITIES:
        if body and body not in CHEST_PARTS:
            return Decision(False, "metadata", 1.0, f"radiograph of the {body.lower()}, not the chest",
                            kind="radiograph")
        if body in CHEST_PARTS:
            return Decision(True, "metadata", 1.0, "chest radiograph per metadata", view=view, kind="chest radiograph")
    return None


def class_bank(encoder, config: ApplicabilityConfig):
    """(class names, unit mean text embedding per class) of `config`, computed once per encoder."""
    key = ("applicability", tuple((k, v) for k, v in config.classes.items()))
    with _lock:
        cache = encoder.__dict__.setdefault("_prompt_banks", {})
        if key not in cache:
            names = list(config.classes)
            means = []
            for name in names:
                emb = encoder.encode_texts(list(config.classes[name])).mean(axis=0)
                means.append(emb / max(float(np.linalg.norm(emb)), 1e-12))
            cache[key] = (names, np.stack(means))
        return cache[key]


@dataclass(frozen=True)
class ChestShares:
    """The model's zero-shot view of embedded images: its share for "chest radiograph" (softmax mass of the
    chest classes at the model's temperature), its most likely class, and its view guess."""

    chest: np.ndarray  # (n,) in [0, 1]
    best: list[str]
    view: list[str]


def chest_shares(encoder, image_vectors: np.ndarray, config: ApplicabilityConfig) -> ChestShares:
    """Zero-shot shares of embedded images over the classes of `config`."""
    names, bank = class_bank(encoder, config)
    logits = encoder.logit_scale * (np.asarray(image_vectors) @ bank.T)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    chest = [i for i, n in enumerate(names) if n in config.chest_views]
    return ChestShares(probs[:, chest].sum(axis=1), [names[int(i)] for i in probs.argmax(axis=1)],
                       [config.chest_views[names[chest[int(i)]]] for i in probs[:, chest].argmax(axis=1)])


def decide_from_model(encoder, image_vectors: np.ndarray, config: ApplicabilityConfig,
                      calibration=None) -> list[Decision]:
    """Zero-shot decisions for embedded images. With an assessed `calibration` (`ApplicabilityCalibration`)
    the decision is its calibrated probability >= 0.5 and says what was measured; otherwise the
    uncalibrated share >= 0.5, called a share. The view guess is kept only where the calibration measured
    it right often enough (`config.min_view_accuracy`)."""
    shares = chest_shares(encoder, image_vectors, config)
    calibrated = calibration is not None and calibration.assessed
    source = "calibrated" if calibrated else "model"
    measured = f" ({calibration.check_summary()})" if calibrated else ""
    view_known = calibrated and calibration.views and (calibration.view_low or 0.0) >= config.min_view_accuracy
    view_note = ("; view from the model's guess, " if view_known else "; view not assessed: ") + (
        calibration.view_summary() if calibrated else "the model's view guess is not calibrated")
    out = []
    for share, best, view in zip(shares.chest, shares.best, shares.view, strict=True):
        p_chest = float(calibration.probability(share)) if calibrated else float(share)
        if p_chest >= 0.5:
            found = "a chest radiograph" + measured if calibrated else \
                "closest to a chest radiograph among the model's zero-shot classes (not calibrated)"
            out.append(Decision(True, source, p_chest, found + view_note,
                                view=view if view_known else None, kind="chest radiograph"))
        else:
            closest = config.kind_words.get(best, best.replace("_", " "))
            # the class named is the nearest prompt; no calibration measured how often it is right
            reason = (f"not a chest radiograph{measured}; closest zero-shot class: {closest} (not calibrated)"
                      if calibrated else f"not a chest radiograph by the model's zero-shot classes (not calibrated); "
                                         f"closest class: {closest}")
            out.append(Decision(False, source, 1.0 - p_chest, reason, kind=best))
    return out


def decide(encoder, image_vectors: np.ndarray, metadatas: list[dict], config: ApplicabilityConfig,
           calibration=None) -> list[Decision]:
    """Metadata first, the model (read through `calibration` when it measured the check) for the rest."""
    decisions: list[Decision | None] = [decide_from_metadata(m) for m in metadatas]
    undecided = [i for i, d in enumerate(decisions) if d is None]
    if undecided:
        decided = decide_from_model(encoder, image_vectors[undecided], config, calibration)
        for i, d in zip(undecided, decided, strict=True):
            decisions[i] = d
    return decisions  # type: ignore[return-value]
