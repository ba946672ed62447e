"""Relevance verdicts (`search/relevance.py`) on the dev corpus: how often a query gets the right one.

    python -m bench.relevance [--data-dir bench-out/relevance-index]

Indexes ../shared/corpus with the bundled radlens-mini (once; reused), then runs text queries that have
relevant images in it (chest X-ray views, chest CT, brain MRI) and queries whose content it does not
hold (spine, limbs, head and abdominal CT, ...). Right verdict: a query with relevant images gets a
`strong` or `weak` top hit; a query without gets `none`. Image queries: held-in images of each modality
(their nearest neighbour is another image, so they should be `strong`) and generated out-of-distribution
pictures (noise, gradients, photographs: `none`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import CORPUS, require, table

WITH_RELEVANT = ("lateral chest radiograph", "PA chest radiograph", "AP supine chest x-ray", "frontal chest x-ray",
                 "chest x-ray", "axial CT of the chest", "coronal CT of the chest", "CT scan", "MRI of the brain",
                 "brain tumour", "chest radiograph with pleural effusion", "portable chest film")
WITHOUT = ("lateral lumbar spine", "knee x-ray", "hand radiograph", "head CT", "abdominal CT", "pelvis x-ray",
           "mammogram", "ultrasound of the liver", "foot x-ray", "shoulder MRI", "dental panoramic radiograph",
           "wrist fracture")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("bench-out/relevance-index"))
    args = p.parse_args(argv)
    from cxrmodel.model.encoder import EncoderConfig, load_encoder
    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig

    manifest = require(CORPUS / "manifest.csv", "the shared dev corpus")
    encoder = load_encoder(EncoderConfig(model="radlens-mini"))
    run_index(IndexJob(sources=[str(manifest)], data_dir=args.data_dir, progress=False), encoder)
    engine = Engine.open(EngineConfig(data_dir=args.data_dir), encoder=encoder)
    rows, right = [], {"with": 0, "without": 0}
    for kind, queries in (("with", WITH_RELEVANT), ("without", WITHOUT)):
        for q in queries:
            top = engine.text(q, k=1)[0]
            ok = (top.match.verdict != "none") if kind == "with" else (top.match.verdict == "none")
            right[kind] += ok
            rows.append([q, "relevant images" if kind == "with" else "none in corpus", f"{top.score:.3f}",
                         top.match.verdict, f"{top.match.percentile:.2f}", "yes" if ok else "NO"])
    print(table(["text query", "corpus holds", "top score", "verdict", "null share below", "right"], rows))
    print(f"right verdicts: {right['with']}/{len(WITH_RELEVANT)} queries with relevant images, "
          f"{right['without']}/{len(WITHOUT)} without")
    image_rows = _image_queries(engine)
    print(table(["image query", "expected", "top score", "verdict", "right"], image_rows))
    engine.close()


def _image_queries(engine) -> list[list]:
    import csv

    from PIL import Image

    from bench.ood import negatives

    with open(CORPUS / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    picks = {}
    for r in rows:
        picks.setdefault((r["modality"], r["view"] or "-"), r)
    out = []
    for (modality, view), r in sorted(picks.items())[:8]:  # a re-acquisition: rotated 7 degrees, cropped 85%
        image = Image.open(CORPUS / r["file"]).convert("L").rotate(7, resample=Image.Resampling.BILINEAR)
        w, h = image.size
        image = image.crop((int(w * 0.075), int(h * 0.075), int(w * 0.925), int(h * 0.925)))
        top = engine.image(image, k=1)[0]
        out.append([f"{modality} {view} ({r['id'][:18]}), rotated+cropped", "strong", f"{top.score:.3f}",
                    top.match.verdict, "yes" if top.match.verdict == "strong" else "NO"])
    for name, image in list(negatives().items())[:10]:
        top = engine.image(image, k=1)[0]
        right = "yes" if top.match.verdict == "none" else "NO"
        out.append([name, "none", f"{top.score:.3f}", top.match.verdict, right])
    return out


if __name__ == "__main__":
    main()
