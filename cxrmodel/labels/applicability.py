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
    source: str  # "metadata" or "model"
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


def _norm(value) -> str:
    """Upper case, '-' and '_' as spaces (DICOM's CHEST_LAT and a manifest's chest-lat are one value)."""
    return " ".join(str(value or "").upper().replace("-", " ").replace("_", " ").split())


def decide_from_metadata(metadata: dict) -> Decision | None:
    """A decision when modality/body part/view settle it; None when the model must decide."""
    modality = _norm(metadata.get("modality"))
    body = _norm(metadata.get("body_part"))
    view = VIEW_ALIASES.get(_norm(metadata.get("view")))
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


def decide_from_model(encoder, image_vectors: np.ndarray, config: ApplicabilityConfig) -> list[Decision]:
    """Zero-shot decisions for embedded images (softmax over the classes at the model's temperature)."""
    names, bank = class_bank(encoder, config)
    logits = encoder.logit_scale * (np.asarray(image_vectors) @ bank.T)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    chest = [i for i, n in enumerate(names) if n in config.chest_views]
    out = []
    for row in probs:
        p_chest = float(row[chest].sum())
        best = names[int(np.argmax(row))]
        if p_chest >= 0.5:
            top = names[chest[int(np.argmax(row[chest]))]]
            out.append(Decision(True, "model", p_chest, "looks like a chest radiograph", view=config.chest_views[top],
                                kind="chest radiograph"))
        else:
            out.append(Decision(False, "model", 1.0 - p_chest, f"looks like {best.replace('_', ' ')}, not a chest "
                                                              "radiograph", kind=best))
    return out


def decide(encoder, image_vectors: np.ndarray, metadatas: list[dict], config: ApplicabilityConfig) -> list[Decision]:
    """Metadata first, the model for the rest."""
    decisions: list[Decision | None] = [decide_from_metadata(m) for m in metadatas]
    undecided = [i for i, d in enumerate(decisions) if d is None]
    if undecided:
        for i, d in zip(undecided, decide_from_model(encoder, image_vectors[undecided], config), strict=True):
            decisions[i] = d
    return decisions  # type: ignore[return-value]
