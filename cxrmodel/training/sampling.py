"""Class-balanced sampling: repeat factor sampling (Gupta et al., LVIS, CVPR 2019).

A pair whose rarest label is carried by a fraction f of the labelled pairs is drawn
max(1, sqrt(threshold / f)) times as often as a pair of common labels, so rare findings are seen
more often without the many-fold repetition (and overfitting) of full inverse-frequency weights.
Pairs without labels keep factor 1.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def repeat_factors(label_sets: Sequence[Sequence[str]], threshold: float) -> list[float]:
    """One sampling weight per pair: max over its labels of max(1, sqrt(threshold / label frequency)).

    Labels are compared case-insensitively; frequencies are over the pairs that carry any label."""
    if threshold <= 0:
        return [1.0] * len(label_sets)
    sets = [{label.strip().lower() for label in labels if label.strip()} for labels in label_sets]
    labelled = sum(1 for s in sets if s)
    if not labelled:
        return [1.0] * len(label_sets)
    counts = Counter(label for s in sets for label in s)
    factor = {label: max(1.0, math.sqrt(threshold / (n / labelled))) for label, n in counts.items()}
    return [max((factor[label] for label in s), default=1.0) for s in sets]
