"""Flags shared by several subcommands, and their translation into config dataclasses."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxrmodel.encoder import PRECISIONS, EncoderConfig, resolve_model_name
from indexer.pipeline import DEFAULT_DATA_DIR


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
    if adapter:
        p.add_argument("--adapter", default=None, help="directory of a LoRA adapter saved by `radlens train`")
        p.add_argument("--merge", action="store_true", help="merge the adapter into the weights")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 where the CPU/GPU runs it fast")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")


def encoder_config(args: argparse.Namespace) -> EncoderConfig:
    return EncoderConfig(model=resolve_model_name(args.model), adapter=getattr(args, "adapter", None),
                         merge=getattr(args, "merge", False), precision=args.precision, device=args.device,
                         batch_size=args.batch_size)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))
