"""How strong is a search's best match? Measured against what this model and this index give for
content that is not there.

- Text queries: the *null* is the best score that each of ~40 unrelated probe queries (everyday
  objects and scenes, no medical words) reaches in this index. A hit is `strong` when it beats every
  probe's best match, `weak` when it beats at least half of them, `none` otherwise.
- Image queries: the null is the nearest-neighbour similarity of up to 500 indexed images sampled at
  random (the image itself excluded). A hit is `strong` when it is at least as close as 90% of indexed
  images are to their own nearest neighbour, `weak` when it is at least as close as 1% of them are,
  `none` otherwise. Indexes that cannot give back their vectors (compressed ones) say `not measured`.

Both are computed once per served state (index and model), on first use. `bench/relevance.py` measures
how often each verdict is right on the dev corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROBES = (
    "a photo of a dog", "a cat sleeping on a sofa", "a red sports car", "a bowl of fresh fruit",
    "a snowy mountain landscape", "a city street at night", "a plate of spaghetti", "a bicycle leaning on a wall",
    "a sandy beach with palm trees", "a football match in a stadium", "a birthday cake with candles",
    "a laptop on a desk", "a sunflower in a garden", "a cup of coffee", "an airplane in a blue sky",
    "a wooden chair", "an acoustic guitar", "a horse in a green field", "a pair of running shoes",
    "an open book on a table", "a sailing boat on the sea", "a slice of pizza", "a tall office building",
    "a child playing with a ball", "a bird on a branch", "a bowl of ramen", "a vintage typewriter",
    "a crowded market", "a waterfall in a forest", "a cartoon drawing of a robot", "a page of handwritten text",
    "a map of europe", "a bar chart of sales figures", "a painting of a sunset", "a chessboard",
    "a teddy bear", "fireworks over a river", "a kitchen with a fridge", "a tractor on a farm", "a goldfish bowl",
)
IMAGE_SAMPLE = 500


@dataclass(frozen=True)
class Match:
    """A hit's verdict and where its score lies in the null (`percentile`: share of the null below it)."""

    verdict: str  # strong, weak, none, or not measured
    percentile: float | None
    basis: str
    by_score: bool = True  # False: decided before the score, e.g. the query is not a radiological image

    @property
    def words(self) -> str:
        """The verdict as shown: "strong match", "weak match", "no match" or "match not measured"."""
        return {"none": "no match", "not measured": "match not measured"}.get(self.verdict, f"{self.verdict} match")

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "percentile": None if self.percentile is None else round(self.percentile, 3),
                "basis": self.basis}


@dataclass(frozen=True)
class Baseline:
    """The null scores of one served index and model."""

    text_null: np.ndarray  # sorted best scores of the unrelated probes
    image_null: np.ndarray | None  # sorted nearest-neighbour similarities of sampled indexed images

    def text_match(self, score: float) -> Match:
        """Verdict of a text query's hit score."""
        below = float(np.searchsorted(self.text_null, score, side="left")) / len(self.text_null)
        verdict = "strong" if score > self.text_null[-1] else "weak" if below >= 0.5 else "none"
        return Match(verdict, below, f"vs the best matches of {len(self.text_null)} unrelated probe queries")

    def image_match(self, score: float) -> Match:
        """Verdict of an image query's hit score."""
        if self.image_null is None or not len(self.image_null):
            return Match("not measured", None, "this index cannot give back its vectors to measure a null")
        below = float(np.searchsorted(self.image_null, score, side="right")) / len(self.image_null)
        verdict = "strong" if below >= 0.10 else "weak" if below >= 0.01 else "none"
        return Match(verdict, below, f"vs the nearest-neighbour similarity of {len(self.image_null)} indexed images")


def build_baseline(encoder, index, scorer, seed: int = 0) -> Baseline:
    """Search the index with the probes and, where it can give back vectors, with a sample of its own."""
    probes = encoder.encode_queries(list(PROBES)).astype(np.float32)
    top, _ = index.search(probes, 1)
    text_null = np.sort(top[:, 0][np.isfinite(top[:, 0])])
    image_null = None
    if scorer is not None and scorer.capable and not hasattr(index, "exact_scores"):
        held = scorer.held_ids()
        if len(held) > 1:
            pick = np.sort(np.random.default_rng(seed).choice(held, size=min(IMAGE_SAMPLE, len(held)), replace=False))
            vectors = np.asarray(index.reconstruct_batch(pick), dtype=np.float32)
            scores, ids = index.search(vectors, 2)
            nearest = np.where(ids[:, 0] == pick, scores[:, 1], scores[:, 0])  # the image itself excluded
            image_null = np.sort(nearest[np.isfinite(nearest)])
    return Baseline(text_null if len(text_null) else np.array([np.inf]), image_null)


def baseline_key(generation: int, index_state: dict, query_fingerprint: str, seed: int = 0) -> dict:
    """What a baseline depends on: the index's contents, the query encoder's numbers, the probes."""
    return {"generation": generation, "index": index_state, "query": query_fingerprint, "seed": seed,
            "probes": hashlib.sha256("\n".join(PROBES).encode()).hexdigest()[:16], "sample": IMAGE_SAMPLE}


def cached_baseline(cache_dir: Path | None, key: dict, compute: Callable[[], Baseline]) -> Baseline:
    """`compute()` once per `key` and data dir, kept as a small file under `cache_dir` so that the next process
    (a `radlens search` at a terminal) does not encode the 40 probes again; a cache that cannot be read or
    written is only a cache."""
    if cache_dir is None:
        return compute()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"relevance-{digest}.npz"
    try:
        with np.load(path) as data:
            return Baseline(data["text_null"], data["image_null"] if bool(data["has_image_null"]) else None)
    except (OSError, ValueError, KeyError):
        pass
    baseline = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
        np.savez(tmp, text_null=baseline.text_null, has_image_null=baseline.image_null is not None,
                 image_null=baseline.image_null if baseline.image_null is not None else np.zeros(0))
        tmp.replace(path)
    except OSError:
        pass
    return baseline
