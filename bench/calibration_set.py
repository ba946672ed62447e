"""The images the bundled radlens-mini was not trained on, as a manifest for `radlens calibrate`.

    python -m bench.calibration_set [--out bench-out/calibration-set.csv]

radlens-mini was trained on the dev corpus as it was then (873 images: the NIH films of
jrzech/reproduce-chexnet, the COVID collection and the brain MRIs; MODEL_CARD.md), less the 166 images
of the 141 patients `bench.quality` held out (its patient split, seed 0, 20%). The corpus has since grown
by 765 NIH films from two other copies of ChestX-ray14. This writes, patient-disjoint from training:
- those new NIH films whose patient has no image in the training-era part, with their 14-pathology labels;
- the held-out training-era images (NIH, COVID X-ray and CT, brain MRI) with their modality, anatomy and
  view, for the chest-radiograph check; only their NIH rows carry labels (the COVID `labels` map a cause
  to Pneumonia, which is not the NIH labelling).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from bench.common import CORPUS, require

TRAINING_ERA_SOURCES = ("jrzech/reproduce-chexnet", "hida6/covid-chestxray-dataset", "nanonane/RCS-YOLO")
HELD_OUT_FRACTION, HELD_OUT_SEED = 0.2, 0  # bench.quality's split when radlens-mini was exported


def calibration_rows(manifest: Path) -> list[dict]:
    """NIH rows from sources added after training, of patients absent from the training-era sources; then
    the training-era rows `bench.quality` held out from training."""
    from bench.quality import split_by_patient

    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    era = [r for r in rows if r["source_repo"].startswith(TRAINING_ERA_SOURCES)]
    seen = {r["patient_id"] for r in era}
    _, held = split_by_patient(era, HELD_OUT_FRACTION, HELD_OUT_SEED)
    new = [r for r in rows if r["id"].startswith("nih_") and not r["source_repo"].startswith(TRAINING_ERA_SOURCES)
           and r["patient_id"] not in seen and r["labels"].strip()]
    return new + [{**r, "labels": r["labels"] if r["id"].startswith("nih_") else ""} for r in held]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out/calibration-set.csv"))
    args = p.parse_args(argv)
    manifest = require(CORPUS / "manifest.csv", "the shared dev corpus")
    rows = calibration_rows(manifest)
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
