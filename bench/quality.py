"""Learning on real images: train a dual encoder from scratch on the shared corpus, measure it held out.

    python -m bench.quality [--epochs 30] [--seed 0] [--out bench-out/quality] [--export-mini DIR]

Splits the corpus by patient (no patient on both sides), trains `radlens train --init scratch`
(new ViT + LoRA on the all-MiniLM-L6-v2 text tower) on composed captions plus the written ones, then
reports on the held-out part, before and after training: text->image retrieval for structured
queries, image->image precision@10 by modality/view, and zero-shot AUROC of the 14 pathologies on
the NIH rows, each next to its chance level. Deterministic for a seed. `--export-mini DIR` also writes
the trained model as RadLens's bundled offline model (see cxrmodel/assets/radlens-mini/MODEL_CARD.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import CORPUS, require, table
from cxrmodel.imaging.decode import load_image
from cxrmodel.labels.prompts import LabelConfig
from cxrmodel.model.dualencoder import ScratchSpec, build_scratch_model
from cxrmodel.model.encoder import Encoder, EncoderConfig, load_encoder
from cxrmodel.training.evaluate import neighbour_precision, query_retrieval, zero_shot_auroc
from cxrmodel.training.pairs import Pair
from cxrmodel.training.train import TrainConfig, train

CAPTION_TEMPLATE = "{view} {modality} of the {anatomy}: {labels}"

# query -> which held-out images are relevant, from the manifest's own modality/anatomy/view columns
STRUCTURED_QUERIES = {
    "lateral chest radiograph": lambda r: r["modality"] == "X-ray" and r["view"] == "lateral",
    "PA chest radiograph": lambda r: r["modality"] == "X-ray" and r["view"] == "PA",
    "AP supine chest x-ray": lambda r: r["modality"] == "X-ray" and r["view"] == "AP supine",
    "frontal chest x-ray": lambda r: r["modality"] == "X-ray" and r["view"] in ("PA", "AP", "AP supine"),
    "chest x-ray": lambda r: r["modality"] == "X-ray",
    "axial CT of the chest": lambda r: r["modality"] == "CT" and r["view"] == "axial",
    "coronal CT of the chest": lambda r: r["modality"] == "CT" and r["view"] == "coronal",
    "CT scan": lambda r: r["modality"] == "CT",
    "MRI of the brain": lambda r: r["modality"] == "MRI",
    "brain tumour": lambda r: r["modality"] == "MRI",
}


def split_by_patient(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out share of patients; every image of a patient lands on one side."""
    patients = sorted({r["patient_id"] or r["id"] for r in rows})
    random.Random(seed).shuffle(patients)
    held = set(patients[: int(round(len(patients) * fraction))])
    return ([r for r in rows if (r["patient_id"] or r["id"]) not in held],
            [r for r in rows if (r["patient_id"] or r["id"]) in held])


