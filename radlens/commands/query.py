"""`radlens search`, `radlens similar`, `radlens label`: queries through `search.Engine`.

`--json` output is stable: see README "JSON output".
"""

from __future__ import annotations

import sys
from pathlib import Path

from cxrmodel.errors import DataError

from .common import add_data_dir, positive_int, print_json, probability


def _engine_flags(p) -> None:
    add_data_dir(p)
    p.add_argument("--model", default=None, help="override the model the index was built with")
    p.add_argument("--labels", default=None, help="JSON file overriding prompts, weights and thresholds")
    p.add_argument("--calibration", default=None,
                   help="calibration.json of the model (default: the model directory's own, if it has one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _search_flags(p) -> None:
    p.add_argument("-k", type=positive_int, default=10, help="number of results (default 10)")
    p.add_argument("--min-match", choices=("none", "weak", "strong"), default="none",
                   help="drop hits whose relevance verdict is below this (see README: relevance)")
    p.add_argument("--filter", action="append", default=[], metavar="EXPR",
                   help="modality=CT, view=PA, body_part=chest, source=..., or effusion>=0.6 (repeatable)")
    p.add_argument("--no-query-tower", action="store_true",
                   help="embed a text query with the torch encoder even where the index has an ONNX query tower")
    _engine_flags(p)


def register(sub) -> None:
    p = sub.add_parser("search", help="text-to-image search", description="Find images matching a text query.")
    p.add_argument("query", help='e.g. "lateral lumbar spine"')
    _search_flags(p)
    p.set_defaults(run=run_search)

    p = sub.add_parser("similar", help="image-to-image search",
                       description="Find indexed images like IMAGE, or like indexed image --id N (more like this).")
    p.add_argument("image", nargs="?", help="an image or DICOM file")
    p.add_argument("--id", type=int, default=None, dest="image_id",
                   help="an indexed image's id (as `radlens search --json` prints it) instead of a file")
    _search_flags(p)
    p.set_defaults(run=run_similar)

    p = sub.add_parser("label", help="zero-shot pathology labels and a report for one image",
                       description="Score the 14 ChestX-ray14 pathologies and write a structured report.")
    p.add_argument("image", help="an image or DICOM file")
    p.add_argument("--report", choices=("md", "json", "pdf"), default=None, help="also write a report")
    p.add_argument("--out", default=None, help="report file (default: stdout for md/json, IMAGE.pdf for pdf)")
    p.add_argument("--threshold", type=probability, default=None, help="one threshold for all pathologies, in [0, 1]")
    p.add_argument("--lang", default="en", help="report language: en or de")
    p.add_argument("--modality", default=None, help="what the image is, if you know (e.g. CR, DX, CT): decides "
                                                    "where the labels apply instead of the model's guess")
    p.add_argument("--body-part", default=None, help="e.g. chest")
    p.add_argument("--view", default=None, help="e.g. PA, AP, LATERAL")
    _engine_flags(p)
    p.add_argument("--precision", default="auto", help="without an index: auto, bf16 or fp32")
    p.set_defaults(run=run_label)


def open_engine(args):
    from search.engine import Engine, EngineConfig

    return Engine.open(EngineConfig(data_dir=args.data_dir, db_url=args.db_url, model=args.model,
                                    labels_file=args.labels, calibration=args.calibration,
                                    query_tower=not getattr(args, "no_query_tower", False),
                                    query_tower_prepack=False))  # one query per process: open fast


MATCH_RANK = {"not measured": 0, "none": 0, "weak": 1, "strong": 2}


def _kept(hits, args) -> list:
    """Hits at or above `--min-match` (an unmeasured verdict passes only `none`)."""
    floor = MATCH_RANK[args.min_match]
    return [h for h in hits if h.match is None or MATCH_RANK[h.match.verdict] >= floor]


def _print_hits(title: str, hits, args, extra: dict) -> None:
    hits = _kept(hits, args)
    if args.json:
        print_json({**extra, "k": args.k, "filters": list(args.filter), "results": [h.to_dict() for h in hits]})
        return
    print(title)
    if not hits:
        print("  no results" + (f" at --min-match {args.min_match}" if args.min_match != "none" else ""))
    elif all(h.match is not None and h.match.verdict != "strong" for h in hits):
        print(f"  no good match in this index ({hits[0].match.basis}); the closest images:")
    for rank, hit in enumerate(hits, 1):
        img = hit.image
        desc = " ".join(str(img[k]) for k in ("modality", "body_part", "view") if img.get(k))
        chips = ", ".join(f"{p} p={v:.2f}" for p, v in hit.top_pathologies())
        verdict = f" [{hit.match.words}]" if hit.match is not None else ""
        print(f"{rank:>3}. id={hit.id:<6} cosine={hit.score:.4f}{verdict}  {img['file_name']}  {desc}"
              + (f"  [{chips}]" if chips else ""))
    if any(hit.top_pathologies() for hit in hits):
        print("  p = calibrated probability, shown for the pathologies this model assesses "
              "(`radlens label` gives each one's measured AUROC)")


def run_search(args) -> int:
    engine = open_engine(args)
    hits = engine.text(args.query, k=args.k, filters=engine.parse_filters(args.filter))
    _print_hits(f"Results for {args.query!r}:", hits, args, {"query": args.query})
    return 0


def _read(path: str, engine):
    from cxrmodel.imaging.decode import load_image

    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    return load_image(path, engine.config.limits)


def run_similar(args) -> int:
    if (args.image is None) == (args.image_id is None):
        raise DataError("give an image file or --id N (not both)")
    engine = open_engine(args)
    filters = engine.parse_filters(args.filter)
    if args.image_id is not None:
        hits = engine.similar_to(args.image_id, k=args.k, filters=filters)
        _print_hits(f"Images similar to indexed image {args.image_id}:", hits, args, {"image_id": args.image_id})
        return 0
    hits = engine.image(_read(args.image, engine), k=args.k, filters=filters)
    _print_hits(f"Images similar to {args.image}:", hits, args, {"image": Path(args.image).name})
    return 0


def _print_scores(scores) -> None:
    """Assessed pathologies as calibrated probabilities (* at or above threshold); the others as raw scores
    with the measured reason they are not assessed."""
    assessed = sorted((s for s in scores if s.assessed), key=lambda s: -s.probability)
    for s in assessed:
        mark = "*" if s.positive else " "
        low, high = s.spread_range
        print(f" {mark} {s.pathology:<20} probability {s.probability:.3f} ({low:.2f}-{high:.2f} across preprocessings; "
              f"threshold {s.threshold:.2f}; {s.skill.get('reason', '')})")
    others = [s for s in scores if not s.assessed]
    if others:
        print("  not assessed by this model (raw zero-shot scores, not probabilities; never findings):"
              if assessed or others[0].skill.get("auroc") is not None else
              "  uncalibrated scores (no calibration for this model; not probabilities; never findings):")
        for s in sorted(others, key=lambda s: -s.probability):
            print(f"    {s.pathology:<20} score {s.probability:.3f}  {s.skill.get('reason', '')}")


class IndexlessLabeller:
    """`radlens label` where the data dir holds no index: the model named by --model (else $RADLENS_MODEL,
    else the default) labels the file directly, with the same labeller and calibration an engine uses."""

    def __init__(self, args):
        from cxrmodel.imaging.decode import ImageLimits
        from cxrmodel.labels.prompts import load_label_config
        from cxrmodel.model.config import EncoderConfig, resolve_model_name
        from cxrmodel.model.encoder import load_encoder
        from search.labelling import Labeller

        self.encoder = load_encoder(EncoderConfig(model=resolve_model_name(args.model), precision=args.precision))
        self.labeller = Labeller(load_label_config(args.labels), args.calibration)
        self.limits = ImageLimits()
        if args.calibration:
            self.labeller.calibration(self.encoder)  # another model's file is refused before any work

    def assess(self, image, metadata: dict):
        return self.labeller.assess(self.encoder, image, metadata)

    def report(self, image, metadata: dict, threshold, scores, decision, lang: str):
        from search.labelling import report_metadata

        return self.labeller.report(scores, decision, report_metadata(image, metadata), threshold, lang)


def _labeller_for(args):
    """The data dir's engine when it holds an index, else an `IndexlessLabeller`."""
    from indexer.store import has_database

    if args.db_url or has_database(args.data_dir):
        engine = open_engine(args)
        return engine, engine.config.limits
    labeller = IndexlessLabeller(args)
    return labeller, labeller.limits


def run_label(args) -> int:
    from cxrmodel.imaging.decode import load_image
    from cxrmodel.reporting.report import text_for, to_json, to_markdown, to_pdf

    text_for(args.lang)  # an unknown language fails before the model loads
    if not Path(args.image).is_file():
        raise DataError(f"{args.image}: no such file")
    labeller, limits = _labeller_for(args)
    image = load_image(args.image, limits)
    given = {k: v for k, v in (("modality", args.modality), ("body_part", args.body_part), ("view", args.view)) if v}
    decision, scores = labeller.assess(image, given)
    report = labeller.report(image, {"file_name": Path(args.image).name, **given}, args.threshold, scores, decision,
                             args.lang)
    if args.threshold is not None:
        for s in scores:
            s.threshold = args.threshold
    if args.json and args.report is None:
        print_json({"image": Path(args.image).name, "applicability": decision.to_dict(),
                    "labels": [s.to_dict() for s in scores], "report": report.to_dict()})
        return 0
    if args.report is None:
        if not decision.applicable:
            print(f"{args.image}: the 14 chest X-ray labels do not apply ({decision.reason}; decided from "
                  f"{decision.basis()})")
            return 0
        print(f"Zero-shot labels for {args.image} (chest radiograph{' ' + decision.view if decision.view else ''}, "
              f"decided from {decision.basis()}):")
        _print_scores(scores)
        return 0
    if args.report == "pdf":
        import hashlib

        from cxrmodel.reporting.documents import pdf_context

        context = pdf_context(scores, decision, args.threshold, args.lang, image=image.image,
                              file_name=Path(args.image).name,
                              content_hash=hashlib.sha256(Path(args.image).read_bytes()).hexdigest(),
                              encoder=labeller.encoder)
        out = Path(args.out or Path(args.image).with_suffix(".report.pdf").name)
        out.write_bytes(to_pdf(report, context))
        print(f"wrote {out}")
        return 0
    text = to_markdown(report) if args.report == "md" else to_json(report)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))
    return 0
