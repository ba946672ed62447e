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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxrmodel.constants import PATHOLOGIES
from cxrmodel.errors import DataError, ImageDecodeError
from cxrmodel.imaging.decode import load_image
from cxrmodel.imaging.preprocess import ImagePreprocess
from cxrmodel.labels.prompts import LabelConfig
from cxrmodel.model.dualencoder import ScratchSpec, build_scratch_model, own_parameters, save_model_dir
from cxrmodel.model.encoder import Encoder, EncoderConfig, choose_device, choose_dtype, features, load_pretrained_parts
from cxrmodel.model.fastpath import apply_fastpaths
from cxrmodel.model.lora import LoraSettings, apply_lora, count_parameters, unwrap
from cxrmodel.training.evaluate import embed_pairs, retrieval_metrics
from cxrmodel.training.label_loss import (
    PromptTokens,
    label_loss,
    label_vector,
    positive_weights,
    zero_shot_probabilities,
)
from cxrmodel.training.pairs import Pair, load_pairs, split_pairs
from cxrmodel.training.sampling import repeat_factors

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
        "help": "Compose captions from columns, e.g. '{view_class} {view} {modality} of the {anatomy}: {labels}' "
                "({view_class}: frontal or lateral, derived from the view column)."})
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
    label_loss: float = field(default=0.0, metadata={
        "help": "Weight of the prompt-supervised label loss on pairs with labels (0: InfoNCE only); "
                "see cxrmodel/training/label_loss.py."})
    balance: float = field(default=0.0, metadata={
        "help": "Class-balanced sampling threshold t (0: off): pairs of rare labels are drawn up to "
                "sqrt(t / frequency) times as often (repeat factor sampling, cxrmodel/training/sampling.py)."})


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
    """Decoded, model-sized pixels, the caption and the label vector of each pair (None for unreadable
    images)."""

    def __init__(self, pairs: list[Pair], preprocess: ImagePreprocess, augment: bool = False, seed: int = 0,
                 pathologies: list[str] | None = None):
        self.pairs, self.preprocess, self.augment, self.seed = pairs, preprocess, augment, seed
        self.epoch = 0
        self.targets = [label_vector(p.labels, pathologies or list(PATHOLOGIES)) for p in pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        pair = self.pairs[i]
        try:
            decoded = load_image(pair.image, model_side=self.preprocess.decode_side)
        except ImageDecodeError:
            return None
        if self.augment:  # a random crop: the decode's geometry need not follow the file's
            image = self.preprocess.resize(augment_image(decoded.image, random.Random(f"{self.seed}/{self.epoch}/{i}")))
        else:
            image = decoded.model_input(self.preprocess)
        return np.asarray(image, dtype=np.uint8), pair.caption, self.targets[i]


class Collate:
    """Batch pixels, tokenise captions, stack label vectors; drops unreadable images."""

    def __init__(self, preprocess: ImagePreprocess, tokenize: Callable):
        self.preprocess, self.tokenize = preprocess, tokenize

    def __call__(self, items):
        items = [it for it in items if it is not None]
        if not items:
            return None
        captions = [c for _, c, _ in items]
        codes = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        return {"pixel_values": self.preprocess.batch_tensor([p for p, _, _ in items]),
                "text": self.tokenize(captions),
                "caption_ids": torch.tensor([codes[c] for c in captions]),
                "targets": torch.tensor([t for _, _, (t, _) in items], dtype=torch.float32),
                "labelled": torch.tensor([labelled for _, _, (_, labelled) in items], dtype=torch.bool)}


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


@dataclass
class TrainData:
    """The pairs a run trains and evaluates on."""

    train: list[Pair]
    val: list[Pair]
    skipped_rows: int


@dataclass
class TrainModel:
    """The model being trained, its parts, and the checkpoint state it resumes from (if any)."""

    model: torch.nn.Module
    tokenizer: object
    preprocess: ImagePreprocess
    lora: LoraSettings
    scratch: bool
    source: object = None  # --init scratch: where the text tower came from
    state: dict | None = None  # trainer state of the checkpoint resumed from

    @property
    def base(self):
        """The unwrapped model (its logit_scale, its towers)."""
        return unwrap(self.model)


@dataclass
class TrainLoop:
    """Data loader, optimiser, schedule and the history they write."""

    dataset: PairImages
    loader: torch.utils.data.DataLoader
    generator: torch.Generator
    trainable: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    history: dict
    start_epoch: int
    augment: bool
    prompts: PromptTokens | None = None  # --label-loss: the zero-shot prompts, tokenised
    label_weights: torch.Tensor | None = None


def build_data(cfg: TrainConfig, log: Callable[[str], None] = log_.info) -> TrainData:
    """Load the pairs file(s) and split off the validation pairs (seeded)."""
    pairs = load_pairs(cfg.pairs, cfg.images, log=log, caption_template=cfg.caption_template)
    if cfg.val_pairs:
        train_pairs = pairs.rows
        val_pairs = load_pairs(cfg.val_pairs, cfg.images, log=log, caption_template=cfg.caption_template).rows
    else:
        train_pairs, val_pairs = split_pairs(pairs.rows, cfg.val_fraction, cfg.seed)
    if len(train_pairs) < 2:
        raise DataError(f"only {len(train_pairs)} training pairs; contrastive training needs at least 2")
    return TrainData(train_pairs, val_pairs, len(pairs.skipped))


def build_model(cfg: TrainConfig, device: torch.device, log: Callable[[str], None] = log_.info) -> TrainModel:
    """The model to train: the base checkpoint (or a new vision tower) with LoRA, resumed from the last
    checkpoint under `cfg.out` when `cfg.resume`, on `device` with the exact fast paths."""
    from peft import PeftModel

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
    ckpt = Path(cfg.out) / CHECKPOINT_DIR
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
    return TrainModel(model, tokenizer, preprocess, lora, scratch, source, state)


def build_loop(cfg: TrainConfig, built: TrainModel, data: TrainData, encoder: Encoder) -> TrainLoop:
    """Loader (seeded shuffle or class-balanced draws, decode workers), AdamW and the warm-up + cosine
    schedule, restored from the checkpoint state when resuming."""
    workers = cfg.workers if cfg.workers is not None else min(4, max(0, (os.cpu_count() or 2) - 1))
    augment = cfg.augment if cfg.augment is not None else built.scratch
    labels = LabelConfig()
    dataset = PairImages(data.train, built.preprocess, augment=augment, seed=cfg.seed,
                         pathologies=list(labels.pathologies))
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = None
    if cfg.balance > 0:  # drawn with replacement, one epoch's worth of pairs per epoch
        sampler = torch.utils.data.WeightedRandomSampler(
            repeat_factors([p.labels for p in data.train], cfg.balance), len(data.train), generator=generator)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.encoder.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
        drop_last=len(data.train) >= 2 * cfg.encoder.batch_size, num_workers=workers,
        collate_fn=Collate(built.preprocess, encoder.tokenize), persistent_workers=workers > 0 and not augment)
    trainable = [p for p in built.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.accumulate))
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, int(cfg.warmup * total_steps)))
    history = {"loss_per_epoch": [], "step_losses": [], "images_per_second": []}
    start_epoch = 0
    state = built.state
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        start_epoch = state["epoch"]
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
    prompts = weights = None
    if cfg.label_loss > 0:
        prompts = PromptTokens.build(labels, encoder.tokenize)
        targets = torch.tensor([t for t, _ in dataset.targets], dtype=torch.float32)
        weights = positive_weights(targets, torch.tensor([lab for _, lab in dataset.targets], dtype=torch.bool))
    return TrainLoop(dataset, loader, generator, trainable, optimizer, scheduler, history, start_epoch, augment,
                     prompts, weights)


