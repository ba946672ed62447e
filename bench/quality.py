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
from bench.mini import auroc_interval, average_precision_text, export_mini
from cxrmodel.imaging.decode import load_image
from cxrmodel.labels.prompts import LabelConfig
from cxrmodel.model.dualencoder import ScratchSpec
from cxrmodel.model.encoder import Encoder, EncoderConfig, load_encoder
from cxrmodel.training.evaluate import neighbour_precision, query_retrieval
from cxrmodel.training.train import TrainConfig, train

CAPTION_TEMPLATE = "{view_class} {view} {modality} of the {anatomy}: {labels}"

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


def grown_split(rows: list[dict], seed: int, fractions: tuple[float, float] = (0.4, 0.2)
                ) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) by patient, with the test part unseen by today's radlens-mini as well:
    today's model trained on the training-era rows less `split_by_patient(era, 0.2, 0)`'s held-out part.
    Every image of a patient it trained on stays in training; the patients it never saw are shuffled
    (seeded) and split `fractions` (train, validation) and the rest test. Hyper-parameters are chosen on
    validation; test is for the final figures, before (today's model) and after, once."""
    from bench.calibration_set import HELD_OUT_FRACTION, HELD_OUT_SEED, TRAINING_ERA_SOURCES

    era = [r for r in rows if r["source_repo"].startswith(TRAINING_ERA_SOURCES)]
    era_train, _ = split_by_patient(era, HELD_OUT_FRACTION, HELD_OUT_SEED)
    seen = {r["patient_id"] or r["id"] for r in era_train}
    train_rows = [r for r in rows if (r["patient_id"] or r["id"]) in seen]
    unseen = sorted({r["patient_id"] or r["id"] for r in rows} - seen)
    random.Random(seed).shuffle(unseen)
    cut1, cut2 = int(round(len(unseen) * fractions[0])), int(round(len(unseen) * sum(fractions)))
    part = {p: 0 for p in unseen[:cut1]} | {p: 1 for p in unseen[cut1:cut2]} | {p: 2 for p in unseen[cut2:]}
    by = [[r for r in rows if part.get(r["patient_id"] or r["id"]) == k] for k in range(3)]
    return train_rows + by[0], by[1], by[2]


def write_rows(rows: list[dict], path: Path, corpus: Path) -> Path:
    """A manifest with absolute image paths."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "file": str((corpus / row["file"]).resolve())})
    return path


def evaluate(encoder: Encoder, rows: list[dict], corpus: Path, labels: LabelConfig) -> dict:
    """All held-out figures for one encoder: retrieval, image->image, and per-pathology zero-shot AUROC with
    its bootstrap 95% interval and ECE before/after calibration (`radlens calibrate`'s own computation)."""
    from cxrmodel.labels.calibration import SkillRule, calibrate
    from cxrmodel.labels.zeroshot import prompt_bank, score_vectors

    images = [load_image(corpus / r["file"], model_side=encoder.preprocess.decode_side).model_input(encoder.preprocess)
              for r in rows]
    vecs = encoder.encode_images(images)
    queries = list(STRUCTURED_QUERIES)
    relevant = np.array([[STRUCTURED_QUERIES[q](r) for r in rows] for q in queries])
    qr = query_retrieval(encoder.encode_texts(queries), vecs, relevant)
    per_query = {q: m for q, m in zip(queries, qr["per_query"], strict=True)}
    classes = [f"{r['modality']}/{r['view'] or 'unstated'}" for r in rows]
    nih = [i for i, r in enumerate(rows) if r["id"].startswith("nih_")]
    zero_shot = None
    if nih:
        pathologies = list(labels.pathologies)
        raw, _ = score_vectors(vecs[nih], prompt_bank(encoder, labels), labels)
        truth = np.array([[p in rows[i]["labels"].split(";") for p in pathologies] for i in nih])
        measured = calibrate(raw, truth, pathologies, SkillRule(resamples=1000), model_identity="",
                             model_name="", dataset={})
        per = {p: {"positives": c.positives, "n": len(nih), "auroc": c.auroc, "low": c.auroc_low,
                   "high": c.auroc_high, "ece_raw": c.ece_raw, "ece_calibrated": c.ece_calibrated,
                   "assessed": c.assessed} for p, c in measured.pathologies.items()}
        values = [v["auroc"] for v in per.values() if v["auroc"] is not None]
        zero_shot = {"per_pathology": per, "mean": float(np.mean(values)) if values else None,
                     "above_chance": [p for p, v in per.items() if v["low"] is not None and v["low"] > 0.5
                                      and v["positives"] >= 20],
                     "assessed": [p for p, v in per.items() if v["assessed"]]}
    return {"queries": per_query, "image_to_image": neighbour_precision(vecs, classes, 10),
            "modality_only": neighbour_precision(vecs, [r["modality"] for r in rows], 10), "zero_shot": zero_shot}


def print_report(before: dict, after: dict, meta: dict, part: str) -> None:
    print(f"\n{part}: {meta[part + '_images']} images of {meta[part + '_patients']} patients "
          f"(train: {meta['train_images']} images); trainable {meta['trainable_percent']:.2f}% of "
          f"{meta['total_parameters']:,} parameters; wall time {meta['wall_seconds'] / 60:.1f} min; "
          f"before: {meta['before']}\n")
    rows = []
    for q, m in after["queries"].items():
        b = before["queries"][q]
        rows.append([q, m["relevant"], b["R@1"], m["R@1"], m["R@5"], m["R@10"], b["P@10"], m["P@10"],
                     m["chance_P@10"], average_precision_text(b, 3), average_precision_text(m, 3)])
    print("text -> image (structured queries; AP: average precision over the whole ranking, chance = P@10's)")
    print(table(["query", "relevant", "R@1 before", "R@1", "R@5", "R@10", "P@10 before", "P@10", "chance P@10",
                 "AP before", "AP"], rows))
    print("\nimage -> image precision@10 by modality/view")
    rows = [[c, v["n"], before["image_to_image"]["per_class"].get(c, {}).get("P@10", "n/a"), v["P@10"], v["chance"]]
            for c, v in after["image_to_image"]["per_class"].items()]
    rows.append(["ALL (mean over queries)", sum(v["n"] for v in after["image_to_image"]["per_class"].values()),
                 before["image_to_image"]["P@10"], after["image_to_image"]["P@10"], after["image_to_image"]["chance"]])
    rows.append(["modality only", "", before["modality_only"]["P@10"], after["modality_only"]["P@10"],
                 after["modality_only"]["chance"]])
    print(table(["class", "n", "P@10 before", "P@10 after", "chance"], rows))
    if after["zero_shot"]:
        print(f"\nzero-shot AUROC [bootstrap 95% CI] on {part} NIH rows (chance 0.5); ECE raw -> calibrated "
              "(cross-fitted)")
        rows = []
        for p, v in after["zero_shot"]["per_pathology"].items():
            b = before["zero_shot"]["per_pathology"][p]
            rows.append([p, v["positives"], v["n"], auroc_interval(b), auroc_interval(v),
                         "" if v["ece_raw"] is None else f"{v['ece_raw']:.3f} -> {v['ece_calibrated']:.3f}"])
        rows.append(["mean", "", "", before["zero_shot"]["mean"], after["zero_shot"]["mean"], ""])
        print(table(["pathology", "positives", "n", "AUROC before", "AUROC after", "ECE after"], rows))
        print(f"interval above 0.5 with >= 20 positives: before {before['zero_shot']['above_chance'] or 'none'}, "
              f"after {after['zero_shot']['above_chance'] or 'none'}; assessed by radlens calibrate's family-wise "
              f"rule: after {after['zero_shot']['assessed'] or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--out", type=Path, default=Path("bench-out/quality"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--label-loss", type=float, default=0.0, help="radlens train --label-loss WEIGHT")
    parser.add_argument("--caption-template", default=CAPTION_TEMPLATE)
    parser.add_argument("--balance", type=float, default=0.0, help="radlens train --balance T (0: off)")
    parser.add_argument("--image-size", type=int, default=ScratchSpec.image_size, help="radlens train --image-size")
    parser.add_argument("--patch-size", type=int, default=ScratchSpec.patch_size, help="radlens train --patch-size")
    parser.add_argument("--train-min-side", type=int, default=0,
                        help="leave images whose shorter side is below this out of training (e.g. 128: the 64 px "
                             "NIH copies); validation and test keep them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--test", action="store_true",
                        help="also report the test part (do this once, for the configuration chosen on validation)")
    parser.add_argument("--export-mini", type=Path, default=None, help="also write the model here (radlens-mini)")
    parser.add_argument("--before", type=Path, default=None, metavar="MODEL_DIR",
                        help="the model of the 'before' column (default: the bundled radlens-mini, which since "
                             "2026-12-02 is the model this bench trains with --image-size 64 --patch-size 8 "
                             "--label-loss 1; a copy of an earlier one compares like with like)")
    parser.add_argument("--evaluate", type=Path, default=None, metavar="MODEL_DIR",
                        help="no training: evaluate a model this bench trained before (e.g. OUT/model) on the "
                             "same split, e.g. with --test once it is the configuration chosen on validation")
    args = parser.parse_args(argv)

    corpus = require(args.corpus, "shared corpus")
    started = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with open(corpus / "manifest.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    train_rows, val_rows, test_rows = grown_split(rows, args.seed)
    train_rows = [r for r in train_rows if min(int(r["width"] or 0), int(r["height"] or 0)) >= args.train_min_side]
    args.out.mkdir(parents=True, exist_ok=True)
    train_csv = write_rows(train_rows, args.out / "train.csv", corpus)
    val_csv = write_rows(val_rows, args.out / "validation.csv", corpus)
    write_rows(test_rows, args.out / "test.csv", corpus)
    labels = LabelConfig()
    from cxrmodel.model.bundled import bundled_model_dir

    today = load_encoder(EncoderConfig(model=str(args.before or bundled_model_dir())))  # the "before" column
    before = {"validation": evaluate(today, val_rows, corpus, labels)}
    if args.test:
        before["test"] = evaluate(today, test_rows, corpus, labels)
    if args.evaluate:
        model_dir = args.evaluate
        trained = json.loads((model_dir / "metrics.json").read_text())
    else:
        model_dir = args.out / "model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        cfg = TrainConfig(pairs=str(train_csv), val_pairs=str(val_csv), out=model_dir, init="scratch",
                          scratch=ScratchSpec(image_size=args.image_size, patch_size=args.patch_size),
                          caption_template=args.caption_template,
                          encoder=EncoderConfig(batch_size=args.batch_size), epochs=args.epochs, lr=args.lr,
                          warmup=0.05, seed=args.seed, workers=args.workers, label_loss=args.label_loss,
                          balance=args.balance, progress=sys.stderr.isatty())
        trained = train(cfg, log=print).metrics
    encoder = load_encoder(EncoderConfig(model=str(model_dir)))
    after = {part: evaluate(encoder, part_rows, corpus, labels)
             for part, part_rows in (("validation", val_rows), ("test", test_rows)) if part in before}
    meta = {"train_images": len(train_rows), "validation_images": len(val_rows), "test_images": len(test_rows),
            "validation_patients": len({r["patient_id"] or r["id"] for r in val_rows}),
            "test_patients": len({r["patient_id"] or r["id"] for r in test_rows}),
            "heldout_images": len(test_rows), "heldout_patients": len({r["patient_id"] or r["id"] for r in test_rows}),
            "before": str(args.before) if args.before else "the bundled radlens-mini",
            "trainable_percent": trained["parameters"]["trainable_percent"],
            "total_parameters": trained["parameters"]["total"], "seed": args.seed, "epochs": trained["epochs"],
            "lr": trained["lr"], "label_loss": trained.get("label_loss", 0.0),
            "balance": trained.get("balance", 0.0), "train_min_side": args.train_min_side,
            "image_size": args.image_size, "patch_size": args.patch_size,
            "caption_template": trained["caption_template"],
            "command": "python -m bench.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
            "wall_seconds": time.perf_counter() - started,
            "pair_recall_before": trained["before"], "pair_recall_after": trained["after"]}
    for part in after:
        print_report(before[part], after[part], meta, part)
    (args.out / "quality.json").write_text(json.dumps({"meta": meta, "before": before, "after": after}, indent=2))
    print(f"\nfigures written to {args.out / 'quality.json'}")
    if args.export_mini:
        part = "test" if "test" in after else "validation"
        export_mini(model_dir, args.export_mini, meta, after[part], before[part])
        print(f"radlens-mini written to {args.export_mini}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
