"""Charts of zero-shot results (PNG or SVG bytes), drawn with matplotlib's Agg backend: probability bars,
a category heatmap (categories x ensemble members) and a top-findings summary card."""

from __future__ import annotations

import io

import numpy as np

from cxrmodel.labels.prompts import CATEGORIES
from cxrmodel.labels.zeroshot import LabelScore

FORMATS = ("png", "svg")
TITLE_NOTE = "(not for clinical use)"


def _figure(width: float, height: float, rows: int = 1, cols: int = 1):
    """(pyplot, figure, axes): one axis, or a rows x cols array of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(rows, cols, figsize=(width, height), dpi=110, squeeze=rows == cols == 1)


def _check(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"chart format must be one of {FORMATS}")


def _save(plt, fig, fmt: str) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    plt.close(fig)
    return buf.getvalue()


def probability_chart(scores: list[LabelScore], fmt: str = "png", threshold: float | None = None) -> bytes:
    """Horizontal bars of the pathology probabilities, whiskers over their range across the preprocessing
    ensemble, and thresholds."""
    _check(fmt)
    plt, fig, ax = _figure(6.5, 4.8)
    ordered = sorted((s for s in scores if s.assessed), key=lambda s: s.probability)
    if not ordered:  # nothing this model may report: say so instead of drawing raw scores as probabilities
        ax.axis("off")
        ax.text(0.5, 0.5, "No pathology is assessed by this model\n(see its calibration)", ha="center",
                va="center", fontsize=11, transform=ax.transAxes)
        return _save(plt, fig, fmt)
    probs = [s.probability for s in ordered]
    limits = [threshold if threshold is not None else s.threshold for s in ordered]
    colours = ["#c0392b" if p >= t else "#2c7fb8" for p, t in zip(probs, limits, strict=True)]
    below_above = [[s.probability - s.spread_range[0] for s in ordered],
                   [s.spread_range[1] - s.probability for s in ordered]]
    ax.barh([s.pathology.replace("_", " ") for s in ordered], probs, xerr=below_above, color=colours, ecolor="#555",
            capsize=2)
    for y, t in enumerate(limits):
        ax.plot([t, t], [y - 0.4, y + 0.4], color="black", lw=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("calibrated probability (bar), range across preprocessings (whisker), threshold (tick)")
    ax.set_title(f"RadLens zero-shot findings {TITLE_NOTE}", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, fmt)


def category_matrix(scores: list[LabelScore]) -> tuple[list[str], list[str], np.ndarray]:
    """(categories, ensemble members, mean member probability per category) -- the heatmap's data."""
    by_name = {s.pathology: s for s in scores}
    members = sorted({m for s in scores for m in s.members})
    categories = [c for c, names in CATEGORIES.items() if any(n in by_name for n in names)]
    matrix = np.array([[np.mean([by_name[n].members.get(m, by_name[n].probability)
                                 for n in CATEGORIES[c] if n in by_name]) for m in members] for c in categories])
    return categories, members, matrix


def category_heatmap(scores: list[LabelScore], fmt: str = "png") -> bytes:
    """Heatmap of categories x ensemble members (preprocessing variant / prompt set)."""
    _check(fmt)
    categories, members, matrix = category_matrix(scores)
    plt, fig, ax = _figure(max(6.0, 0.45 * len(members) + 2.5), 0.55 * len(categories) + 2.2)
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(members)), [m.replace("/", "\n") for m in members], fontsize=7)
    ax.set_yticks(range(len(categories)), categories, fontsize=9)
    for i in range(len(categories)):
        for j in range(len(members)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if matrix[i, j] < 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.03)
    ax.set_title(f"Category x ensemble member: raw scores, not probabilities {TITLE_NOTE}", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, fmt)


def summary_card(scores: list[LabelScore], decision=None, fmt: str = "png", top: int = 3) -> bytes:
    """A card with the applicability decision and the top findings (`summary_lines` as a picture)."""
    _check(fmt)
    plt, fig, ax = _figure(4.8, 2.6)
    ax.axis("off")
    lines = summary_lines(scores, decision, top)
    for i, line in enumerate(lines):
        ax.text(0.02, 0.92 - i * 0.17, line, transform=ax.transAxes, fontsize=10 if i else 11,
                weight="bold" if i == 0 else "normal")
    fig.patch.set_facecolor("#f4f6f8")
    return _save(plt, fig, fmt)


def summary_lines(scores: list[LabelScore], decision=None, top: int = 3) -> list[str]:
    """The summary card's text: title, applicability and its basis, then the top assessed findings (also
    the card's text alternative on the page)."""
    lines = ["RadLens summary " + TITLE_NOTE]
    if decision is not None:
        state = "chest radiograph" + (f" ({decision.view})" if decision.view else "") if decision.applicable \
            else "labels not applicable"
        lines.append(f"{state}; from {decision.basis()}")
    if decision is not None and not decision.applicable:
        lines.append(decision.reason)
    elif not any(s.assessed for s in scores):
        lines.append("no pathology is assessed by this model:")
        lines.append("no finding is reported (see its calibration)")
    else:
        for s in sorted((s for s in scores if s.assessed), key=lambda s: -s.probability)[:top]:
            flag = "above" if s.positive else "below"
            low, high = s.spread_range
            lines.append(f"{s.pathology.replace('_', ' ')}: p={s.probability:.2f} ({low:.2f}-{high:.2f}; "
                         f"{flag} {s.threshold:.2f})")
    return lines


def reliability_png(curves: dict[str, tuple], assessed: dict[str, bool]) -> bytes:
    """Reliability diagram per pathology: observed positive rate against the raw score (grey) and the
    cross-fitted calibrated probability (blue), from `calibration.reliability_bins` tuples."""
    names = list(curves)
    cols = 4
    rows = max(1, -(-len(names) // cols))
    plt, fig, axes = _figure(3 * cols, 2.8 * rows, rows, cols)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names, strict=False):
        (raw_x, raw_y, _), (cal_x, cal_y, _) = curves[name]
        ax.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=0.8)
        ax.plot(raw_x, raw_y, "o-", color="#888888", markersize=3, label="raw score")
        ax.plot(cal_x, cal_y, "o-", color="#1f5fa8", markersize=3, label="calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name.replace('_', ' ')} ({'assessed' if assessed.get(name) else 'not assessed'})", fontsize=8)
        ax.tick_params(labelsize=6)
    if names:
        axes.ravel()[0].legend(fontsize=6, loc="upper left")
    else:
        axes.ravel()[0].text(0.5, 0.5, "nothing measurable: no label with both classes", ha="center", fontsize=8)
    fig.suptitle(f"Reliability: observed rate vs predicted {TITLE_NOTE}", fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, "png")
