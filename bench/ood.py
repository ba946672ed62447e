"""Out-of-distribution gate (`cxrmodel/imaging/plausibility.py`): how often it calls a real radiological
image "not a radiological image", and how often it catches what is not one.

    python -m bench.ood

Positives: every image of the shared dev corpus (X-ray, CT, MRI). Negatives: generated noise, flat
colours, gradients, text, and scikit-image's bundled photographs (colour and grayscale).
"""

from __future__ import annotations

import csv

from PIL import Image

from bench.common import CORPUS, require, table


def negatives() -> dict[str, Image.Image]:
    """Generated and photographic images that are not radiological."""
    import skimage.data as data

    from tests.test_plausibility import SYNTHETIC

    photos = {name: Image.fromarray(getattr(data, name)()) for name in (
        "astronaut", "coffee", "chelsea", "rocket", "retina", "logo", "hubble_deep_field", "grass", "brick",
        "camera", "coins", "moon", "page", "horse", "text")}
    photos["motorcycle"] = Image.fromarray(data.stereo_motorcycle()[0])
    return {**SYNTHETIC, **photos}


def main() -> None:
    from cxrmodel.imaging.plausibility import assess

    manifest = require(CORPUS / "manifest.csv", "the shared dev corpus")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    flagged = {}
    for row in rows:
        verdict = assess(Image.open(CORPUS / row["file"]))
        if not verdict.radiological:
            flagged[row["id"]] = verdict.reason
    by_modality: dict[str, list[int]] = {}
    for row in rows:
        by_modality.setdefault(row["modality"], [0, 0])[0] += 1
        by_modality[row["modality"]][1] += row["id"] in flagged
    print("Real radiological images called 'not a radiological image' (false alarms):")
    print(table(["modality", "images", "flagged"], [[m, n, f] for m, (n, f) in sorted(by_modality.items())]))
    for image_id, reason in list(flagged.items())[:10]:
        print(f"  {image_id}: {reason}")
    results = [[name, "caught" if not (v := assess(im)).radiological else "MISSED", v.reason]
               for name, im in negatives().items()]
    caught = sum(r[1] == "caught" for r in results)
    print(f"\nNot radiological: {caught} of {len(results)} caught")
    print(table(["image", "verdict", "reason"], results))
    print(f"\nfalse alarms on the corpus: {len(flagged)} of {len(rows)}")


if __name__ == "__main__":
    main()
