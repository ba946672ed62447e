"""`radlens calibrate`: measure, per pathology, how well a model's zero-shot scores separate labelled
images, and write the `calibration.json` that decides what RadLens may report for that model."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from cxrmodel.errors import DataError

from .common import add_model, encoder_config, positive_int, probability

NO_FINDING = "no finding"
CHECK_PANEL = "chest radiograph? (the check)"


def register(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="measure label skill on labelled images and write calibration.json",
        description="Score every image of MANIFEST exactly as `radlens index` does, then per pathology: AUROC "
                    "with a bootstrap 95%% interval, an isotonic map from score to probability, the Youden "
                    "threshold, expected calibration error before/after. A pathology is assessed (reported at "
                    "all) only where the interval's lower bound exceeds --min-auroc-lower with at least "
                    "--min-positives positives. With modality and body-part columns it also measures the "
                    "chest-radiograph check (AUROC of the model's share, an isotonic map, sensitivity/"
                    "specificity, view-guess accuracy) on the images whose metadata say what they are.")
    p.add_argument("manifest", type=Path, help="CSV/JSONL with a path column and `labels` (NIH style: "
                                               "'Effusion|Mass', ';' also accepted, 'No Finding' allowed) "
                                               "and/or modality, body_part (or anatomy) and view columns")
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


@dataclass
class CalibrationRows:
    """What a calibration manifest says of each readable row: the image path, its 14-pathology truth (None
    for a row without labels) and its modality / body part / view (for the chest-radiograph check)."""

    paths: list[str] = field(default_factory=list)
    labels: list[list[bool] | None] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)
    has_labels: bool = False
    has_modality: bool = False


def read_calibration_rows(manifest: Path, pathologies: list[str]) -> CalibrationRows:
    """The rows of a manifest with `labels` (NIH style) and/or modality/body-part/view columns."""
    from cxrmodel.tables import ERROR_KEY, read_rows
    from indexer.sources import METADATA_COLUMNS, manifest_path_column

    by_lower = {p.lower(): p for p in pathologies}
    out = CalibrationRows()
    path_col = manifest_path_column(manifest)
    for line, row in read_rows(manifest):
        if ERROR_KEY in row:
            continue
        fields = {METADATA_COLUMNS[k]: v for k, v in row.items() if k in METADATA_COLUMNS and v not in (None, "")}
        out.has_labels = out.has_labels or any(METADATA_COLUMNS.get(k) == "labels" for k in row)
        out.has_modality = out.has_modality or any(METADATA_COLUMNS.get(k) == "modality" for k in row)
        names = [n.strip().lower() for n in str(fields.get("labels", "")).replace(";", "|").split("|") if n.strip()]
        unknown = [n for n in names if n not in by_lower and n != NO_FINDING]
        if unknown:
            raise DataError(f"{manifest}:{line}: unknown label {unknown[0]!r} (the 14 ChestX-ray14 names or "
                            "'No Finding')")
        value = str(row[path_col]).strip()
        out.paths.append(str(manifest.parent / value) if not Path(value).is_absolute() else value)
        out.labels.append([p.lower() in names for p in pathologies] if names else None)
        out.metadata.append({k: fields.get(k) for k in ("modality", "body_part", "view")})
    if not (out.has_labels or out.has_modality):
        raise DataError(f"{manifest}: needs a `labels` column (NIH style: 'Effusion|Mass', or 'No Finding') "
                        "and/or modality and body-part columns (for the chest-radiograph check)")
    if not out.paths:
        raise DataError(f"{manifest}: no row with an image path")
    return out


def embed_like_the_index(paths: list[str], encoder) -> tuple[list[int], object]:
    """(indices of the images that decoded, their embeddings): decode, preprocess and embed exactly as
    `radlens index` does (`indexer.prepare`)."""
    import numpy as np
    from tqdm import tqdm

    from cxrmodel.imaging.decode import ImageLimits
    from indexer.prepare import PrepareTask, prepare

    kept, vectors, batch, batch_at = [], [], [], []

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
    return kept, np.concatenate(vectors)


def measure_applicability(encoder, vectors, metadata: list[dict], config, rule):
    """The chest-radiograph check measured on the images whose metadata settle what they are (the truth is
    `decide_from_metadata`, the rule the index applies to such images), with its reliability curves (share
    and cross-fitted probability); (None, None) when no image's metadata settle it."""
    import numpy as np

    from cxrmodel.labels.applicability import chest_shares, decide_from_metadata, stated_view
    from cxrmodel.labels.calibration import calibrate_applicability
    from cxrmodel.labels.measures import reliability_curves

    truth = [decide_from_metadata(m) for m in metadata]
    known = [i for i, d in enumerate(truth) if d is not None]
    if not known:
        return None, None
    shares = chest_shares(encoder, vectors[known], config)
    chest = np.array([truth[i].applicable for i in known])
    views = [(stated_view(metadata[i]), guess) for n, (i, guess) in enumerate(zip(known, shares.view, strict=True))
             if chest[n] and stated_view(metadata[i])]
    check = calibrate_applicability(shares.chest, chest, rule, views)
    if chest.all() or not chest.any():
        return check, None
    return check, reliability_curves(shares.chest, chest, rule.seed)


