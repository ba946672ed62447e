"""How much pathology signal the dev corpus's NIH films carry at all: a linear probe on raw pixels.

    python -m bench.pixel_probe [--side 32]

Each NIH film is shrunk to SIDE x SIDE gray pixels, standardised per image, and a logistic regression
(L2, C=0.01) is scored by 5-fold cross-validation grouped by patient; AUROC per pathology with its
positives. No model, no training of RadLens: a reference for what `bench.quality`'s trained models
could reach on these labels and resolutions (699 of the films are 64 px copies).
"""

from __future__ import annotations

import argparse
import csv

import numpy as np
from PIL import Image

from bench.common import CORPUS, require, table
from cxrmodel.constants import PATHOLOGIES


def main(argv: list[str] | None = None) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=32)
    args = p.parse_args(argv)
    manifest = require(CORPUS / "manifest.csv", "the shared dev corpus")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["id"].startswith("nih_")]
    x = np.stack([np.asarray(Image.open(CORPUS / r["file"]).convert("L").resize((args.side, args.side),
                                                                                 Image.BILINEAR), np.float32).ravel()
                  for r in rows])
    x = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-6)
    groups = [r["patient_id"] for r in rows]
    out = []
    for pathology in PATHOLOGIES:
        y = np.array([pathology in r["labels"].split(";") for r in rows])
        scores = np.zeros(len(rows))
        for train, test in GroupKFold(5).split(x, y, groups):
            scores[test] = LogisticRegression(C=0.01, max_iter=2000).fit(x[train], y[train]).decision_function(x[test])
        out.append([pathology, int(y.sum()), round(float(roc_auc_score(y, scores)), 3)])
    print(f"linear probe on {args.side}x{args.side} pixels, {len(rows)} NIH films, 5 folds grouped by patient")
    print(table(["pathology", "positives", "AUROC"], out))


if __name__ == "__main__":
    main()
