"""Flags shared by several subcommands, and their translation into config dataclasses."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxrmodel.constants import DEFAULT_DATA_DIR
from cxrmodel.model.config import PRECISIONS, EncoderConfig, resolve_model_name


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=Path(DEFAULT_DATA_DIR),
                   help=f"directory holding radlens.db and the FAISS files (default ./{DEFAULT_DATA_DIR})")
    p.add_argument("--db-url", default=None,
                   help="SQLAlchemy URL of the metadata DB, e.g. postgresql+psycopg://user@host/db (default: the URL "
                        "the data dir remembers from its first --db-url, else SQLite in --data-dir)")


def add_model(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    p.add_argument("--model", default=None,
                   help="hub id or local directory of the checkpoint (default: $RADLENS_MODEL, "
                        "else openai/clip-vit-base-patch32)")
    p.add_argument("--revision", default=None,
                   help="hub models: the commit, branch or tag to load (default: the latest; an index records the "
                        "commit it was built with and refuses another without --rebuild)")
    if adapter:
        p.add_argument("--adapter", default=None, help="directory of a LoRA adapter saved by `radlens train`")
        p.add_argument("--merge", action="store_true", help="merge the adapter into the weights")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 where the CPU/GPU runs it fast")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")


def encoder_config(args: argparse.Namespace) -> EncoderConfig:
    return EncoderConfig(model=resolve_model_name(args.model), adapter=getattr(args, "adapter", None),
                         merge=getattr(args, "merge", False), precision=args.precision, device=args.device,
                         batch_size=args.batch_size, revision=getattr(args, "revision", None))


def _number(text: str, kind) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (argparse type)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse type)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return value


def probability(text: str) -> float:
    """A finite number in [0, 1] (argparse type)."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} must lie in [0, 1]")
    return value


def tcp_port(text: str) -> int:
    """A TCP port, 1..65535 (argparse type)."""
    value = _number(text, int)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1-65535)")
    return value


def print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))