def run_calibrate(args) -> int:
    import dataclasses

    import numpy as np

    from cxrmodel.labels import calibration as cal
    from cxrmodel.labels.measures import reliability_curves
    from cxrmodel.labels.prompts import LabelConfig
    from cxrmodel.labels.zeroshot import prompt_bank, score_vectors
    from cxrmodel.model.encoder import load_encoder
    from cxrmodel.reporting.charts import reliability_png

    labels = LabelConfig()
    pathologies = list(labels.pathologies)
    rows = read_calibration_rows(args.manifest, pathologies)
    encoder = load_encoder(encoder_config(args))
    kept, vectors = embed_like_the_index(rows.paths, encoder)
    labelled = [n for n, i in enumerate(kept) if rows.labels[i] is not None]
    raw, _ = score_vectors(vectors[labelled], prompt_bank(encoder, labels), labels)
    truth = np.asarray([rows.labels[kept[n]] for n in labelled], dtype=bool).reshape(len(labelled), len(pathologies))
    rule = cal.SkillRule(args.min_positives, args.min_auroc_lower, args.resamples, args.seed)
    digest = hashlib.sha256(args.manifest.read_bytes()).hexdigest()
    dataset = {"manifest": args.manifest.name, "manifest_sha256": digest,
               "images": len(kept), "labelled_images": len(labelled), "unreadable": len(rows.paths) - len(kept),
               "unlabelled_rows": sum(1 for x in rows.labels if x is None),
               "description": args.description or f"images of {args.manifest.name}"}
    result = cal.calibrate(raw, truth, pathologies, rule, model_identity=cal.model_identity(encoder),
                           model_name=Path(encoder.model_name).name if Path(encoder.model_name).is_dir()
                           else encoder.model_name, dataset=dataset,
                           created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"))
    applicability, check_curve = measure_applicability(encoder, vectors, [rows.metadata[i] for i in kept],
                                                       labels.applicability, rule)
    result = dataclasses.replace(result, applicability=applicability)
    cal.save(result, args.out)
    plot = args.plot or args.out.with_suffix(".png")
    curves = {p: reliability_curves(raw[:, j], truth[:, j], args.seed)
              for j, p in enumerate(pathologies) if truth[:, j].any() and not truth[:, j].all()}
    assessed = {p: c.assessed for p, c in result.pathologies.items()}
    if check_curve is not None:
        curves[CHECK_PANEL], assessed[CHECK_PANEL] = check_curve, applicability.assessed
    plot.write_bytes(reliability_png(curves, assessed))
    print(summary_table(result))
    print(f"wrote {args.out} and {plot}: {len(result.assessed)} of {len(pathologies)} pathologies assessed "
          f"({', '.join(result.assessed) or 'none'}) on {len(labelled)} labelled images; chest-radiograph check "
          + ("calibrated" if applicability and applicability.assessed else "not calibrated")
          + f" on {applicability.positives + applicability.negatives if applicability else 0} images")
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
    check = result.applicability
    lines.append("chest-radiograph check: " + (("calibrated; " if check.assessed else "not calibrated ("
                                                + check.reason + "); ") + check.summary() if check else
                                               "not measured (no modality/body-part column)"))
    lines.append(f"assessed: >= {rule.min_positives} positives and the lower bound of the AUROC's {interval} "
                 f"bootstrap interval > {rule.min_auroc_lower:.2f} ({rule.resamples} resamples, seed {rule.seed}); "
                 "the 95% interval is shown. Threshold: Youden J. ECE: 10 bins, calibrated values cross-fitted "
                 "over 5 folds (a calibrated value near the base rate has a small ECE and little information: "
                 "AUROC is the skill)")
    return "\n".join(lines)
