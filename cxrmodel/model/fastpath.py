"""Exact shortcuts through CLIP's forward and backward passes on the hardware at hand.

1. Skip the work whose result a CLIP image embedding never reads. The embedding is the class token
   after the last layer, so in that layer only the class token needs a query, an attention output,
   an MLP and a residual sum; the keys and values still come from every token. On ViT-B/32
   (50 tokens) that is about 7% of an image's FLOPs, in inference and in training alike, and the
   embedding (and every gradient that reaches it) equals the full forward's. The last layer's output
   then holds the class token only, which is all `pooler_output` reads.
2. Pick the attention kernel that is fastest for CLIP's short sequences on the device.
3. Fold the frozen MLPs' quick-GELU scale into their weights so that it runs as one fused SiLU.
"""

from __future__ import annotations

import logging
import types

import torch
from torch.nn import functional as F

log = logging.getLogger(__name__)

CLIP_VISION_CLASSES = ("CLIPVisionModel", "CLIPVisionTransformer")
# `_class_token_layer` re-implements CLIPEncoderLayer.forward: it is applied only to the transformers
# releases it was checked against (tests/test_fastpath.py pins its equality on the installed one)
CHECKED_TRANSFORMERS = ((5, 0), (6, 0))  # [from, to)


def transformers_checked(version: str | None = None) -> bool:
    """True when the installed (or given) transformers version is one the class-token patch was checked on."""
    import re

    import transformers

    version = version or transformers.__version__
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        return False
    release = (int(match.group(1)), int(match.group(2)))
    return CHECKED_TRANSFORMERS[0] <= release < CHECKED_TRANSFORMERS[1]


def _class_token_layer(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       **kwargs) -> torch.Tensor:
    """`CLIPEncoderLayer.forward` for the class token only: (B, N, D) -> (B, 1, D)."""
    attn = self.self_attn
    normed = self.layer_norm1(hidden_states)
    batch, tokens, dim = normed.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, x.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)

    query = heads(attn.q_proj(normed[:, :1]))
    key, value = heads(attn.k_proj(normed)), heads(attn.v_proj(normed))
    scores = torch.matmul(query, key.transpose(2, 3)) * attn.scale  # (B, heads, 1, N), as eager attention does
    if attention_mask is not None:
        scores = scores + attention_mask[..., :1, :]
    weights = F.dropout(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), p=attn.dropout,
                        training=attn.training)
    out = attn.out_proj(torch.matmul(weights, value).transpose(1, 2).reshape(batch, 1, dim))
    hidden = hidden_states[:, :1] + out
    return hidden + self.mlp(self.layer_norm2(hidden))


def pool_only_last_layer(model) -> bool:
    """Make `model`'s CLIP vision tower compute its last layer for the class token only (in place).

    Returns False (and changes nothing) when the vision tower is not CLIP's, whose pooling is known.
    """
    from cxrmodel.model.lora import unwrap

    vision = getattr(unwrap(model), "vision_model", None)
    if type(vision).__name__ not in CLIP_VISION_CLASSES:
        return False
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    if not layers or type(layers[-1]).__name__ != "CLIPEncoderLayer":
        return False
    if not transformers_checked():
        import transformers

        log.warning("transformers %s is outside the releases the class-token shortcut was checked on (%d.%d to "
                    "before %d.%d): running CLIP's own last layer (exact, ~7%% slower)", transformers.__version__,
                    *CHECKED_TRANSFORMERS[0], *CHECKED_TRANSFORMERS[1])
        return False
    layers[-1].forward = types.MethodType(_class_token_layer, layers[-1])
    return True


def choose_attention(model, device) -> str:
    """Eager attention on CPU, PyTorch's SDPA elsewhere; returns the choice.

    At CLIP's sequence lengths (50 image tokens, at most 77 text tokens) eager attention's small
    matmuls beat the CPU flash kernel, whose backward alone took 18% of a ViT-B/32 LoRA training
    step here (bench/train_step.py); in inference the two are level. Both compute the same attention.
    """
    from cxrmodel.model.lora import unwrap

    impl = "eager" if torch.device(device).type == "cpu" else "sdpa"
    try:
        unwrap(model).set_attn_implementation(impl)
    except (AttributeError, ValueError):  # a model that supports only one implementation keeps it
        return getattr(unwrap(model).config, "_attn_implementation", "unknown")
    return impl


def apply_fastpaths(model, device) -> None:
    """Apply every shortcut to `model` in place; `load_encoder` and `train` both call this."""
    pool_only_last_layer(model)
    choose_attention(model, device)
    fold_quick_gelu(model)


QUICK_GELU_SCALE = 1.702


def fold_quick_gelu(model) -> int:
    """Run each MLP's quick GELU as one fused SiLU, by rescaling frozen weights in place.

    quick_gelu(y) = y·σ(1.702·y) = silu(1.702·y) / 1.702, so scaling fc1 by 1.702 and fc2 by 1/1.702
    gives the same MLP with one elementwise pass instead of three (+8% on a ViT-B/32 forward on CPU,
    +5% on a LoRA training step). Only frozen, plain fc1/fc2 are folded: trainable ones (a model
    trained from scratch) and wrapped ones (a LoRA adapter on fc1/fc2) are left as they are. Frozen
    weights are never saved (`radlens train` saves adapters), so no folded weight reaches a file.
    Returns how many MLPs were folded.
    """
    from transformers.activations import QuickGELUActivation

    folded = 0
    for module in model.modules():
        act, fc1, fc2 = (getattr(module, name, None) for name in ("activation_fn", "fc1", "fc2"))
        if not (isinstance(act, QuickGELUActivation) and type(fc1) is torch.nn.Linear
                and type(fc2) is torch.nn.Linear):
            continue
        if any(p.requires_grad for p in (*fc1.parameters(), *fc2.parameters())):
            continue
        with torch.no_grad():
            fc1.weight.mul_(QUICK_GELU_SCALE)
            if fc1.bias is not None:
                fc1.bias.mul_(QUICK_GELU_SCALE)
            fc2.weight.div_(QUICK_GELU_SCALE)
        module.activation_fn = torch.nn.SiLU()
        folded += 1
    return folded
