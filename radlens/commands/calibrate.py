"""`radlens calibrate`: measure, per pathology, how well a model's zero-shot scores separate labelled
images, and write the `calibration.json` that decides what RadLens may report for that model."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from cxrmodel.errors import DataError

from .common import add_model, encoder_config, positive_int, probability

NO_FINDING = "no finding"


def register(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="measure label skill on labelled images and write calibration.json",
        description="Score every image of MANIFEST exactly as `radlens index` does, then per pathology: AUROC "
                    "with a bootstrap 95%% interval, an isotonic map from score to probability, the Youden "
                    "threshold, expected calibration error before/after. A pathology is assessed (reported at "
                    "all) only where the interval's lower bound exceeds --min-auroc-lower with at least "
                    "--min-positives positives.")
    p.add_argument("manifest", type=Path, help="CSV/JSONL with a path column and `labels` (NIH style: "
                                               "'Effusion|Mass', ';' also accepted, 'No Finding' allowed)")
    add_model(p)
    p.add_argument("--out", type=Path, default=Path("calibration.json"), help="calibration file to write")
    p.add_argument("--plot", type=Path, default=None, help="reliability diagram PNG (default: OUT with .png)")
    p.add_argument("--description", default=None, help="what the labelled images are (stored in the file)")
    p.add_argument("--min-positives", type=positive_int, default=20, help="fewest positives for a verdict (20)")
    p.add_argument("--min-auroc-lower", type=probability, default=0.5,
                   help="the AUROC interval's lower bound must exceed this (0.5: better than chance)")
    p.add_argument("--resamples", type=positive_int, default=2000, help="bootstrap resamples (>= 1000 advised)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and cross-fitting")
    p.set_defaults(run=run_calibrate)


def read_labelled(manifest: Path, pathologies: list[str]) -> tuple[list[str], list[list[bool]], int]:
    """(image paths, per-image positives over `pathologies`, rows without labels) of a labelled manifest."""
    from cxrmodel.tables import ERROR_KEY, find_column, read_rows
    from indexer.sources import manifest_path_column

    by_lower = {p.lower(): p for p in pathologies}
    paths, rows, unlabelled = [], [], 0
    path_col, label_col = manifest_path_column(manifest), None
    for line, row in read_rows(manifest):
        if ERROR_KEY in row:
            continue
        label_col = label_col or find_column(row, ("labels", "finding_labels", "finding labels"))
        if label_col is None:
            raise DataError(f"{manifest}: needs a `labels` column (NIH style: 'Effusion|Mass', or 'No Finding')")
        names = [n.strip().lower() for n in str(row.get(label_col) or "").replace(";", "|").split("|") if n.strip()]
        if not names:
            unlabelled += 1
            continue
        unknown = [n for n in names if n not in by_lower and n != NO_FINDING]
        if unknown:
            raise DataError(f"{manifest}:{line}: unknown label {unknown[0]!r} (the 14 ChestX-ray14 names or "
                            "'No Finding')")
        value = str(row[path_col]).strip()
        paths.append(str(manifest.parent / value) if not Path(value).is_absolute() else value)
        rows.append([p.lower() in names for p in pathologies])
    if not paths:
        raise DataError(f"{manifest}: no labelled row")
    return paths, rows, unlabelled


def score_like_the_index(paths: list[str], encoder, labels) -> tuple[list[int], object]:
    """(indices of the images that decoded, their raw scores): decode, preprocess and embed exactly as
    `radlens index` does (`indexer.prepare`), scores by `score_vectors` as stored at index time."""
    import numpy as np
    from tqdm import tqdm

    from cxrmodel.imaging.decode import ImageLimits
    from cxrmodel.labels.zeroshot import prompt_bank, score_vectors
    from indexer.prepare import PrepareTask, prepare

    kept, vectors, batch, batch_at = [], [], [], []
    bank = prompt_bank(encoder, labels)

    def flush():
        if batch:
            vectors.append(encoder.encode_arrays(batch))
            kept.extend(batch_at)
            batch.clear()
            batch_at.clear()

    for i, path in enumerate(tqdm(paths, unit="img", desc="scoring", dynamic_ncols=True)):
        item = prepare(PrepareTask(path), encoder.preprocess, ImageLimits())
        if item.error is None:
            batch.append(item.pixels)
            batch_at.append(i)
        if len(batch) >= encoder.batch_size:
            flush()
    flush()
    if not kept:
        raise DataError("no image of the manifest could be read")
    raw, _ = score_vectors(np.concatenate(vectors), bank, labels)
    return kept, raw


def run_calibrate(args) -> int:
    import numpy as np

    from cxrmodel.labels import calibration as cal
    from cxrmodel.labels.prompts import LabelConfig
    from cxrmodel.model.encoder import load_encoder
    from cxrmodel.reporting.charts import reliability_png

    labels = LabelConfig()
    pathologies = list(labels.pathologies)
    paths, truth, unlabelled = read_labelled(args.manifest, pathologies)
    encoder = load_encoder(encoder_config(args))
    kept, raw = score_like_the_index(paths, encoder, labels)
    truth = np.asarray(truth, dtype=bool)[kept]
    rule = cal.SkillRule(args.min_positives, args.min_auroc_lower, args.resamples, args.seed)
    digest = hashlib.sha256(args.manifest.read_bytes()).hexdigest()
    dataset = {"manifest": args.manifest.name, "manifest_sha256": digest,
               "images": len(kept), "unreadable": len(paths) - len(kept), "unlabelled_rows": unlabelled,
               "description": args.description or f"labelled images of {args.manifest.name}"}
    result = cal.calibrate(raw, truth, pathologies, rule, model_identity=cal.model_identity(encoder),
                           model_name=Path(encoder.model_name).name if Path(encoder.model_name).is_dir()
                           else encoder.model_name, dataset=dataset,
                           created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"))
    cal.save(result, args.out)
    plot = args.plot or args.out.with_suffix(".png")
    curves = {p: (cal.reliability_bins(np.clip(raw[:, j], 0, 1), truth[:, j]),
                  cal.reliability_bins(cal.cross_fitted(raw[:, j], truth[:, j], 5, args.seed), truth[:, j]))
              for j, p in enumerate(pathologies) if truth[:, j].any() and not truth[:, j].all()}
    plot.write_bytes(reliability_png(curves, {p: c.assessed for p, c in result.pathologies.items()}))
    print(summary_table(result))
    print(f"wrote {args.out} and {plot}: {len(result.assessed)} of {len(pathologies)} pathologies assessed "
          f"({', '.join(result.assessed) or 'none'}) on {len(kept)} images")
    return 0


def summary_table(result) -> str:
    """The per-pathology table `radlens calibrate` prints."""
    head = f"{'pathology':<19} {'pos':>4} {'neg':>5}  {'AUROC [95% CI]':<19} {'assessed':<8} " \
           f"{'thr (p)':>7} {'sens':>5} {'spec':>5}  {'ECE raw->cal':<12}"
    lines = [head, "-" * len(head)]
    for c in result.pathologies.values():
        auc = f"{c.auroc:.2f} [{c.auroc_low:.2f}-{c.auroc_high:.2f}]" if c.auroc_low is not None else \
            (f"{c.auroc:.2f}" if c.auroc is not None else "n/a")
        ece = f"{c.ece_raw:.3f}->{c.ece_calibrated:.3f}" if c.ece_raw is not None else ""
        verdict = "yes" if c.assessed else "no"
        lines.append(f"{c.pathology:<19} {c.positives:>4} {c.negatives:>5}  {auc:<19} {verdict:<8} "
                     + (f"{c.threshold:>7.2f} {c.sensitivity:>5.2f} {c.specificity:>5.2f}  " if c.assessed
                        else f"{'':>7} {'':>5} {'':>5}  ") + ece)
    rule = result.rule
    tested = len(result.pathologies)
    interval = f"{1 - 0.05 / tested:.1%} (Bonferroni over {tested})" if rule.family_wise else "95%"
    lines.append(f"assessed: >= {rule.min_positives} positives and the lower bound of the AUROC's {interval} "
                 f"bootstrap interval > {rule.min_auroc_lower:.2f} ({rule.resamples} resamples, seed {rule.seed}); "
                 "the 95% interval is shown. Threshold: Youden J. ECE: 10 bins, calibrated values cross-fitted "
                 "over 5 folds (a calibrated value near the base rate has a small ECE and little information: "
                 "AUROC is the skill)")
    return "\n".join(lines)
