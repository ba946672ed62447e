"""Charts of zero-shot scores (PNG or SVG bytes), drawn with matplotlib's Agg backend."""

from __future__ import annotations

import io

from .zeroshot import LabelScore

FORMATS = ("png", "svg")


def probability_chart(scores: list[LabelScore], fmt: str = "png", threshold: float | None = None) -> bytes:
    """Horizontal bars of the pathology probabilities with uncertainty whiskers and thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if fmt not in FORMATS:
        raise ValueError(f"chart format must be one of {FORMATS}")
    ordered = sorted(scores, key=lambda s: s.probability)
    names = [s.pathology.replace("_", " ") for s in ordered]
    probs = [s.probability for s in ordered]
    limits = [threshold if threshold is not None else s.threshold for s in ordered]
    colours = ["#c0392b" if p >= t else "#2c7fb8" for p, t in zip(probs, limits)]
    fig, ax = plt.subplots(figsize=(6.5, 4.8), dpi=110)
    ax.barh(names, probs, xerr=[s.uncertainty / 2 for s in ordered], color=colours, ecolor="#555", capsize=2)
    for y, t in enumerate(limits):
        ax.plot([t, t], [y - 0.4, y + 0.4], color="black", lw=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("zero-shot probability (bar), ensemble spread (whisker), threshold (tick)")
    ax.set_title("RadLens zero-shot findings (not for clinical use)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    plt.close(fig)
    return buf.getvalue()
