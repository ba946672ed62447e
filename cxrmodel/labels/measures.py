"""Measures of how well a score separates two classes and how well it is calibrated: pure functions on
arrays (AUROC and its bootstrap interval, isotonic maps, Youden's threshold, reliability bins, ECE, a
binomial interval). `calibration` builds on them for pathologies and for the chest-radiograph check."""

from __future__ import annotations

import numpy as np


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
    """Knots of a non-decreasing map from raw score to positive rate: isotonic regression, each pooled block's
    rate then shrunk towards the overall rate (positives + 2 * base rate) / (images + 2), so that a finite
    sample never yields a probability of exactly 0 or 1, and a block of a few images moves little from the
    base rate."""
    from sklearn.isotonic import IsotonicRegression

    labels = np.asarray(labels, dtype=float)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels)
    fitted = iso.predict(scores)
    base = float(labels.mean()) if len(labels) else 0.5
    smoothed = {}
    for level in np.unique(fitted):
        block = fitted == level
        smoothed[float(level)] = (labels[block].sum() + 2 * base) / (block.sum() + 2)
    ys = [smoothed.get(float(y), float(y)) for y in iso.y_thresholds_]
    return [float(x) for x in iso.X_thresholds_], [float(y) for y in np.maximum.accumulate(ys)]


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


def reliability_curves(scores: np.ndarray, labels: np.ndarray, seed: int, folds: int = 5) -> tuple:
    """Reliability bins of the raw score (clipped to [0, 1]) and of its cross-fitted calibrated probability:
    the two curves of one panel of the reliability diagram."""
    return (reliability_bins(np.clip(scores, 0, 1), labels),
            reliability_bins(cross_fitted(scores, labels, folds, seed), labels))


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a binomial proportion; (0, 1) without trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))

