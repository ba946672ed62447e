"""LoRA fine-tuning of a dual encoder on image-caption pairs with a symmetric InfoNCE loss.

`train(TrainConfig(...))` loads the base checkpoint, wraps it with peft LoRA, trains with AdamW
(warm-up + cosine), bf16 autocast where the hardware runs it fast, gradient accumulation,
a checkpoint per epoch (`--resume` continues from it), and writes into `out`:
the adapter (peft's `save_pretrained`), `metrics.json` and `loss_curve.png`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .dualencoder import ScratchSpec, build_scratch_model, own_parameters, save_model_dir
from .encoder import Encoder, EncoderConfig, choose_device, choose_dtype, features, load_pretrained_parts
from .errors import DataError, ImageDecodeError
from .evaluate import embed_pairs, retrieval_metrics
from .fastpath import apply_fastpaths
from .images import load_image
from .lora import LoraSettings, apply_lora, count_parameters, unwrap
from .pairs import Pair, load_pairs, split_pairs
from .preprocess import ImagePreprocess

log_ = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class TrainConfig:
    """One `radlens train` run."""

    pairs: str
    out: Path
    images: str | None = None
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    lora: LoraSettings | None = field(default=None, metadata={
        "help": "None: q_proj,v_proj for a pretrained CLIP, query,value on the text tower for --init scratch."})
    init: str = field(default="pretrained", metadata={
        "help": "pretrained: LoRA on --model; scratch: new vision tower + LoRA on a pretrained text tower."})
    scratch: ScratchSpec = field(default_factory=ScratchSpec)
    caption_template: str | None = field(default=None, metadata={
        "help": "Compose captions from columns, e.g. '{view} {modality} of the {anatomy}: {labels}'."})
    augment: bool | None = field(default=None, metadata={
        "help": "Random crop/rotation/contrast (default: on for scratch, off for LoRA on a pretrained model)."})
    epochs: int = 3
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = field(default=0.1, metadata={"help": "Fraction of optimiser steps spent warming up."})
    accumulate: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    max_grad_norm: float = 1.0
    val_fraction: float = 0.1
    val_pairs: str | None = field(default=None, metadata={"help": "Held-out pairs file; replaces the random split."})
    seed: int = 0
    workers: int | None = None
    resume: bool = False
    progress: bool = True
    learn_temperature: bool = True


@dataclass
class TrainResult:
    """What a run produced: metrics (as in metrics.json), the output dir, and the trained encoder."""

    metrics: dict
    out: Path
    encoder: Encoder | None = None

    def summary_line(self) -> str:
        m = self.metrics
        before, after = m["before"]["text_to_image"]["R@1"], m["after"]["text_to_image"]["R@1"]
        return (f"adapter saved to {self.out} ({m['parameters']['trainable_percent']:.3f}% of parameters trained); "
                f"loss {m['loss_per_epoch'][0]:.3f} -> {m['loss_per_epoch'][-1]:.3f}; "
                f"held-out text->image R@1 {before:.3f} -> {after:.3f}")


def contrastive_loss(image_vecs: torch.Tensor, text_vecs: torch.Tensor, logit_scale: torch.Tensor,
                     caption_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised vectors; rows with identical captions are all positives."""
    image_vecs = F.normalize(image_vecs.float(), dim=-1)
    text_vecs = F.normalize(text_vecs.float(), dim=-1)
    logits = logit_scale.float().exp() * image_vecs @ text_vecs.T
    if caption_ids is None:
        targets = torch.eye(len(logits), device=logits.device)
    else:
        targets = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    loss_i = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    loss_t = torch.sum(-targets.T * F.log_softmax(logits.T, dim=1), dim=1).mean()
    return (loss_i + loss_t) / 2


def augment_image(image, rng: random.Random):
    """Mild, label-preserving augmentation: crop/scale, small rotation, brightness and contrast.
    No flips: laterality matters in radiographs."""
    from PIL import ImageEnhance

    w, h = image.size
    scale, aspect = rng.uniform(0.75, 1.0), rng.uniform(0.9, 1.1)
    cw, ch = min(w, int(w * scale * math.sqrt(aspect))), min(h, int(h * scale / math.sqrt(aspect)))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((left, top, left + cw, top + ch)).rotate(rng.uniform(-8, 8), resample=2)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
    return ImageEnhance.Contrast(image).enhance(rng.uniform(0.85, 1.15))


class PairImages(torch.utils.data.Dataset):
    """Decoded, model-sized pixels and the caption of each pair (None for unreadable images)."""

    def __init__(self, pairs: list[Pair], preprocess: ImagePreprocess, augment: bool = False, seed: int = 0):
        self.pairs, self.preprocess, self.augment, self.seed = pairs, preprocess, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        pair = self.pairs[i]
        try:
            image = load_image(pair.image).image
        except ImageDecodeError:
            return None
        if self.augment:
            image = augment_image(image, random.Random(f"{self.seed}/{self.epoch}/{i}"))
        return self.preprocess.pixels(image), pair.caption


