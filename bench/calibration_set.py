"""The labelled images the bundled radlens-mini was not trained on, as a manifest for `radlens calibrate`.

    python -m bench.calibration_set [--out bench-out/calibration-set.csv]

radlens-mini was trained on the dev corpus as it was then (873 images: the NIH films of
jrzech/reproduce-chexnet, the COVID collection and the brain MRIs; MODEL_CARD.md). The corpus has since
grown by 765 NIH films from two other copies of ChestX-ray14. This writes those of them whose patient
has no film in the training-era part, with their 14-pathology labels: patient-disjoint from training.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from bench.common import CORPUS, require

TRAINING_ERA_SOURCES = ("jrzech/reproduce-chexnet", "hida6/covid-chestxray-dataset", "nanonane/RCS-YOLO")


def calibration_rows(manifest: Path) -> list[dict]:
    """NIH rows from sources added after training, of patients absent from the training-era sources."""
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    seen = {r["patient_id"] for r in rows if r["source_repo"].startswith(TRAINING_ERA_SOURCES)}
    return [r for r in rows if r["id"].startswith("nih_") and not r["source_repo"].startswith(TRAINING_ERA_SOURCES)
            and r["patient_id"] not in seen and r["labels"].strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out/calibration-set.csv"))
    args = p.parse_args(argv)
    manifest = require(CORPUS / "manifest.csv", "the shared dev corpus")
    rows = calibration_rows(manifest)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "patient_id", "width"])
        for r in rows:
            writer.writerow([str((manifest.parent / r["file"]).resolve()), r["labels"], r["patient_id"], r["width"]])
    print(f"wrote {args.out}: {len(rows)} NIH films of {len({r['patient_id'] for r in rows})} patients "
          "not in radlens-mini's training-era corpus")


if __name__ == "__main__":
    main()
