"""Which checkpoint to load and how to run it: `EncoderConfig`, importable without torch (the CLI's flags
and the torch-free query path need it before any model is loaded)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
MODEL_ENV = "RADLENS_MODEL"
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class EncoderConfig:
    """Which checkpoint to load and how to run it."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub id or local directory of the checkpoint."})
    adapter: str | None = field(default=None, metadata={"help": "Directory of a peft LoRA adapter."})
    merge: bool = field(default=False, metadata={"help": "Merge the adapter into the weights for inference."})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 where fast; on CPU the text tower then runs int8), bf16 or fp32 (exact)."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]."})
    revision: str | None = field(default=None, metadata={
        "help": "Hub models: the commit (or branch/tag) to load; None: the latest. Indexes record the one loaded."})
    batch_size: int = field(default=32, metadata={"help": "Images or texts per forward pass."})


def resolve_model_name(cli_value: str | None = None) -> str:
    """`--model` if given, else `$RADLENS_MODEL`, else the hub default."""
    return cli_value or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
