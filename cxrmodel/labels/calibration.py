"""Calibration of the zero-shot scores: measured skill per pathology, a monotone map to probability,
an operating threshold, and the rule that decides which pathologies a model may report.

Everything here is pure (arrays in, dataclasses out) except `save` / `load`. The raw score is the one
the index stores and the pages show (`zeroshot.score_vectors` of the image's one embedding); a
calibration maps it to a probability only for the model whose identity it records.

- AUROC with a seeded bootstrap 95% interval (percentile method, resampling images).
- The map is isotonic regression (scikit-learn), stored as its knots and applied by interpolation.
- The operating threshold maximises Youden's J (sensitivity + specificity - 1) on the raw score.
- Expected calibration error (10 equal-width bins) of the raw score and of the calibrated
  probability, the latter cross-fitted (5 folds), so it is not flattered by fitting on itself.
- A pathology is *assessed* when it has at least `min_positives` positives and the lower bound of its
  AUROC interval is above `min_auroc_lower`. With 14 pathologies tested at once, one would clear a 95%
  interval by chance every few calibrations, so the decision uses a Bonferroni-widened interval
  (level 1 - 0.05/14 = 99.6%) while the 95% interval is what is reported. Only assessed pathologies
  are ever reported as findings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cxrmodel.errors import DataError
from cxrmodel.labels.measures import (
    auroc,
    bootstrap_aurocs,
    cross_fitted,
    expected_calibration_error,
    fit_isotonic,
    percentile_interval,
    wilson_interval,
    youden_threshold,
)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SkillRule:
    """When a pathology counts as assessed (data: stored in every calibration, overridable)."""

    min_positives: int = field(default=20, metadata={"help": "Fewest positive images for a verdict."})
    min_auroc_lower: float = field(default=0.5, metadata={"help": "The AUROC interval's lower bound must exceed it."})
    resamples: int = field(default=2000, metadata={"help": "Bootstrap resamples for the AUROC interval."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap and the cross-fitting folds."})
    family_wise: bool = field(default=True, metadata={
        "help": "Decide on a Bonferroni-widened interval (1 - 0.05 / pathologies), not the reported 95% one."})


@dataclass(frozen=True)
class PathologyCalibration:
    """What was measured for one pathology, and the map and threshold fitted from it."""

    pathology: str
    positives: int
    negatives: int
    auroc: float | None
    auroc_low: float | None
    auroc_high: float | None
    assessed: bool
    reason: str  # why (not) assessed, in words
    decision_low: float | None = None  # lower bound of the interval the verdict used (see SkillRule)
    threshold: float | None = None  # calibrated probability at the Youden threshold
    raw_threshold: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    ece_raw: float | None = None
    ece_calibrated: float | None = None
    knots_x: list[float] = field(default_factory=list)  # isotonic map: raw score -> probability
    knots_y: list[float] = field(default_factory=list)

    def probability(self, raw: np.ndarray | float) -> np.ndarray | float:
        """The calibrated probability of raw score(s)."""
        if not self.knots_x:
            return raw
        return np.interp(raw, self.knots_x, self.knots_y)

    def raw_at_least(self, probability: float) -> float:
        """The smallest raw score whose calibrated probability (the piecewise-linear map) is at least
        `probability`: -inf when every score is, inf when none is."""
        xs, ys = self.knots_x or [0.0, 1.0], self.knots_y or [0.0, 1.0]
        if ys[0] >= probability:
            return float("-inf")
        for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:], strict=False):
            if y1 >= probability > y0:
                return x0 + (probability - y0) * (x1 - x0) / (y1 - y0)
        return float("inf")


@dataclass(frozen=True)
class ApplicabilityCalibration:
    """How far the model's chest-radiograph check can be trusted, measured on images whose modality and body
    part say what they are: the AUROC of its zero-shot share for "chest radiograph", an isotonic map from
    share to probability, the sensitivity/specificity of the decision it then takes (calibrated probability
    >= 0.5, cross-fitted), and how often its view guess matches a stated PA/AP/lateral view."""

    positives: int  # chest radiographs
    negatives: int  # other images
    auroc: float | None
    auroc_low: float | None
    auroc_high: float | None
    assessed: bool
    reason: str
    sensitivity: float | None = None
    specificity: float | None = None
    knots_x: list[float] = field(default_factory=list)
    knots_y: list[float] = field(default_factory=list)
    views: int = 0  # chest radiographs with a stated view
    views_correct: int = 0
    view_low: float | None = None  # Wilson 95% interval of the view guess's accuracy
    view_high: float | None = None
    view_confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # stated view -> guessed -> count

    def probability(self, share: np.ndarray | float) -> np.ndarray | float:
        """The calibrated probability that an image is a chest radiograph, from the model's share."""
        return np.interp(share, self.knots_x, self.knots_y) if self.knots_x else share

    def summary(self) -> str:
        """One line: what was measured, in words."""
        if self.auroc is None:
            return self.reason
        text = (f"chest radiograph vs other: AUROC {self.auroc:.2f} (95% CI {self.auroc_low:.2f}-"
                f"{self.auroc_high:.2f}) on {self.positives} chest radiographs and {self.negatives} other images")
        if self.assessed:
            text += f"; sensitivity {self.sensitivity:.2f}, specificity {self.specificity:.2f}"
        return text + "; " + self.view_summary()

    def check_summary(self) -> str:
        """The chest-radiograph check's measured skill in a short clause."""
        return (f"check measured on {self.positives + self.negatives} images: AUROC {self.auroc:.2f} "
                f"[{self.auroc_low:.2f}-{self.auroc_high:.2f}], sensitivity {self.sensitivity:.2f}, "
                f"specificity {self.specificity:.2f}")

    def view_summary(self) -> str:
        """The view guess's measured accuracy, or that it was not measured."""
        if not self.views:
            return "view guess not measured (no stated PA/AP/lateral view)"
        return (f"view guess right on {self.views_correct} of {self.views} "
                f"({self.views_correct / self.views:.0%}, 95% CI {self.view_low:.0%}-{self.view_high:.0%})")


