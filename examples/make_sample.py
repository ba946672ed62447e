"""Rebuild radlens/samples/ (the demo's bundled images) from the shared dev corpus: every modality and view,
open licences first.

    python examples/make_sample.py [--corpus ../shared/corpus]

Deterministic: rows are taken in id order, at most one per patient while that is possible, from the
most permissive licence available for each (modality, view).
"""

from __future__ import annotations

import argparse
import csv
import shutil
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "radlens" / "samples"
# (modality, view) -> how many images
QUOTA = {("X-ray", "PA"): 18, ("X-ray", "AP"): 11, ("X-ray", "AP supine"): 8, ("X-ray", "lateral"): 7,
         ("X-ray", ""): 3, ("CT", "axial"): 6, ("CT", "coronal"): 4, ("MRI", ""): 15}


def licence_rank(licence: str) -> int:
    """Lower is more permissive: public domain-like, CC BY, CC BY-SA, then NC/SA terms."""
    text = licence.upper()
    if "NO RESTRICTIONS" in text:
        return 0
    if "NC" in text:
        return 3
    if "SA" in text:
        return 2
    return 1


def pick(rows: list[dict], n: int) -> list[dict]:
    """n rows, most permissive licence first, spreading over patients and labels."""
    rows = sorted(rows, key=lambda r: (licence_rank(r["license"]), r["id"]))
    chosen, patients, labels = [], set(), set()
    for strict in (True, False):
        for row in rows:
            if len(chosen) == n:
                return chosen
            key = row["labels"] or row["source_label"]
            if row in chosen or (strict and (row["patient_id"] in patients or key in labels and len(labels) < 8)):
                continue
            chosen.append(row)
            patients.add(row["patient_id"])
            labels.add(key)
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, default=HERE.parents[1] / "shared" / "corpus")
    args = parser.parse_args()
    with open(args.corpus / "manifest.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    groups = defaultdict(list)
    for row in rows:
        groups[(row["modality"], row["view"])].append(row)
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "images").mkdir(parents=True)
    chosen = [r for key, n in QUOTA.items() for r in pick(groups[key], n)]
    with open(OUT / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "modality", "body_part", "view", "caption", "labels", "source"])
        for r in chosen:
            name = Path(r["file"]).name
            shutil.copy2(args.corpus / r["file"], OUT / "images" / name)
            writer.writerow([f"images/{name}", r["modality"], r["anatomy"], r["view"], r["caption"],
                             r["labels"], r["source_repo"]])
    lines = ["# Licences of the sample images", "",
             "Every image is copied unchanged from the RadLens dev corpus, which took pixels and text verbatim "
             "from public sources. Open licences were preferred; lateral views, CT and some X-rays exist there "
             "only under CC BY-NC-SA terms, and are marked so. NIH ChestX-ray14: cite Wang et al., CVPR 2017 and "
             "acknowledge the NIH Clinical Center.", "",
             "| file | modality | view | source | source path | licence |", "|---|---|---|---|---|---|"]
    for r in chosen:
        lines.append(f"| images/{Path(r['file']).name} | {r['modality']} | {r['view'] or '-'} | {r['source_repo']} "
                     f"| {r['source_path']} | {r['license']} |")
    (OUT / "LICENSES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(chosen)} images to {OUT} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