def write_rows(rows: list[dict], path: Path, corpus: Path) -> Path:
    """A manifest with absolute image paths."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "file": str((corpus / row["file"]).resolve())})
    return path


def evaluate(encoder: Encoder, rows: list[dict], corpus: Path, labels: LabelConfig) -> dict:
    """All held-out figures for one encoder."""
    images = [load_image(corpus / r["file"]).image for r in rows]
    vecs = encoder.encode_images(images)
    queries = list(STRUCTURED_QUERIES)
    relevant = np.array([[STRUCTURED_QUERIES[q](r) for r in rows] for q in queries])
    qr = query_retrieval(encoder.encode_texts(queries), vecs, relevant)
    per_query = {q: m for q, m in zip(queries, qr["per_query"], strict=True)}
    classes = [f"{r['modality']}/{r['view'] or 'unstated'}" for r in rows]
    nih = [i for i, r in enumerate(rows) if r["id"].startswith("nih_")]
    nih_pairs = [Pair(Path(rows[i]["file"]), "", tuple(rows[i]["labels"].split(";"))) for i in nih]
    auc = zero_shot_auroc(encoder, vecs[nih], nih_pairs, labels) if nih else None
    return {"queries": per_query, "image_to_image": neighbour_precision(vecs, classes, 10),
            "modality_only": neighbour_precision(vecs, [r["modality"] for r in rows], 10), "zero_shot": auc}


def untrained_encoder(spec: ScratchSpec, seed: int) -> Encoder:
    """The model as training starts (same seed, no steps)."""
    torch.manual_seed(seed)
    model, tokenizer, preprocess, _ = build_scratch_model(spec)
    return Encoder(model.eval(), tokenizer, preprocess, model_name="untrained")


def print_report(before: dict, after: dict, meta: dict) -> None:
    print(f"\nheld-out: {meta['heldout_images']} images from {meta['heldout_patients']} patients "
          f"(train: {meta['train_images']} images); trainable {meta['trainable_percent']:.2f}% of "
          f"{meta['total_parameters']:,} parameters; wall time {meta['wall_seconds'] / 60:.1f} min\n")
    rows = []
    for q, m in after["queries"].items():
        b = before["queries"][q]
        rows.append([q, m["relevant"], b["R@1"], m["R@1"], m["R@5"], m["R@10"], b["P@10"], m["P@10"],
                     m["chance_P@10"]])
    print("text -> image (structured queries)")
    print(table(["query", "relevant", "R@1 before", "R@1", "R@5", "R@10", "P@10 before", "P@10", "chance P@10"],
                rows))
    print("\nimage -> image precision@10 by modality/view")
    rows = [[c, v["n"], before["image_to_image"]["per_class"][c]["P@10"], v["P@10"], v["chance"]]
            for c, v in after["image_to_image"]["per_class"].items()]
    rows.append(["ALL (mean over queries)", sum(v["n"] for v in after["image_to_image"]["per_class"].values()),
                 before["image_to_image"]["P@10"], after["image_to_image"]["P@10"], after["image_to_image"]["chance"]])
    rows.append(["modality only", "", before["modality_only"]["P@10"], after["modality_only"]["P@10"],
                 after["modality_only"]["chance"]])
    print(table(["class", "n", "P@10 before", "P@10 after", "chance"], rows))
    if after["zero_shot"]:
        print("\nzero-shot AUROC on held-out NIH rows (chance 0.5)")
        rows = []
        for p, v in after["zero_shot"]["per_pathology"].items():
            b = before["zero_shot"]["per_pathology"][p]["auroc"]
            rows.append([p, v["positives"], v["n"], "n/a" if b is None else b,
                         "n/a" if v["auroc"] is None else v["auroc"]])
        rows.append(["mean", "", "", before["zero_shot"]["mean"], after["zero_shot"]["mean"]])
        print(table(["pathology", "positives", "n", "AUROC before", "AUROC after"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--out", type=Path, default=Path("bench-out/quality"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--heldout", type=float, default=0.2, help="share of patients held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--export-mini", type=Path, default=None, help="also write the model here (radlens-mini)")
    args = parser.parse_args(argv)

    corpus = require(args.corpus, "shared corpus")
    started = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with open(corpus / "manifest.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    train_rows, held_rows = split_by_patient(rows, args.heldout, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    train_csv = write_rows(train_rows, args.out / "train.csv", corpus)
    held_csv = write_rows(held_rows, args.out / "heldout.csv", corpus)
    spec = ScratchSpec()
    labels = LabelConfig()

    before = evaluate(untrained_encoder(spec, args.seed), held_rows, corpus, labels)
    model_dir = args.out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    cfg = TrainConfig(pairs=str(train_csv), val_pairs=str(held_csv), out=model_dir, init="scratch", scratch=spec,
                      caption_template=CAPTION_TEMPLATE, encoder=EncoderConfig(batch_size=args.batch_size),
                      epochs=args.epochs, lr=args.lr, warmup=0.05, seed=args.seed, workers=args.workers,
                      progress=sys.stderr.isatty())
    result = train(cfg, log=print)
    encoder = load_encoder(EncoderConfig(model=str(model_dir)))
    after = evaluate(encoder, held_rows, corpus, labels)
    meta = {"train_images": len(train_rows), "heldout_images": len(held_rows),
            "heldout_patients": len({r["patient_id"] or r["id"] for r in held_rows}),
            "trainable_percent": result.metrics["parameters"]["trainable_percent"],
            "total_parameters": result.metrics["parameters"]["total"], "seed": args.seed, "epochs": args.epochs,
            "caption_template": CAPTION_TEMPLATE,
            "command": "python -m bench.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
            "wall_seconds": time.perf_counter() - started,
            "pair_recall_before": result.metrics["before"], "pair_recall_after": result.metrics["after"]}
    print_report(before, after, meta)
    (args.out / "quality.json").write_text(json.dumps({"meta": meta, "before": before, "after": after}, indent=2))
    print(f"\nfigures written to {args.out / 'quality.json'}")
    if args.export_mini:
        from bench.mini import export_mini

        export_mini(model_dir, args.export_mini, meta, after)
        print(f"radlens-mini written to {args.export_mini}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
