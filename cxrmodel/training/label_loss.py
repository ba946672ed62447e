"""Prompt-supervised label loss: train the zero-shot computation itself on labelled pairs.

RadLens scores a pathology as `sigmoid(logit_scale * (cos(image, positive prompts) - cos(image, negative
prompts)))`, averaged over the prompt sets of `LabelConfig` (`cxrmodel.labels.zeroshot`). With
`--label-loss W`, each training step also encodes those very prompts (with gradients through the text
tower's LoRA) and adds `W` x the binary cross-entropy of that score against the pairs' labels: the
image tower and the prompts are pushed towards the separation the index and the pages will measure.
Pairs without labels are masked out; `No Finding` is a labelled row with all 14 negative. Each
pathology's positives are weighted by its negatives/positives ratio in the training pairs (capped), so
rare findings are not drowned by the common "absent".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cxrmodel.labels.prompts import LabelConfig

NO_FINDING = "no finding"
MAX_POSITIVE_WEIGHT = 10.0


def label_vector(labels: tuple[str, ...], pathologies: list[str]) -> tuple[list[float], bool]:
    """(0/1 per pathology, whether the pair is labelled at all) from a pair's label names."""
    names = {name.strip().lower() for name in labels if name.strip()}
    if not names:
        return [0.0] * len(pathologies), False
    return [1.0 if p.lower() in names else 0.0 for p in pathologies], True


def positive_weights(targets: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Per pathology: negatives / positives over the labelled training pairs, capped (1 without positives)."""
    rows = targets[labelled]
    positives = rows.sum(dim=0)
    negatives = len(rows) - positives
    ratio = torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives))
    return ratio.clamp(1.0, MAX_POSITIVE_WEIGHT)


@dataclass
class PromptTokens:
    """The zero-shot prompts of a `LabelConfig`, tokenised once: where each (set, pathology) member's
    positive and negative prompts sit in the token batch."""

    texts: list[str]
    tokens: dict[str, torch.Tensor]
    spans: list[tuple[int, int, int]]  # (start, positives, negatives), in set-major, pathology-minor order
    set_weights: torch.Tensor  # the prompt sets' ensemble weights, summing to 1
    pathologies: int

    @classmethod
    def build(cls, config: LabelConfig, tokenize) -> PromptTokens:
        texts, spans = config.all_prompts()
        weights = torch.tensor([config.prompt_sets[s].weight for s in config.prompt_sets], dtype=torch.float32)
        return cls(texts, tokenize(texts), spans, weights / weights.sum(), len(config.pathologies))


def _mean_directions(embeddings: torch.Tensor, spans, positive: bool) -> torch.Tensor:
    rows = []
    for start, npos, nneg in spans:
        part = embeddings[start:start + npos] if positive else embeddings[start + npos:start + npos + nneg]
        rows.append(F.normalize(part.mean(dim=0), dim=-1))
    return torch.stack(rows)


def zero_shot_probabilities(image_vecs: torch.Tensor, text_vecs: torch.Tensor, prompts: PromptTokens,
                            logit_scale: torch.Tensor) -> torch.Tensor:
    """(images, pathologies) weighted mean over prompt sets of the zero-shot probability, as `score_vectors`
    computes it, differentiable. `text_vecs` are the prompt embeddings in `prompts.texts` order;
    `logit_scale` is the model's parameter (its log)."""
    text_vecs = F.normalize(text_vecs.float(), dim=-1)
    image_vecs = F.normalize(image_vecs.float(), dim=-1)
    sets = len(prompts.set_weights)
    pos = _mean_directions(text_vecs, prompts.spans, True).view(sets, prompts.pathologies, -1)
    neg = _mean_directions(text_vecs, prompts.spans, False).view(sets, prompts.pathologies, -1)
    logits = logit_scale.float().exp() * torch.einsum("nd,spd->nsp", image_vecs, pos - neg)
    return torch.einsum("nsp,s->np", torch.sigmoid(logits), prompts.set_weights.to(logits.device))


def label_loss(probabilities: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """Weighted binary cross-entropy averaged over the labelled rows and the pathologies (0 when the batch
    has none)."""
    if not bool(labelled.any()):
        return probabilities.sum() * 0.0
    p = probabilities[labelled].clamp(1e-6, 1 - 1e-6)
    y = targets[labelled]
    per = -(weights * y * torch.log(p) + (1 - y) * torch.log(1 - p))
    return per.mean()
