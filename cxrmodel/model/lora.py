"""LoRA adapters through peft: settings as a dataclass, applied and counted in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from cxrmodel.errors import DataError


@dataclass(frozen=True)
class LoraSettings:
    """Which modules get low-rank adapters, and how large."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha (effective scale alpha/r)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input."})
    targets: tuple[str, ...] = field(default=("q_proj", "v_proj"), metadata={
        "help": "Module names to adapt, e.g. q_proj,k_proj,v_proj,out_proj,fc1,fc2 (CLIP) or query,value (BERT)."})
    init_weights: bool = field(default=True, metadata={"help": "peft's init (B=0: the adapter starts as a no-op)."})


def apply_lora(model, settings: LoraSettings, scope: str | None = None):
    """Wrap `model` in a trainable peft LoRA model; the base weights are frozen.

    `scope` (a module-name prefix such as ``text_model``) limits the adapters to one tower.
    """
    import re

    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
             if scope is None or name.startswith(scope + ".")}
    missing = [t for t in settings.targets if t not in names]
    if missing or not settings.targets:
        raise DataError(f"LoRA targets {missing or '(none)'} match no module of this model; "
                        f"try q_proj,v_proj (CLIP) or query,value (BERT-style)")
    if settings.rank < 1:
        raise DataError("--rank must be >= 1")
    targets = list(settings.targets) if scope is None else \
        rf"{re.escape(scope)}\..*\.({'|'.join(re.escape(t) for t in settings.targets)})"
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, init_lora_weights=settings.init_weights, bias="none")
    return get_peft_model(model, config)


def unwrap(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def count_parameters(model) -> dict:
    """Trainable and total parameter counts, and the trainable percentage."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": int(trainable), "total": int(total), "trainable_percent": 100.0 * trainable / max(total, 1)}
