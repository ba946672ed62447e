"""Does RadLens's open_clip conversion compute what open_clip computes? Side by side, one run.

    python -m bench.openclip_parity --openclip-python /tmp/ocvenv/bin/python [--out bench-out/openclip]

open-clip-torch needs torchvision, which does not import next to the CPU torch RadLens installs, so its
half runs in a separate virtual environment (PyPI's torch + matching torchvision + open_clip_torch +
transformers): `python3 -m venv /tmp/ocvenv && /tmp/ocvenv/bin/pip install open_clip_torch transformers`.

That half (`--side openclip`) builds open_clip models with random weights (no download) -- ViT-B-32,
ViT-B-32-quickgelu, and a BiomedCLIP-layout model (timm vit_base_patch16_224 + a BERT-base text tower
with an MLP projection, context 256) -- writes each in hub layout (`open_clip_config.json` +
`open_clip_model.safetensors`, tokenizer files beside), and saves open_clip's own embeddings of fixed
images and prompts (its preprocess, its tokenizer, `encode_image`/`encode_text`, normalised). This
half loads the same directories through `radlens`'s loader (conversion on load) and embeds the same
images and prompts with RadLens's preprocessing and tokenizer. Printed: max abs difference of the
embeddings, min cosine, whether the token ids agree, max abs difference of the pixel tensors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VIT_B32_TOKENIZER = ROOT.parent / "shared" / "models" / "clip-vit-base-patch32-config"
PROMPTS = ["a frontal chest radiograph", "lateral lumbar spine", "axial CT of the abdomen with contrast",
           "MRI of the brain", "right pleural effusion with basal atelectasis", "x"]
BERT_WORDS = sorted({w for p in PROMPTS for w in p.lower().split()} | {"of", "the", "with", "a", "chest"})


def _images(count: int = 4):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        pixels = rng.integers(0, 256, (300 + 20 * i, 260 + 30 * i), dtype=np.uint8)
        images.append(Image.fromarray(pixels, "L").convert("RGB"))
    return images


# -- the open_clip half (separate venv) --------------------------------------------------------------

def openclip_side(out: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for name in ("ViT-B-32", "ViT-B-32-quickgelu"):
        model = open_clip.create_model(name, pretrained=None)
        cfg = open_clip.get_model_config(name)
        tokenizer = open_clip.get_tokenizer(name)
        models[name] = (model, cfg, tokenizer, VIT_B32_TOKENIZER)
    bert = out / "bert-base-tiny-vocab"
    _write_bert(bert)
    cfg = {"embed_dim": 512,
           "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                          "timm_pool": "", "timm_proj": "linear", "image_size": 224},
           "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "mlp",
                        "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256,
                        "hf_model_pretrained": False}}
    model = open_clip.CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    with torch.no_grad():  # open_clip zero-initialises nothing that matters here; make the text proj non-trivial
        for p in model.text.proj.parameters():
            p.normal_(0, 0.02)
    models["BiomedCLIP layout"] = (model, cfg, open_clip.tokenizer.HFTokenizer(str(bert), context_length=256), bert)
    images = _images()
    for name, (model, cfg, tokenizer, tokenizer_files) in models.items():
        model.eval()
        folder = out / name.replace(" ", "-")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(folder / "open_clip_model.safetensors"))
        mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        (folder / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": cfg, "preprocess_cfg": {"mean": list(mean), "std": list(std)}}, indent=2))
        target = folder / ("text_model" if name == "BiomedCLIP layout" else "")
        target.mkdir(exist_ok=True)
        for f in Path(tokenizer_files).iterdir():
            if f.is_file() and f.suffix in (".json", ".txt"):
                shutil.copy2(f, target / f.name)
        _, _, preprocess = open_clip.create_model_and_transforms(name if name != "BiomedCLIP layout" else "ViT-B-16",
                                                                 pretrained=None)
        pixels = torch.stack([preprocess(im) for im in images])
        tokens = tokenizer(PROMPTS)
        with torch.no_grad():
            image = model.encode_image(pixels, normalize=True).numpy()
            text = model.encode_text(tokens, normalize=True).numpy()
        np.savez(folder / "reference.npz", pixels=pixels.numpy(), tokens=tokens.numpy(), image=image, text=text)
    print(f"open_clip {open_clip.__version__}, torch {torch.__version__}: wrote {', '.join(models)} to {out}")


def _write_bert(folder: Path) -> None:
    """A BERT-base config (PubMedBERT's shape) with a small WordPiece vocabulary, saved as a local model."""
    from transformers import BertConfig, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), model_max_length=256).save_pretrained(folder)
    BertConfig().save_pretrained(folder)


# -- the RadLens half ---------------------------------------------------------------------------------

def radlens_side(out: Path) -> list[list]:
    import torch

    from cxrmodel.model.encoder import features, load_pretrained_parts
    from cxrmodel.model.openclip import load_open_clip_dir

    rows = []
    images = _images()
    for folder in sorted(p for p in out.iterdir() if (p / "reference.npz").is_file()):
        ref = np.load(folder / "reference.npz")
        _, _, _, fmt = load_open_clip_dir(folder)
        model, tokenizer, preprocess = load_pretrained_parts(str(folder), dtype=torch.float32)
        pixels = preprocess.to_tensor(images)
        batch = tokenizer(PROMPTS, padding=True, truncation=True, max_length=tokenizer.model_max_length,
                          return_tensors="pt")
        keep = {"input_ids", "attention_mask"} | ({"token_type_ids"} if "token_type_ids" in batch
                                                    and model.config.model_type != "clip" else set())
        with torch.no_grad():
            image = torch.nn.functional.normalize(features(model.get_image_features(pixel_values=pixels)), dim=-1)
            text = torch.nn.functional.normalize(features(model.get_text_features(
                **{k: v for k, v in batch.items() if k in keep})), dim=-1)
        ids_equal = all(
            list(ours[: int(mask.sum())]) == [t for t in theirs.tolist() if t != 0][: int(mask.sum())]
            for ours, mask, theirs in zip(batch["input_ids"].tolist(), batch["attention_mask"], ref["tokens"],
                                          strict=True))
        image, text = image.numpy(), text.numpy()
        cosine = min(np.sum(image * ref["image"], 1).min(), np.sum(text * ref["text"], 1).min())
        rows.append([folder.name, fmt, f"{np.abs(pixels.numpy() - ref['pixels']).max():.1e}",
                     "yes" if ids_equal else "NO", f"{np.abs(image - ref['image']).max():.1e}",
                     f"{np.abs(text - ref['text']).max():.1e}", f"{cosine:.7f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=("both", "openclip", "radlens"), default="both")
    parser.add_argument("--openclip-python", default="/tmp/ocvenv/bin/python",
                        help="python of a venv where open_clip imports (for --side both)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/openclip"))
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.side == "openclip":
        openclip_side(out)
        return 0
    if args.side == "both":
        subprocess.run([args.openclip_python, str(Path(__file__).resolve()), "--side", "openclip", "--out", str(out)],
                       check=True, cwd=ROOT)
    from bench.common import table

    print(table(["checkpoint", "converted as", "pixels max |d|", "token ids equal", "image emb max |d|",
                 "text emb max |d|", "min cosine"], radlens_side(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
