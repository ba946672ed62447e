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
class Calibration:
    """A model's calibration: per-pathology measurements, the rule, and what it was measured on."""

    model_identity: str
    model_name: str
    dataset: dict
    rule: SkillRule
    pathologies: dict[str, PathologyCalibration]
    created: str = ""
    version: int = FORMAT_VERSION

    @property
    def assessed(self) -> list[str]:
        """Pathologies with demonstrated skill."""
        return [p for p, c in self.pathologies.items() if c.assessed]

    def to_dict(self) -> dict:
        return {"version": self.version, "model_identity": self.model_identity, "model_name": self.model_name,
                "created": self.created, "dataset": self.dataset, "rule": asdict(self.rule),
                "pathologies": {p: asdict(c) for p, c in self.pathologies.items()}}


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None without both classes."""
    labels = np.asarray(labels, dtype=bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def bootstrap_aurocs(scores: np.ndarray, labels: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """AUROCs of `resamples` bootstrap resamples of the images (seeded; resamples without both classes dropped)."""
    rng = np.random.default_rng(seed)
    n = len(scores)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        value = auroc(scores[idx], labels[idx])
        if value is not None:
            values.append(value)
    return np.asarray(values)


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap values."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Weighted mean |observed rate - mean probability| over equal-width probability bins."""
    predicted, observed, counts = reliability_bins(probs, labels, bins)
    total = sum(n * abs(o - p) for p, o, n in zip(predicted, observed, counts, strict=True))
    return float(total / max(len(probs), 1))


def fit_isotonic(scores: np.ndarray, labels: np.ndarray) -> tuple[list[float], list[float]]:
    """Knots of a non-decreasing map from raw score to observed positive rate."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels.astype(float))
    return [float(x) for x in iso.X_thresholds_], [float(y) for y in iso.y_thresholds_]


def cross_fitted(scores: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's calibrated probability from a map fitted without it (k folds)."""
    order = np.random.default_rng(seed).permutation(len(scores))
    out = np.empty(len(scores))
    for k in range(folds):
        held = order[k::folds]
        train = np.setdiff1d(order, held)
        xs, ys = fit_isotonic(scores[train], labels[train])
        out[held] = np.interp(scores[held], xs, ys)
    return out


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(raw threshold, sensitivity, specificity) where sensitivity + specificity - 1 is largest."""
    labels = np.asarray(labels, dtype=bool)
    best = (float(np.max(scores)), 0.0, 1.0)
    best_j = -1.0
    for t in np.unique(scores):
        predicted = scores >= t
        sens = float((predicted & labels).sum() / labels.sum())
        spec = float((~predicted & ~labels).sum() / (~labels).sum())
        if sens + spec - 1 > best_j:
            best_j, best = sens + spec - 1, (float(t), sens, spec)
    return best


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
            {p: PathologyCalibration(**c) for p, c in raw["pathologies"].items()}, created=raw.get("created", ""))
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


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 10
                     ) -> tuple[list[float], list[float], list[int]]:
    """(mean predicted, observed rate, count) of every non-empty equal-width probability bin."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels, dtype=float)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    out: tuple[list[float], list[float], list[int]] = ([], [], [])
    for b in range(bins):
        mask = which == b
        if mask.any():
            out[0].append(float(probs[mask].mean()))
            out[1].append(float(labels[mask].mean()))
            out[2].append(int(mask.sum()))
    return out
