"""Prompts, ensemble weights and thresholds for zero-shot labelling -- data, not code.

`LabelConfig` holds everything a zero-shot label depends on: the 14 ChestX-ray14 pathologies
with their plain names, radiological descriptions and anatomical region; the prompt sets
(each a positive and a negative template list, expanded with `itertools.product` over
templates x phrases); the image preprocessing variants; and per-pathology thresholds. Users
override any part from a JSON file (`load_label_config`), e.g. to tune a threshold.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cxrmodel.constants import PATHOLOGIES
from cxrmodel.errors import DataError
from cxrmodel.labels.applicability import ApplicabilityConfig

REGIONS: tuple[str, ...] = ("lungs", "pleura", "heart and mediastinum", "diaphragm")

# Anatomical categories of the 14 findings (for the category heatmap and summaries).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "lung parenchyma": ("Atelectasis", "Infiltration", "Mass", "Nodule", "Pneumonia", "Consolidation", "Edema",
                        "Emphysema", "Fibrosis"),
    "pleura": ("Effusion", "Pneumothorax", "Pleural_Thickening"),
    "cardiac/mediastinal": ("Cardiomegaly",),
    "other": ("Hernia",),
}


@dataclass(frozen=True)
class Pathology:
    """How one finding is named and described, and where in the chest it lives."""

    name: str
    phrases: tuple[str, ...]
    descriptions: tuple[str, ...]
    region: str


DEFAULT_PATHOLOGIES: dict[str, Pathology] = {
    "Atelectasis": Pathology("atelectasis", ("atelectasis", "lung collapse"),
                             ("volume loss with linear opacity from atelectasis", "collapsed lung segment"), "lungs"),
    "Cardiomegaly": Pathology("cardiomegaly", ("cardiomegaly", "an enlarged heart"),
                              ("enlarged cardiac silhouette", "cardiothoracic ratio above 0.5"),
                              "heart and mediastinum"),
    "Effusion": Pathology("pleural effusion", ("pleural effusion", "fluid in the pleural space"),
                          ("blunting of the costophrenic angle", "meniscus sign of pleural fluid"), "pleura"),
    "Infiltration": Pathology("infiltration", ("pulmonary infiltrate", "lung infiltration"),
                              ("ill-defined opacity in the lung", "patchy airspace infiltrate"), "lungs"),
    "Mass": Pathology("lung mass", ("a lung mass", "a pulmonary mass"),
                      ("a well-defined opacity larger than 3 cm", "a large rounded lung lesion"), "lungs"),
    "Nodule": Pathology("lung nodule", ("a lung nodule", "a pulmonary nodule"),
                        ("a small rounded opacity under 3 cm", "a solitary pulmonary nodule"), "lungs"),
    "Pneumonia": Pathology("pneumonia", ("pneumonia", "lung infection"),
                           ("lobar airspace opacity from pneumonia", "consolidation from infection"), "lungs"),
    "Pneumothorax": Pathology("pneumothorax", ("pneumothorax", "collapsed lung with air in the pleural space"),
                              ("a visible pleural line with absent lung markings", "air in the pleural space"),
                              "pleura"),
    "Consolidation": Pathology("consolidation", ("consolidation", "airspace consolidation"),
                               ("dense airspace opacity with air bronchograms", "lobar consolidation"), "lungs"),
    "Edema": Pathology("pulmonary edema", ("pulmonary edema", "fluid overload in the lungs"),
                       ("perihilar haziness and Kerley B lines", "bilateral interstitial edema"), "lungs"),
    "Emphysema": Pathology("emphysema", ("emphysema", "hyperinflated lungs"),
                           ("hyperlucent lungs with flattened diaphragms", "bullous emphysema"), "lungs"),
    "Fibrosis": Pathology("fibrosis", ("pulmonary fibrosis", "lung scarring"),
                          ("reticular opacities from fibrosis", "honeycombing of the lungs"), "lungs"),
    "Pleural_Thickening": Pathology("pleural thickening", ("pleural thickening", "thickened pleura"),
                                    ("pleural thickening along the chest wall", "apical pleural cap"), "pleura"),
    "Hernia": Pathology("hiatal hernia", ("a hiatal hernia", "a diaphragmatic hernia"),
                        ("retrocardiac air-fluid level from a hiatal hernia", "bowel above the diaphragm"),
                        "diaphragm"),
}


@dataclass(frozen=True)
class PromptSet:
    """One ensemble member's prompts: templates filled with a pathology's phrases or descriptions."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]
    source: str = "phrases"  # which Pathology field fills {finding}: phrases or descriptions
    weight: float = 1.0