@dataclass(frozen=True)
class Calibration:
    """A model's calibration: per-pathology measurements, the rule, and what it was measured on."""

    model_identity: str
    model_name: str
    dataset: dict
    rule: SkillRule
    pathologies: dict[str, PathologyCalibration]
    created: str = ""
    version: int = FORMAT_VERSION
    applicability: ApplicabilityCalibration | None = None

    @property
    def assessed(self) -> list[str]:
        """Pathologies with demonstrated skill."""
        return [p for p, c in self.pathologies.items() if c.assessed]

    def to_dict(self) -> dict:
        return {"version": self.version, "model_identity": self.model_identity, "model_name": self.model_name,
                "created": self.created, "dataset": self.dataset, "rule": asdict(self.rule),
                "pathologies": {p: asdict(c) for p, c in self.pathologies.items()},
                "applicability": asdict(self.applicability) if self.applicability else None}
















def calibrate_pathology(name: str, scores: np.ndarray, labels: np.ndarray, rule: SkillRule,
                        tested: int = 1) -> PathologyCalibration:
    """Measure and fit one pathology (`tested`: how many pathologies are decided together)."""
    labels = np.asarray(labels, dtype=bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    value = auroc(scores, labels)
    resampled = bootstrap_aurocs(scores, labels, rule.resamples, rule.seed) if value is not None else np.array([])
    if value is None or len(resampled) < rule.resamples // 2:
        return PathologyCalibration(name, pos, neg, value, None, None, False,
                                    "not measurable: too few positives or negatives in the data set")
    low, high = percentile_interval(resampled, 0.95)
    level = 1 - 0.05 / tested if rule.family_wise else 0.95
    decision_low, _ = percentile_interval(resampled, level)
    measured = f"AUROC {value:.2f} (95% CI {low:.2f}-{high:.2f}) on {pos} positives"
    if pos < rule.min_positives:
        assessed, reason = False, f"{pos} positives, fewer than the {rule.min_positives} needed ({measured})"
    elif decision_low <= rule.min_auroc_lower:
        assessed, reason = False, (f"{measured}: not shown better than chance (lower bound "
                                   f"{decision_low:.2f} of the {level:.1%} interval, {tested} pathologies tested)")
    else:
        assessed, reason = True, measured
    xs, ys = fit_isotonic(scores, labels)
    raw_t, sens, spec = youden_threshold(scores, labels)
    calibrated = cross_fitted(scores, labels, folds=5, seed=rule.seed) if len(scores) >= 10 \
        else np.interp(scores, xs, ys)
    return PathologyCalibration(
        name, pos, neg, value, low, high, assessed, reason, decision_low=decision_low,
        threshold=float(np.interp(raw_t, xs, ys)),
        raw_threshold=raw_t, sensitivity=sens, specificity=spec,
        ece_raw=expected_calibration_error(np.clip(scores, 0, 1), labels),
        ece_calibrated=expected_calibration_error(calibrated, labels), knots_x=xs, knots_y=ys)


def calibrate(scores: np.ndarray, labels: np.ndarray, pathologies: list[str], rule: SkillRule, *,
              model_identity: str, model_name: str, dataset: dict, created: str = "") -> Calibration:
    """Calibrate every pathology: `scores` and `labels` are (images, pathologies)."""
    per = {p: calibrate_pathology(p, scores[:, j], labels[:, j], rule, tested=len(pathologies))
           for j, p in enumerate(pathologies)}
    return Calibration(model_identity, model_name, dataset, rule, per, created=created)


def calibrate_applicability(shares: np.ndarray, chest: np.ndarray, rule: SkillRule,
                            views: list[tuple[str, str]] = ()) -> ApplicabilityCalibration:
    """Measure the chest-radiograph check: `shares` are the model's zero-shot shares for "chest radiograph",
    `chest` the truth from metadata; `views` (stated view, guessed view) pairs of chest radiographs. Assessed
    when both classes have `rule.min_positives` images and the AUROC's 95% interval lies above
    `rule.min_auroc_lower` (one test: no family-wise widening)."""
    chest = np.asarray(chest, dtype=bool)
    pos, neg = int(chest.sum()), int((~chest).sum())
    confusion: dict[str, dict[str, int]] = {}
    for stated, guessed in views:
        confusion.setdefault(stated, {}).setdefault(guessed, 0)
        confusion[stated][guessed] += 1
    right = sum(1 for stated, guessed in views if stated == guessed)
    view_low, view_high = wilson_interval(right, len(views)) if views else (None, None)
    view_fields = dict(views=len(views), views_correct=right, view_low=view_low, view_high=view_high,
                       view_confusion=confusion)
    value = auroc(shares, chest)
    resampled = bootstrap_aurocs(shares, chest, rule.resamples, rule.seed) if value is not None else np.array([])
    if value is None or len(resampled) < rule.resamples // 2:
        return ApplicabilityCalibration(pos, neg, value, None, None, False, "not measurable: the data set needs "
                                        "both chest radiographs and other images", **view_fields)
    low, high = percentile_interval(resampled, 0.95)
    measured = f"AUROC {value:.2f} (95% CI {low:.2f}-{high:.2f}) on {pos} chest radiographs and {neg} others"
    if min(pos, neg) < rule.min_positives:
        assessed, reason = False, f"fewer than {rule.min_positives} images of one class ({measured})"
    elif low <= rule.min_auroc_lower:
        assessed, reason = False, f"{measured}: not shown better than chance"
    else:
        assessed, reason = True, measured
    xs, ys = fit_isotonic(shares, chest)
    decided = (cross_fitted(shares, chest, folds=5, seed=rule.seed) if len(shares) >= 10
               else np.interp(shares, xs, ys)) >= 0.5
    sensitivity = float((decided & chest).sum() / pos)
    specificity = float((~decided & ~chest).sum() / neg)
    return ApplicabilityCalibration(pos, neg, value, low, high, assessed, reason, sensitivity, specificity,
                                    xs, ys, **view_fields)


def save(calibration: Calibration, path: str | Path) -> None:
    """Write `calibration.json`."""
    Path(path).write_text(json.dumps(calibration.to_dict(), indent=1) + "\n", encoding="utf-8")


def load(path: str | Path, model_identity: str | None = None) -> Calibration:
    """Read a calibration; DataError when unreadable, of another version, or (given `model_identity`)
    made for another model."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("version") != FORMAT_VERSION:
            raise DataError(f"{path}: calibration format {raw.get('version')!r}, this RadLens reads {FORMAT_VERSION}")
        calibration = Calibration(
            raw["model_identity"], raw.get("model_name", ""), raw.get("dataset", {}), SkillRule(**raw["rule"]),
            {p: PathologyCalibration(**c) for p, c in raw["pathologies"].items()}, created=raw.get("created", ""),
            applicability=ApplicabilityCalibration(**raw["applicability"]) if raw.get("applicability") else None)
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read calibration {path}: {exc}") from None
    if model_identity is not None and calibration.model_identity != model_identity:
        raise DataError(f"{path} calibrates another model ({calibration.model_name or 'unknown'}, identity "
                        f"{calibration.model_identity[:12]}), not this one ({model_identity[:12]}): run "
                        "`radlens calibrate` for this model")
    return calibration


CALIBRATION_FILE = "calibration.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def model_identity(encoder) -> str:
    """What a calibration is tied to: the weights (a local model's weight files by content, a hub model by
    id and revision) and the adapter's hash. Precision and device are not part of it: bf16 and fp32 runs
    of one model share its calibration. Computed once per encoder."""
    import hashlib

    cached = encoder.__dict__.get("_calibration_identity")
    if cached:
        return cached
    digest = hashlib.sha256()
    folder = Path(encoder.model_name)
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
                digest.update(path.relative_to(folder).as_posix().encode())
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
    else:
        digest.update(f"hub:{encoder.model_name}@{encoder.revision or 'unresolved'}".encode())
    digest.update(f"adapter:{encoder.adapter_hash or 'none'}".encode())
    encoder.__dict__["_calibration_identity"] = identity = digest.hexdigest()
    return identity


def for_encoder(encoder, explicit: str | Path | None = None) -> Calibration | None:
    """The calibration that applies to `encoder`: `explicit` (a file; another model's is a DataError), else
    `calibration.json` inside a local model directory when it matches this model (with an adapter it
    does not: the adapter changed the model), else None (uncalibrated)."""
    if explicit:
        return load(explicit, model_identity(encoder))
    beside = Path(encoder.model_name) / CALIBRATION_FILE
    if not beside.is_file():
        return None
    try:
        return load(beside, model_identity(encoder))
    except DataError:
        return None

