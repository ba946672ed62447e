"""Zero-shot labelling of the 14 ChestX-ray14 pathologies with prompt and preprocessing ensembles.

An ensemble *member* is one (preprocessing variant, prompt set) pair. For each member and
pathology the probability is the two-way softmax between the image's similarity to the mean
positive-prompt embedding and to the mean negative-prompt embedding, at the model's own
temperature. The label's value is the weighted mean over the prompt sets of the image as the model sees
it (what the index stores). Its uncertainty is the weighted spread (2 x standard deviation, so it lies in
[0, 1]) of that same prompt-ensemble value across the preprocessing variants, in the units shown: raw
scores stay raw, and a calibration maps every variant's value before the spread is taken. The prompt
sets' disagreement is not counted: each set sits at its own level for every image (one set's scores run
high, another's low), so their spread measures the templates, not the image.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cxrmodel.labels.prompts import LabelConfig

_bank_lock = threading.Lock()


@dataclass
class PromptBank:
    """Text embeddings of every prompt set, computed once per (encoder, prompts)."""

    set_names: list[str]
    pathologies: list[str]
    positive: np.ndarray  # (sets, pathologies, dim)
    negative: np.ndarray  # (sets, pathologies, dim)
    logit_scale: float


@dataclass
class LabelScore:
    """One pathology's value and uncertainty, with each ensemble member's raw score.

    `probability` is a calibrated probability only where `assessed` (a calibration showed skill for
    this pathology); otherwise it is the raw zero-shot score, which is not a probability, and
    `positive` is always False: an unassessed pathology is never a finding. `skill` says why.
    """

    pathology: str
    probability: float
    uncertainty: float
    threshold: float
    members: dict[str, float] = field(default_factory=dict)
    assessed: bool = False  # True only through `apply_calibration`, where a calibration showed skill
    skill: dict = field(default_factory=dict)
    raw: float | None = None  # the uncalibrated score (what the index stores)
    # the raw prompt-ensemble value of each preprocessing variant (uncalibrated, like `raw`) and its weight
    variants: dict[str, float] = field(default_factory=dict)
    variant_weights: dict[str, float] = field(default_factory=dict)
    low_high: tuple[float, float] | None = None  # the lowest and highest variant value, in the units shown

    @property
    def spread_range(self) -> tuple[float, float]:
        """The lowest and highest value across the weighted preprocessing variants, in the units of
        `probability`; without variants, the value -/+ half the uncertainty."""
        if self.low_high is not None:
            return self.low_high
        half = self.uncertainty / 2
        return max(0.0, self.probability - half), min(1.0, self.probability + half)

    @property
    def positive(self) -> bool:
        return self.assessed and self.probability >= self.threshold

    @property
    def kind(self) -> str:
        """'probability' (calibrated, assessed) or 'score' (raw: not a probability)."""
        return "probability" if self.assessed else "score"

    def to_dict(self) -> dict:
        return {"pathology": self.pathology, "kind": self.kind, "assessed": self.assessed,
                "probability" if self.assessed else "score": round(self.probability, 4),
                "raw_score": round(self.raw if self.raw is not None else self.probability, 4),
                "uncertainty": round(self.uncertainty, 4), "range": [round(x, 4) for x in self.spread_range],
                "threshold": self.threshold if self.assessed else None,
                "positive": self.positive, "skill": self.skill,
                "members": {k: round(v, 4) for k, v in self.members.items()},
                "variants": {k: round(v, 4) for k, v in self.variants.items()}}


def apply_calibration(scores: list[LabelScore], calibration) -> list[LabelScore]:
    """Scores as a calibration says they may be read: assessed pathologies get their calibrated
    probability, threshold and an uncertainty in probability units (every variant's value mapped); the
    others (and every one, without a calibration) stay raw scores, marked not assessed with the measured
    reason. Pure: new objects, read from each score's raw values (`read_through`)."""
    out = []
    for s in scores:
        cal = calibration.pathologies.get(s.pathology) if calibration is not None else None
        if cal is None:
            skill = {"reason": "no calibration for this model: its scores are uncalibrated (run `radlens calibrate`)"
                     if calibration is None else "not in this model's calibration"}
        else:
            skill = {"reason": cal.reason, "auroc": cal.auroc, "auroc_95ci": [cal.auroc_low, cal.auroc_high],
                     "positives": cal.positives, "negatives": cal.negatives}
        if cal is not None and cal.assessed:
            skill.update(sensitivity=cal.sensitivity, specificity=cal.specificity, threshold=float(cal.threshold))
            out.append(read_through(replace(s, threshold=float(cal.threshold)), cal.probability, skill))
        else:
            out.append(read_through(s, None, skill))
    return out


def read_through(score: LabelScore, to_probability=None, skill: dict | None = None) -> LabelScore:
    """`score` in the units it is shown in: through the monotone map `to_probability` (assessed), or as its
    raw score (None). Value, spread and range are all taken from the raw values, so units never mix; a score
    without variants maps its band, raw -/+ half its spread."""
    raw = score.raw if score.raw is not None else score.probability
    shown = to_probability or (lambda x: x)
    names = [k for k in score.variants if score.variant_weights.get(k, 0.0) > 0]
    if names:
        values = np.array([float(shown(score.variants[k])) for k in names])
        spread = float(combine(values, np.array([score.variant_weights[k] for k in names]))[1])
        low_high = (float(min(values.min(), shown(raw))), float(max(values.max(), shown(raw))))
    elif to_probability is not None:
        half = score.uncertainty / 2
        low_high = (float(shown(max(0.0, raw - half))), float(shown(min(1.0, raw + half))))
        spread = low_high[1] - low_high[0]
    else:
        spread, low_high = score.uncertainty, None
    return replace(score, probability=float(shown(raw)), uncertainty=spread, low_high=low_high, raw=raw,
                   assessed=to_probability is not None, skill=skill if skill is not None else score.skill)


def _mean_direction(vectors: np.ndarray) -> np.ndarray:
    mean = vectors.mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def prompt_bank(encoder, config: LabelConfig) -> PromptBank:
    """The `PromptBank` of `encoder` for `config`'s prompts: computed once per model and prompt set,
    kept in memory and, when the encoder has a `cache_dir`, on disk for the next process."""
    key = config.fingerprint()
    with _bank_lock:
        cache = encoder.__dict__.setdefault("_prompt_banks", {})
        if key not in cache:
            cache[key] = _load_or_build_bank(encoder, config)
        return cache[key]


def _load_or_build_bank(encoder, config: LabelConfig) -> PromptBank:
    import hashlib
    import os

    cache_dir = getattr(encoder, "cache_dir", None)
    if cache_dir is None:
        return _build_bank(encoder, config)
    digest = hashlib.sha256((encoder.fingerprint + config.fingerprint()).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"prompts-{digest}.npz"
    try:
        with np.load(path) as data:
            return PromptBank(list(data["set_names"]), list(data["pathologies"]), data["positive"],
                              data["negative"], encoder.logit_scale)
    except (OSError, KeyError, ValueError):
        pass
    bank = _build_bank(encoder, config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
        np.savez(tmp, set_names=np.array(bank.set_names), pathologies=np.array(bank.pathologies),
                 positive=bank.positive, negative=bank.negative)
        os.replace(tmp, path)
    except OSError:  # a read-only data dir only costs the cache
        pass
    return bank


def _build_bank(encoder, config: LabelConfig) -> PromptBank:
    set_names, pathologies = list(config.prompt_sets), list(config.pathologies)
    texts, spans = config.all_prompts()
    emb = encoder.encode_texts(texts)
    dim = emb.shape[1]
    positive = np.zeros((len(set_names), len(pathologies), dim), dtype=np.float32)
    negative = np.zeros_like(positive)
    for i, (start, npos, nneg) in enumerate(spans):
        s, p = divmod(i, len(pathologies))
        positive[s, p] = _mean_direction(emb[start : start + npos])
        negative[s, p] = _mean_direction(emb[start + npos : start + npos + nneg])
    return PromptBank(set_names, pathologies, positive, negative, encoder.logit_scale)


def member_probabilities(image_vectors: np.ndarray, bank: PromptBank) -> np.ndarray:
    """(images, dim) -> (images, sets, pathologies) probabilities, one per prompt-set member."""
    pos = np.einsum("nd,spd->nsp", image_vectors, bank.positive)
    neg = np.einsum("nd,spd->nsp", image_vectors, bank.negative)
    return 1.0 / (1.0 + np.exp(-bank.logit_scale * (pos - neg)))


def combine(member_probs: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and spread over the member axis (axis 0): (probability, uncertainty)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mean = np.tensordot(w, member_probs, axes=1)
    var = np.tensordot(w, (member_probs - mean) ** 2, axes=1)
    return np.clip(mean, 0.0, 1.0), np.clip(2.0 * np.sqrt(var), 0.0, 1.0)


def score_vectors(image_vectors: np.ndarray, bank: PromptBank, config: LabelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Prompt-ensemble scores for already-embedded images: (N, P) probability and uncertainty.

    Used at index time, where one embedding per image is kept; `label_image` adds the
    preprocessing ensemble on top.
    """
    members = member_probabilities(image_vectors, bank).transpose(1, 0, 2)  # (sets, N, P)
    weights = np.array([config.prompt_sets[s].weight for s in bank.set_names])
    return combine(members, weights)


def image_variants(image: Image.Image, names) -> dict[str, Image.Image]:
    """The preprocessing variants of one ``L``/``RGB`` image named in `names`."""
    out = {}
    gray = image if image.mode == "L" else image.convert("L")
    for name in names:
        if name == "original":
            out[name] = image
        elif name == "equalized":
            out[name] = ImageOps.equalize(gray)
        elif name == "clahe":
            import cv2

            clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
            out[name] = Image.fromarray(clahe.apply(np.asarray(gray)))
        elif name == "contrast":
            out[name] = ImageOps.autocontrast(gray, cutoff=2)
        else:
            raise ValueError(f"unknown preprocessing variant {name!r}")
    return out


def label_image(encoder, image: Image.Image, config: LabelConfig) -> list[LabelScore]:
    """Raw scores of one image, with the preprocessing ensemble as their uncertainty.

    The value is the prompt ensemble of the image as the model sees it -- exactly what the index stores
    for an indexed image (`score_vectors` of its one embedding), so grid, page, JSON, filters and
    reports show one number. The preprocessing variants (equalised, CLAHE, contrast) only give the
    uncertainty: the weighted spread of the same prompt-ensemble value over the variants. The variants are
    made from the image at the model's input size, so a 9000 x 9000 upload costs four small images.
    """
    bank = prompt_bank(encoder, config)
    model_view = encoder.preprocess.resize(image)
    wanted = ["original"] + [v for v, w in config.variants.items() if w > 0 and v != "original"]
    variants = image_variants(model_view, wanted)
    vectors = encoder.encode_images(list(variants.values()))
    probs = member_probabilities(vectors, bank)  # (variants, sets, P)
    set_weights = np.array([config.prompt_sets[s].weight for s in bank.set_names])
    by_variant = np.stack([combine(probs[i], set_weights)[0] for i in range(len(variants))])  # (variants, P)
    weights = {v: max(config.variants.get(v, 0.0), 1e-9 if v == "original" else 0.0) for v in variants}
    names = [f"{v}/{s}" for v in variants for s in bank.set_names]
    flat = probs.reshape(len(names), len(bank.pathologies))
    return [read_through(LabelScore(p, float(by_variant[0, j]), 0.0, float(config.thresholds.get(p, 0.5)),
                                    {n: float(flat[i, j]) for i, n in enumerate(names)}, raw=float(by_variant[0, j]),
                                    variants={v: float(by_variant[i, j]) for i, v in enumerate(variants)},
                                    variant_weights=dict(weights)))
            for j, p in enumerate(bank.pathologies)]