DEFAULT_PROMPT_SETS: dict[str, PromptSet] = {
    "radiological": PromptSet(
        positive=("a chest radiograph showing {finding}", "frontal chest x-ray with {finding}"),
        negative=("a chest radiograph with no evidence of {name}", "a normal frontal chest x-ray"),
        source="descriptions", weight=1.0),
    "names": PromptSet(
        positive=("{finding}", "{finding} on chest x-ray"),
        negative=("no {name}", "normal chest x-ray"),
        source="phrases", weight=1.0),
    "pairs": PromptSet(
        positive=("there is {finding}", "findings consistent with {finding}"),
        negative=("there is no {name}", "no findings of {name}"),
        source="phrases", weight=1.0),
}

# Preprocessing variants of the image and their ensemble weights (see zeroshot.image_variants).
DEFAULT_VARIANTS: dict[str, float] = {"original": 1.0, "equalized": 1.0, "clahe": 1.0, "contrast": 1.0}


@dataclass(frozen=True)
class LabelConfig:
    """Everything a zero-shot label depends on; override from JSON with `load_label_config`."""

    pathologies: dict[str, Pathology] = field(default_factory=lambda: dict(DEFAULT_PATHOLOGIES))
    prompt_sets: dict[str, PromptSet] = field(default_factory=lambda: dict(DEFAULT_PROMPT_SETS))
    variants: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_VARIANTS))
    thresholds: dict[str, float] = field(default_factory=lambda: {p: 0.5 for p in PATHOLOGIES})
    applicability: ApplicabilityConfig = field(default_factory=ApplicabilityConfig)

    def all_prompts(self) -> tuple[list[str], list[tuple[int, int, int]]]:
        """Every prompt text, set-major then pathology, and per (set, pathology) member its
        (start, positives, negatives) span in that list."""
        texts, spans = [], []
        for s in self.prompt_sets:
            for p in self.pathologies:
                pos, neg = self.prompts(s, p)
                spans.append((len(texts), len(pos), len(neg)))
                texts.extend(pos + neg)
        return texts, spans

    def prompts(self, set_name: str, pathology: str) -> tuple[list[str], list[str]]:
        """(positive, negative) prompt texts of one set for one pathology."""
        ps, spec = self.prompt_sets[set_name], self.pathologies[pathology]
        fillers = spec.descriptions if ps.source == "descriptions" else spec.phrases
        pos = [t.format(finding=f, name=spec.name) for t, f in itertools.product(ps.positive, fillers)]
        neg = [t.format(finding=spec.name, name=spec.name) for t in ps.negative]
        return pos, neg

    def fingerprint(self) -> str:
        """A stable text identifying the prompts (for caching their embeddings)."""
        return json.dumps({"p": {k: asdict(v) for k, v in self.pathologies.items()},
                           "s": {k: asdict(v) for k, v in self.prompt_sets.items()}}, sort_keys=True)

    def to_dict(self) -> dict:
        """JSON-ready form; the same shape `load_label_config` accepts."""
        return {"pathologies": {k: asdict(v) for k, v in self.pathologies.items()},
                "prompt_sets": {k: asdict(v) for k, v in self.prompt_sets.items()},
                "variants": dict(self.variants), "thresholds": dict(self.thresholds),
                "applicability": asdict(self.applicability)}


def load_label_config(path: str | Path | None) -> LabelConfig:
    """Defaults, with any sections of a JSON override file merged over them."""
    config = LabelConfig()
    if path is None:
        return config
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read label config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"label config {path} must be a JSON object")
    try:
        pathologies = dict(config.pathologies)
        for key, spec in data.get("pathologies", {}).items():
            spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
            pathologies[key] = replace(pathologies[key], **spec) if key in pathologies else Pathology(**spec)
        sets = dict(config.prompt_sets)
        for key, spec in data.get("prompt_sets", {}).items():
            spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
            sets[key] = replace(sets[key], **spec) if key in sets else PromptSet(**spec)
        variants = {**config.variants, **{k: float(v) for k, v in data.get("variants", {}).items()}}
        thresholds = {**config.thresholds, **{k: float(v) for k, v in data.get("thresholds", {}).items()}}
        app = data.get("applicability", {})
        applicability = ApplicabilityConfig(
            classes={**config.applicability.classes, **{k: tuple(v) for k, v in app.get("classes", {}).items()}},
            chest_views={**config.applicability.chest_views, **app.get("chest_views", {})})
    except (TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"label config {path} is malformed: {exc}") from None
    unknown = set(thresholds) - set(pathologies)
    if unknown:
        raise DataError(f"label config {path} sets thresholds for unknown pathologies: {sorted(unknown)}")
    unknown_variants = set(variants) - set(DEFAULT_VARIANTS)
    if unknown_variants:
        raise DataError(f"label config {path}: unknown variants {sorted(unknown_variants)}; "
                        f"known: {sorted(DEFAULT_VARIANTS)}")
    return LabelConfig(pathologies=pathologies, prompt_sets=sets, variants=variants, thresholds=thresholds,
                       applicability=applicability)
