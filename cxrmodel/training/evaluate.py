"""Retrieval and zero-shot evaluation: Recall@K both ways, per-pathology AUROC.

Recall@K counts a retrieval as correct when the retrieved item carries the query's own caption
(pairs with identical captions are indistinguishable, so any of them is a correct answer).
"""

from __future__ import annotations

import numpy as np

from cxrmodel.errors import ImageDecodeError
from cxrmodel.imaging.decode import load_image
from cxrmodel.labels.prompts import LabelConfig
from cxrmodel.labels.zeroshot import prompt_bank, score_vectors
from cxrmodel.training.pairs import Pair

KS = (1, 5, 10)


def recall_at_k(similarity: np.ndarray, correct: np.ndarray, ks=KS) -> dict[str, float]:
    """similarity (Q, N) and boolean correct (Q, N) -> {"R@k": fraction of queries with a hit in top k}."""
    if similarity.shape[0] == 0:
        return {f"R@{k}": 0.0 for k in ks}
    order = np.argsort(-similarity, axis=1, kind="stable")
    hit_rank = np.argmax(np.take_along_axis(correct, order, axis=1), axis=1)
    return {f"R@{k}": float(np.mean(hit_rank < k)) for k in ks}


def retrieval_metrics(image_vecs: np.ndarray, text_vecs: np.ndarray, captions: list[str]) -> dict:
    """Recall@1/5/10 image->text and text->image for aligned (image, caption) rows."""
    codes = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = np.array([codes[c] for c in captions])
    correct = ids[:, None] == ids[None, :]
    sim = image_vecs @ text_vecs.T
    return {"image_to_text": recall_at_k(sim, correct), "text_to_image": recall_at_k(sim.T, correct.T)}


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, scores))


def embed_pairs(encoder, pairs: list[Pair], batch: int = 64) -> tuple[np.ndarray, np.ndarray, list[Pair], int]:
    """Encode images and captions; returns (image vecs, text vecs, pairs kept, unreadable count)."""
    kept, vecs, unreadable = [], [], 0
    for start in range(0, len(pairs), batch):
        images = []
        for pair in pairs[start : start + batch]:
            try:
                images.append(load_image(pair.image, model_side=encoder.preprocess.decode_side)
                              .model_input(encoder.preprocess))
                kept.append(pair)
            except ImageDecodeError:
                unreadable += 1
        if images:
            vecs.append(encoder.encode_images(images))
    image_vecs = np.concatenate(vecs) if vecs else np.zeros((0, encoder.dim), np.float32)
    text_vecs = encoder.encode_texts([p.caption for p in kept])
    return image_vecs, text_vecs, kept, unreadable


def zero_shot_auroc(encoder, image_vecs: np.ndarray, pairs: list[Pair], config: LabelConfig) -> dict:
    """Per-pathology AUROC of the prompt-ensemble scores against the pairs' labels."""
    probs, _ = score_vectors(image_vecs, prompt_bank(encoder, config), config)
    table = {}
    for j, pathology in enumerate(config.pathologies):
        truth = np.array([pathology.lower() in {lab.lower() for lab in p.labels} for p in pairs])
        table[pathology] = {"auroc": auroc(probs[:, j], truth), "positives": int(truth.sum()), "n": len(pairs)}
    values = [v["auroc"] for v in table.values() if v["auroc"] is not None]
    return {"per_pathology": table, "mean": float(np.mean(values)) if values else None}


def evaluate_pairs(encoder, pairs: list[Pair], config: LabelConfig | None = None) -> dict:
    """Everything `radlens eval` reports, as a JSON-ready dict."""
    image_vecs, text_vecs, kept, unreadable = embed_pairs(encoder, pairs)
    result = {"pairs": len(kept), "unreadable_images": unreadable,
              **retrieval_metrics(image_vecs, text_vecs, [p.caption for p in kept])}
    if config is not None and any(p.labels for p in kept):
        result["zero_shot_auroc"] = zero_shot_auroc(encoder, image_vecs, kept, config)
    return result


def format_eval(result: dict) -> str:
    """Human-readable table of an `evaluate_pairs` result."""
    lines = [f"pairs evaluated: {result['pairs']} (unreadable images: {result['unreadable_images']})",
             f"{'direction':<16}" + "".join(f"{k:>8}" for k in result["image_to_text"])]
    for direction in ("image_to_text", "text_to_image"):
        lines.append(f"{direction.replace('_', ' '):<16}" + "".join(f"{v:>8.3f}" for v in result[direction].values()))
    zs = result.get("zero_shot_auroc")
    if zs:
        lines.append("")
        lines.append(f"{'pathology':<20}{'AUROC':>8}{'positives':>11}")
        for name, row in zs["per_pathology"].items():
            value = f"{row['auroc']:.3f}" if row["auroc"] is not None else "n/a"
            lines.append(f"{name:<20}{value:>8}{row['positives']:>11}")
        lines.append(f"{'mean':<20}{zs['mean']:>8.3f}" if zs["mean"] is not None else "mean: n/a")
    return "\n".join(lines)


def query_retrieval(text_vecs: np.ndarray, image_vecs: np.ndarray, relevant: np.ndarray, ks=KS) -> dict:
    """Text queries (Q, d) against images (N, d) with a boolean relevance matrix (Q, N).

    Per query: R@k (a relevant image within the top k), P@10, and chance P@10 (relevant share); and the
    average precision over the whole ranking (AP), which rests on every relevant image instead of ten and
    so moves less between runs, with its chance level (about the relevant share).
    """
    sim = text_vecs @ image_vecs.T
    order = np.argsort(-sim, axis=1, kind="stable")
    ranked = np.take_along_axis(relevant, order, axis=1)
    out = []
    for q in range(len(text_vecs)):
        first = int(np.argmax(ranked[q])) if ranked[q].any() else len(ranked[q])
        out.append({**{f"R@{k}": float(first < k) for k in ks}, "P@10": float(ranked[q, :10].mean()),
                    "chance_P@10": float(relevant[q].mean()), "relevant": int(relevant[q].sum()),
                    "AP": average_precision(ranked[q]), "chance_AP": float(relevant[q].mean())})
    return {"per_query": out}


def average_precision(ranked_relevant: np.ndarray) -> float | None:
    """Mean of the precision at the rank of each relevant item, for one ranking (None: nothing relevant)."""
    hits = np.asarray(ranked_relevant, dtype=bool)
    if not hits.any():
        return None
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].mean())


def neighbour_precision(vectors: np.ndarray, classes: list, k: int = 10) -> dict:
    """Image->image precision@k of same-class neighbours (self excluded), overall and per class,
    with the chance level of each."""
    sim = vectors @ vectors.T
    np.fill_diagonal(sim, -np.inf)
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    labels = np.array([str(c) for c in classes])
    hits = labels[top] == labels[:, None]
    n = len(labels)
    per_class = {}
    for c in sorted(set(labels)):
        idx = labels == c
        per_class[c] = {"n": int(idx.sum()), f"P@{k}": float(hits[idx].mean()),
                        "chance": float((idx.sum() - 1) / max(1, n - 1))}
    chance = float(np.mean([(np.sum(labels == c) - 1) / max(1, n - 1) for c in labels]))
    return {f"P@{k}": float(hits.mean()), "chance": chance, "per_class": per_class}