class Collate:
    """Batch pixels and tokenise captions; drops unreadable images."""

    def __init__(self, preprocess: ImagePreprocess, tokenize: Callable):
        self.preprocess, self.tokenize = preprocess, tokenize

    def __call__(self, items):
        items = [it for it in items if it is not None]
        if not items:
            return None
        captions = [c for _, c in items]
        codes = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        return {"pixel_values": self.preprocess.batch_tensor([p for p, _ in items]),
                "text": self.tokenize(captions),
                "caption_ids": torch.tensor([codes[c] for c in captions])}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lr_lambda(total_steps: int, warmup_steps: int):
    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return schedule


def train(cfg: TrainConfig, log: Callable[[str], None] = log_.info) -> TrainResult:
    """Run LoRA training as configured; returns metrics and the trained encoder."""
    from peft import PeftModel
    from tqdm import tqdm

    if cfg.epochs < 1 or cfg.accumulate < 1:
        raise DataError("--epochs and --accumulate must be >= 1")
    _seed_everything(cfg.seed)
    pairs = load_pairs(cfg.pairs, cfg.images, log=log, caption_template=cfg.caption_template)
    if cfg.val_pairs:
        train_pairs = pairs.rows
        val_pairs = load_pairs(cfg.val_pairs, cfg.images, log=log, caption_template=cfg.caption_template).rows
    else:
        train_pairs, val_pairs = split_pairs(pairs.rows, cfg.val_fraction, cfg.seed)
    if len(train_pairs) < 2:
        raise DataError(f"only {len(train_pairs)} training pairs; contrastive training needs at least 2")
    out = Path(cfg.out)
    ckpt = out / CHECKPOINT_DIR
    device = choose_device(cfg.encoder.device)
    autocast_dtype = choose_dtype(cfg.encoder.precision, device)
    if cfg.init not in ("pretrained", "scratch"):
        raise DataError("--init must be pretrained or scratch")
    scratch = cfg.init == "scratch"
    lora = cfg.lora or (LoraSettings(targets=("query", "value")) if scratch else LoraSettings())
    source = None
    if scratch:
        model, tokenizer, preprocess, source = build_scratch_model(cfg.scratch)
    else:
        model, tokenizer, preprocess = load_pretrained_parts(cfg.encoder.model, dtype=torch.float32)
    state = None
    resume_from = latest_checkpoint(ckpt) if cfg.resume else None
    if resume_from is not None:
        model = PeftModel.from_pretrained(model, str(resume_from), is_trainable=True)
        state = torch.load(resume_from / STATE_FILE, weights_only=False)
        if scratch:
            unwrap(model).load_state_dict(state["own_parameters"], strict=False)
        log(f"resuming from {resume_from} after epoch {state['epoch']}")
    elif cfg.resume:
        log(f"--resume: no checkpoint in {ckpt}, starting from scratch")
    if state is None:
        model = apply_lora(model, lora, scope="text_model" if scratch else None)
    if scratch:  # the new vision tower and both projections train fully
        for name, param in unwrap(model).named_parameters():
            if not name.startswith("text_model."):
                param.requires_grad_(True)
    model.to(device)
    apply_fastpaths(model, device)
    base = unwrap(model)
    if cfg.learn_temperature and hasattr(base, "logit_scale"):
        base.logit_scale.requires_grad_(True)
        if state is not None and "logit_scale" in state:
            base.logit_scale.data.fill_(state["logit_scale"])
    params = count_parameters(model)
    log(f"trainable parameters: {params['trainable']:,} of {params['total']:,} ({params['trainable_percent']:.3f}%)")

    encoder = Encoder(model, tokenizer, preprocess, model_name=str(out) if scratch else cfg.encoder.model,
                      device=device, batch_size=cfg.encoder.batch_size)
    model.eval()
    before = state["before"] if state else _evaluate(encoder, val_pairs or train_pairs)

    workers = cfg.workers if cfg.workers is not None else min(4, max(0, (os.cpu_count() or 2) - 1))
    augment = cfg.augment if cfg.augment is not None else scratch
    dataset = PairImages(train_pairs, preprocess, augment=augment, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.encoder.batch_size, shuffle=True, generator=generator,
        drop_last=len(train_pairs) >= 2 * cfg.encoder.batch_size, num_workers=workers,
        collate_fn=Collate(preprocess, encoder.tokenize), persistent_workers=workers > 0 and not augment)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.accumulate))
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, int(cfg.warmup * total_steps)))
    history = {"loss_per_epoch": [], "step_losses": [], "images_per_second": []}
    start_epoch = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        start_epoch = state["epoch"]
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])

    use_autocast = autocast_dtype != torch.float32
    started = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        dataset.epoch = epoch
        model.train()
        losses, seen, t0 = [], 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress,
                   dynamic_ncols=True)
        optimizer.zero_grad(set_to_none=True)
        for step, batch in enumerate(bar):
            if batch is None:
                continue
            pixels = batch["pixel_values"].to(device)
            text = {k: v.to(device) for k, v in batch["text"].items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
                img = features(model.get_image_features(pixel_values=pixels))
                txt = features(model.get_text_features(**text))
            loss = contrastive_loss(img, txt, base.logit_scale, batch["caption_ids"].to(device))
            (loss / cfg.accumulate).backward()
            if (step + 1) % cfg.accumulate == 0 or step + 1 == len(loader):
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    base.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            losses.append(float(loss.detach()))
            seen += len(pixels)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
        bar.close()
        if not losses:
            raise DataError("no readable training images")
        history["loss_per_epoch"].append(float(np.mean(losses)))
        history["step_losses"].extend(losses)
        history["images_per_second"].append(seen / (time.perf_counter() - t0))
        log(f"epoch {epoch + 1}: loss {history['loss_per_epoch'][-1]:.4f}, "
            f"{history['images_per_second'][-1]:.1f} img/s")
        _save_checkpoint(model, ckpt, {"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "history": history, "before": before,
                                       "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                                       "logit_scale": float(base.logit_scale.detach()),
                                       "own_parameters": own_parameters(model) if scratch else None})

    model.eval()
    after = _evaluate(encoder, val_pairs or train_pairs)
    if scratch:
        save_model_dir(model, tokenizer, preprocess, source, out, cfg.scratch)
    else:
        model.save_pretrained(str(out))
    metrics = {
        "init": cfg.init, "base_model": "scratch" if scratch else cfg.encoder.model,
        "scratch": asdict(cfg.scratch) if scratch else None, "caption_template": cfg.caption_template,
        "augment": augment, "parameters": params, "lora": asdict(lora),
        "epochs": cfg.epochs, "batch_size": cfg.encoder.batch_size, "accumulate": cfg.accumulate, "lr": cfg.lr,
        "seed": cfg.seed, "precision": str(autocast_dtype).replace("torch.", ""),
        "train_pairs": len(train_pairs), "val_pairs": len(val_pairs), "skipped_rows": len(pairs.skipped),
        "evaluated_on": "validation" if val_pairs else "training (no validation split)",
        "loss_per_epoch": history["loss_per_epoch"], "images_per_second": history["images_per_second"],
        "learned_logit_scale": float(base.logit_scale.detach().exp()),
        "before": before, "after": after, "train_seconds": time.perf_counter() - started,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_losses(history, out / "loss_curve.png")
    return TrainResult(metrics, out, encoder)


def _evaluate(encoder: Encoder, pairs: list[Pair]) -> dict:
    """Recall@K on all pairs, and apart on written and on template-composed captions."""
    image_vecs, text_vecs, kept, _ = embed_pairs(encoder, pairs)
    result = retrieval_metrics(image_vecs, text_vecs, [p.caption for p in kept])
    kinds = {"written": [i for i, p in enumerate(kept) if not p.composed],
             "composed": [i for i, p in enumerate(kept) if p.composed]}
    if kinds["written"] and kinds["composed"]:
        result["by_caption_kind"] = {
            kind: {"pairs": len(idx), **retrieval_metrics(image_vecs[idx], text_vecs[idx],
                                                          [kept[i].caption for i in idx])}
            for kind, idx in kinds.items()}
    return result


def _save_checkpoint(model, ckpt: Path, state: dict) -> None:
    """Write adapter + trainer state into a fresh folder, then swap it in by renames, so a kill at any
    moment leaves one complete checkpoint (`checkpoint/` or, mid-swap, `checkpoint.old/`)."""
    import shutil

    tmp, old = ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    torch.save(state, tmp / STATE_FILE)
    if ckpt.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(ckpt, old)
    os.rename(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt: Path) -> Path | None:
    """The complete checkpoint folder to resume from, if any."""
    for candidate in (ckpt, ckpt.with_name(ckpt.name + ".old")):
        if (candidate / STATE_FILE).exists():
            return candidate
    return None


def plot_losses(history: dict, path: Path) -> None:
    """Loss per step and per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = history["step_losses"]
    ax.plot(range(1, len(steps) + 1), steps, lw=0.8, alpha=0.6, label="step")
    per_epoch = len(steps) / max(1, len(history["loss_per_epoch"]))
    ax.plot([per_epoch * (i + 1) for i in range(len(history["loss_per_epoch"]))], history["loss_per_epoch"],
            "o-", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