def train_one_epoch(cfg: TrainConfig, built: TrainModel, loop: TrainLoop, epoch: int, device: torch.device,
                    autocast_dtype: torch.dtype) -> tuple[list[float], int, float]:
    """One pass over the loader with gradient accumulation; (losses per micro-batch, images, seconds)."""
    from tqdm import tqdm

    model, base, optimizer = built.model, built.base, loop.optimizer
    loop.dataset.epoch = epoch
    model.train()
    losses, seen, t0 = [], 0, time.perf_counter()
    bar = tqdm(loop.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress,
               dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(bar):
        if batch is None:
            continue
        pixels = batch["pixel_values"].to(device)
        text = {k: v.to(device) for k, v in batch["text"].items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            img = features(model.get_image_features(pixel_values=pixels))
            txt = features(model.get_text_features(**text))
        loss = contrastive_loss(img, txt, base.logit_scale, batch["caption_ids"].to(device))
        if loop.prompts is not None:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
                prompt_vecs = features(model.get_text_features(**loop.prompts.tokens))
            probs = zero_shot_probabilities(img, prompt_vecs, loop.prompts, base.logit_scale)
            loss = loss + cfg.label_loss * label_loss(probs, batch["targets"].to(device),
                                                      batch["labelled"].to(device), loop.label_weights.to(device))
        (loss / cfg.accumulate).backward()
        if (step + 1) % cfg.accumulate == 0 or step + 1 == len(loop.loader):
            torch.nn.utils.clip_grad_norm_(loop.trainable, cfg.max_grad_norm)
            optimizer.step()
            loop.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                base.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(float(loss.detach()))
        seen += len(pixels)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
    bar.close()
    if not losses:
        raise DataError("no readable training images")
    return losses, seen, time.perf_counter() - t0


def save_outputs(cfg: TrainConfig, built: TrainModel, metrics: dict, history: dict) -> None:
    """The adapter (or the whole scratch model directory), metrics.json and loss_curve.png in `cfg.out`."""
    out = Path(cfg.out)
    if built.scratch:
        save_model_dir(built.model, built.tokenizer, built.preprocess, built.source, out, cfg.scratch)
    else:
        built.model.save_pretrained(str(out))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_losses(history, out / "loss_curve.png")


def train(cfg: TrainConfig, log: Callable[[str], None] = log_.info) -> TrainResult:
    """Run LoRA training as configured: data, model, loop, one epoch at a time (each checkpointed),
    evaluation before and after, outputs. Returns metrics and the trained encoder."""
    if cfg.epochs < 1 or cfg.accumulate < 1:
        raise DataError("--epochs and --accumulate must be >= 1")
    if not 0.0 <= cfg.balance <= 1.0:
        raise DataError(f"--balance must be between 0 (off) and 1, not {cfg.balance}")
    _seed_everything(cfg.seed)
    data = build_data(cfg, log)
    out = Path(cfg.out)
    device = choose_device(cfg.encoder.device)
    autocast_dtype = choose_dtype(cfg.encoder.precision, device)
    built = build_model(cfg, device, log)
    params = count_parameters(built.model)
    log(f"trainable parameters: {params['trainable']:,} of {params['total']:,} ({params['trainable_percent']:.3f}%)")
    encoder = Encoder(built.model, built.tokenizer, built.preprocess,
                      model_name=str(out) if built.scratch else cfg.encoder.model, device=device,
                      batch_size=cfg.encoder.batch_size)
    built.model.eval()
    evaluated = data.val or data.train
    before = built.state["before"] if built.state else evaluate(encoder, evaluated)
    loop = build_loop(cfg, built, data, encoder)
    history, base = loop.history, built.base
    started = time.perf_counter()
    for epoch in range(loop.start_epoch, cfg.epochs):
        losses, seen, seconds = train_one_epoch(cfg, built, loop, epoch, device, autocast_dtype)
        history["loss_per_epoch"].append(float(np.mean(losses)))
        history["step_losses"].extend(losses)
        history["images_per_second"].append(seen / seconds)
        log(f"epoch {epoch + 1}: loss {history['loss_per_epoch'][-1]:.4f}, "
            f"{history['images_per_second'][-1]:.1f} img/s")
        _save_checkpoint(built.model, out / CHECKPOINT_DIR, {
            "epoch": epoch + 1, "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
            "history": history, "before": before, "generator": loop.generator.get_state(),
            "torch_rng": torch.get_rng_state(), "logit_scale": float(base.logit_scale.detach()),
            "own_parameters": own_parameters(built.model) if built.scratch else None})
    built.model.eval()
    after = evaluate(encoder, evaluated)
    metrics = {
        "init": cfg.init, "base_model": "scratch" if built.scratch else cfg.encoder.model,
        "scratch": asdict(cfg.scratch) if built.scratch else None, "caption_template": cfg.caption_template,
        "augment": loop.augment, "label_loss": cfg.label_loss, "balance": cfg.balance,
        "parameters": params, "lora": asdict(built.lora),
        "epochs": cfg.epochs, "batch_size": cfg.encoder.batch_size, "accumulate": cfg.accumulate, "lr": cfg.lr,
        "seed": cfg.seed, "precision": str(autocast_dtype).replace("torch.", ""),
        "train_pairs": len(data.train), "val_pairs": len(data.val), "skipped_rows": data.skipped_rows,
        "evaluated_on": "validation" if data.val else "training (no validation split)",
        "loss_per_epoch": history["loss_per_epoch"], "images_per_second": history["images_per_second"],
        "learned_logit_scale": float(base.logit_scale.detach().exp()),
        "before": before, "after": after, "train_seconds": time.perf_counter() - started,
    }
    save_outputs(cfg, built, metrics, history)
    return TrainResult(metrics, out, encoder)


def evaluate(encoder: Encoder, pairs: list[Pair]) -> dict:
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
