"""The images the bundled radlens-mini was neither trained nor chosen on, as a manifest for `radlens calibrate`.

    python -m bench.calibration_set [--seed 0] [--out bench-out/calibration-set.csv]

radlens-mini (2026-12-02) was trained on `bench.quality.grown_split`'s training part (seed 0) and chosen
among configurations on its validation part; this writes the test part: 297 images of 147 patients, none
seen in either. Its NIH films keep their 14-pathology labels; the other images (COVID X-ray and CT, brain
MRI) keep their modality, anatomy and view for the chest-radiograph check, without labels (the COVID
`labels` map a cause to Pneumonia, which is not the NIH labelling).

`TRAINING_ERA_SOURCES` and `HELD_OUT_FRACTION`/`HELD_OUT_SEED` describe the radlens-mini before it (trained
on the 873-image corpus less a 20% patient split): `grown_split` keeps its training patients in training so
that the test part is unseen by both models and "before" figures stay comparable.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from bench.common import CORPUS, require

TRAINING_ERA_SOURCES = ("jrzech/reproduce-chexnet", "hida6/covid-chestxray-dataset", "nanonane/RCS-YOLO")
HELD_OUT_FRACTION, HELD_OUT_SEED = 0.2, 0  # bench.quality's split when radlens-mini was exported


def calibration_rows(manifest: Path, seed: int = 0) -> list[dict]:
    """`grown_split`'s test part of the manifest; labels kept on NIH rows only."""
    from bench.quality import grown_split

    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    _, _, test = grown_split(rows, seed)
    return [{**r, "labels": r["labels"] if r["id"].startswith("nih_") else ""} for r in test]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out/calibration-set.csv"))
    p.add_argument("--seed", type=int, default=0, help="bench.quality's split seed")
    args = p.parse_args(argv)
    manifest = require(CORPUS / "manifest.csv", "the shared dev corpus")
    rows = calibration_rows(manifest, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "modality", "anatomy", "view", "patient_id", "width"])
        for r in rows:
            writer.writerow([str((manifest.parent / r["file"]).resolve()), r["labels"], r["modality"], r["anatomy"],
                             r["view"], r["patient_id"], r["width"]])
    labelled = [r for r in rows if r["labels"].strip()]
    print(f"wrote {args.out}: {len(rows)} images of {len({r['patient_id'] or r['id'] for r in rows})} patients "
          f"radlens-mini was not trained on; {len(labelled)} NIH films with labels")


if __name__ == "__main__":
    main()
