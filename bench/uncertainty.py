"""What a label's uncertainty is on real films: the bundled radlens-mini on the NIH films of its calibration set.

    python -m bench.uncertainty [--model radlens-mini]

For each pathology with at least 5 positives among the held-out films (`bench.calibration_set`), side by side:
- the spread as it was (2 SD of the raw score over every prompt x preprocessing member) and as it is now (2 SD of
  the prompt-ensemble value over the preprocessing views, through the calibration where the pathology is
  assessed), and how often a report would have called the finding borderline each way;
- the mean raw score of each prompt set, which is why their disagreement is not counted;
- whether the spread says anything about the error: Spearman's rho between spread and |label - value|, and the
  AUROC of the value on the films with the lower and the higher half of the spread.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from bench.common import require, table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="radlens-mini")
    p.add_argument("--calibration-set", type=Path, default=Path("bench-out/calibration-set.csv"),
                   help="written by `python -m bench.calibration_set`")
    args = p.parse_args(argv)
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from cxrmodel.imaging.decode import load_image
    from cxrmodel.labels.calibration import for_encoder
    from cxrmodel.labels.prompts import LabelConfig
    from cxrmodel.labels.zeroshot import apply_calibration, label_image
    from cxrmodel.model.bundled import resolve_alias
    from cxrmodel.model.config import EncoderConfig
    from cxrmodel.model.encoder import load_encoder

    with open(require(args.calibration_set, "the calibration set (python -m bench.calibration_set)"),
              newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["labels"].strip()]
    encoder = load_encoder(EncoderConfig(model=resolve_alias(args.model), precision="fp32"))
    calibration, config = for_encoder(encoder), LabelConfig()
    films = [(apply_calibration(label_image(encoder, load_image(r["path"]).model_input(encoder.preprocess), config),
                                calibration), set(r["labels"].replace(";", "|").split("|"))) for r in rows]
    out, sets = [], {}
    for j, name in enumerate(s.pathology for s in films[0][0]):
        scores = [f[0][j] for f in films]
        y = np.array([name in labels for _, labels in films], dtype=float)
        for s in scores:
            for member, value in s.members.items():
                if member.startswith("original/"):
                    sets.setdefault(member.split("/", 1)[1], {}).setdefault(name, []).append(value)
        if y.sum() < 5:
            continue
        value = np.array([s.probability for s in scores])
        before = np.array([2 * np.std(list(s.members.values())) for s in scores])
        now = np.array([s.uncertainty for s in scores])
        thr = np.array([s.threshold for s in scores])
        border_before = np.mean(np.abs(value - thr) < np.maximum(before, 0.05))
        border_now = np.mean([s.spread_range[0] < s.threshold <= s.spread_range[1] for s in scores])
        low = now <= np.median(now)
        halves = [roc_auc_score(y[m], value[m]) if 0 < y[m].sum() < m.sum() else float("nan") for m in (low, ~low)]
        out.append([name, "yes" if scores[0].assessed else "no", int(y.sum()), f"{before.mean():.2f}",
                    f"{now.mean():.3f}", f"{np.median(now):.3f}",
                    f"{border_before:.0%}" if scores[0].assessed else "", f"{border_now:.0%}" if scores[0].assessed
                    else "", f"{spearmanr(now, np.abs(y - value))[0]:+.2f}", f"{halves[0]:.2f} / {halves[1]:.2f}"])
    print(f"{len(films)} labelled films, model {args.model}")
    print(table(["pathology", "assessed", "positives", "spread before (mean)", "now (mean)", "now (median)",
                 "borderline before", "borderline now", "rho(spread, error)", "AUROC low / high spread"], out))
    print(table(["prompt set", "mean raw score, Effusion", "mean raw score, all 14"],
                [[k, f"{np.mean(v['Effusion']):.2f}", f"{np.mean([x for xs in v.values() for x in xs]):.2f}"]
                 for k, v in sets.items()]))


if __name__ == "__main__":
    main()
