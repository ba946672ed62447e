"""open_clip checkpoints (hub layout), converted on load to transformers modules.

A directory with ``open_clip_config.json`` and ``open_clip_model.safetensors`` (or
``open_clip_pytorch_model.bin``) is read without the open-clip-torch package (it needs torchvision,
which does not import next to the CPU torch build RadLens installs):

- **CLIP** (open_clip's own ViT image tower + text transformer, e.g. ViT-B-32, PubMedCLIP-style
  fine-tunes) becomes a `CLIPModel`.
- **timm ViT + Hugging Face text tower** (BiomedCLIP's layout: ``timm_model_name`` vit_*,
  ``hf_model_name`` a BERT) becomes an `OpenClipDualEncoder`: a `VisionTextDualEncoderModel` with a
  `ViTModel` image tower pooled at the class token and open_clip's text projection (linear or MLP) --
  the text model's config and tokenizer must be local (in the directory, or the hub cache).

Every state-dict key is mapped and checked: a key left over or a parameter not filled is an error, never
a silently random weight. Anything in the config the conversion does not reproduce exactly (layer scale,
attentional pooling, other poolers) is refused with its name. `bench/openclip_parity.py` compares the
converted models with open_clip's own forward.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cxrmodel.errors import ModelLoadError
from cxrmodel.imaging.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
FORMAT_CLIP = "open_clip (CLIP)"
FORMAT_TIMM_HF = "open_clip (timm ViT + Hugging Face text)"


def is_open_clip_dir(path: str | Path) -> bool:
    """True for a directory in open_clip's hub layout."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and any((path / name).is_file() for name in WEIGHT_FILES)


def read_config(directory: Path) -> dict:
    try:
        data = json.loads((directory / CONFIG_FILE).read_text())
        return data.get("model_cfg", data)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read {directory / CONFIG_FILE}: {exc}") from None


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (safetensors preferred; a .bin is read with weights_only)."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 -- damaged weights of any kind: one clear message
            raise ModelLoadError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        state = state.get("state_dict", state)
        return {k.removeprefix("module."): v for k, v in state.items()}
    raise ModelLoadError(f"{directory} has no {' or '.join(WEIGHT_FILES)}")


def checkpoint_format(config: dict) -> str:
    """Which conversion a config needs; ModelLoadError for layouts RadLens does not convert."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        if not str(vision.get("timm_model_name", "")).startswith("vit_") or not text.get("hf_model_name"):
            raise ModelLoadError("this open_clip checkpoint combines towers RadLens cannot convert (supported: "
                                 "open_clip's own ViT + text transformer, or a timm ViT + a Hugging Face BERT-style "
                                 f"text model); got vision {vision.get('timm_model_name') or 'open_clip ViT'}, "
                                 f"text {text.get('hf_model_name') or 'open_clip transformer'}")
        return FORMAT_TIMM_HF
    return FORMAT_CLIP


def _refuse(section: str, cfg: dict, allowed: dict) -> None:
    """ModelLoadError naming every config field whose value the conversion would not reproduce."""
    for key, value in cfg.items():
        if key in allowed and allowed[key] is not None and value not in allowed[key]:
            raise ModelLoadError(f"open_clip {section}.{key}={value!r} is not supported by the conversion "
                                 f"(supported: {allowed[key]})")
        if key not in allowed:
            raise ModelLoadError(f"open_clip {section}.{key} is not supported by the conversion")


def preprocess_from(config: dict, directory: Path) -> ImagePreprocess:
    """open_clip's eval transform: resize the shortest side (bicubic), centre crop, normalise."""
    data = json.loads((directory / CONFIG_FILE).read_text())
    pre = data.get("preprocess_cfg", {})
    size = config.get("vision_cfg", {}).get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    if pre.get("resize_mode", "shortest") != "shortest":
        raise ModelLoadError(f"open_clip preprocess resize_mode {pre['resize_mode']!r} is not supported")
    return ImagePreprocess(shortest_edge=size, crop=(size, size), mean=tuple(pre.get("mean", OPENAI_CLIP_MEAN)),
                           std=tuple(pre.get("std", OPENAI_CLIP_STD)), crop_rounding="round")


# -- open_clip CLIP <-> transformers CLIPModel -------------------------------------------------------

_VISION_ALLOWED = {"layers": None, "width": None, "patch_size": None, "image_size": None, "head_width": None,
                   "mlp_ratio": None, "ls_init_value": (None,), "patch_dropout": None, "no_ln_pre": (False,),
                   "pool_type": ("tok",), "final_ln_after_pool": (False,), "attentional_pool": (False,),
                   "output_tokens": (False,), "act_kwargs": ({},), "norm_kwargs": ({},)}
_TEXT_ALLOWED = {"context_length": None, "vocab_size": None, "width": None, "heads": None, "layers": None,
                 "mlp_ratio": None, "ls_init_value": (None,), "pool_type": ("argmax",), "proj_bias": (False,),
                 "proj_type": ("linear",), "embed_cls": (False,), "pad_id": (0,), "no_causal_mask": (False,),
                 "final_ln_after_pool": (False,), "output_tokens": (False,), "act_kwargs": ({},),
                 "norm_kwargs": ({},), "hf_tokenizer_name": None, "tokenizer_kwargs": None}


def _clip_config(config: dict, tokenizer):
    from transformers import CLIPConfig

    vision, text = config["vision_cfg"], config["text_cfg"]
    _refuse("vision_cfg", vision, _VISION_ALLOWED)
    _refuse("text_cfg", text, _TEXT_ALLOWED)
    for key in config:
        if key not in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "init_logit_scale",
                       "init_logit_bias", "cast_dtype"):
            raise ModelLoadError(f"open_clip model_cfg.{key} is not supported by the conversion")
    if config.get("init_logit_bias") is not None:
        raise ModelLoadError("open_clip SigLIP-style models (init_logit_bias) are not supported")
    act = "quick_gelu" if config.get("quick_gelu") else "gelu"
    v_width, t_width = int(vision["width"]), int(text.get("width", 512))
    image_size = vision.get("image_size", 224)
    return CLIPConfig(
        projection_dim=int(config["embed_dim"]),
        text_config=dict(vocab_size=int(text.get("vocab_size", 49408)), hidden_size=t_width,
                         intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)),
                         num_hidden_layers=int(text.get("layers", 12)), num_attention_heads=int(text.get("heads", 8)),
                         max_position_embeddings=int(text.get("context_length", 77)), hidden_act=act,
                         layer_norm_eps=1e-5, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=v_width, intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)),
                           num_hidden_layers=int(vision["layers"]),
                           num_attention_heads=v_width // int(vision.get("head_width", 64)),
                           image_size=int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size),
                           patch_size=int(vision["patch_size"]), hidden_act=act, layer_norm_eps=1e-5))


@dataclass(frozen=True)
class KeyMap:
    """How one open_clip layout's state-dict keys become the converted model's, and back."""

    single: dict[str, str]  # whole keys renamed
    transposed: dict[str, str]  # whole keys renamed and transposed (open_clip multiplies x @ W)
    prefixes: dict[str, str]  # key prefixes renamed, the rest kept (a Hugging Face tower inside open_clip)
    layers: dict[str, str]  # layer prefix (followed by the layer number) in open_clip -> in the converted model
    block: dict[str, str]  # module names inside a layer
    fused: tuple[str, str]  # open_clip's fused q/k/v (+ "weight"/"bias") -> the attention module holding q/k/v_proj
    ignored: tuple[str, ...] = ()  # open_clip buffers the converted model rebuilds


CLIP_KEYS = KeyMap(
    single={
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias"},
    transposed={"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"},
    prefixes={},
    layers={"visual.transformer.resblocks.": "vision_model.encoder.layers.",
            "transformer.resblocks.": "text_model.encoder.layers."},
    block={"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
           "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"},
    fused=("attn.in_proj_", "self_attn."),
    ignored=("attn_mask",))  # a causal-mask buffer some versions saved; CLIPModel builds its own

TIMM_HF_KEYS = KeyMap(
    single={
        "visual.trunk.cls_token": "vision_model.embeddings.cls_token",
        "visual.trunk.pos_embed": "vision_model.embeddings.position_embeddings",
        "visual.trunk.patch_embed.proj.weight": "vision_model.embeddings.patch_embeddings.projection.weight",
        "visual.trunk.patch_embed.proj.bias": "vision_model.embeddings.patch_embeddings.projection.bias",
        "visual.trunk.norm.weight": "vision_model.layernorm.weight",
        "visual.trunk.norm.bias": "vision_model.layernorm.bias",
        "visual.head.proj.weight": "visual_projection.weight",
        "logit_scale": "logit_scale"},
    transposed={},
    prefixes={"text.transformer.": "text_model.", "text.proj.": "text_projection."},
    layers={"visual.trunk.blocks.": "vision_model.layers."},
    block={"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
           "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},  # transformers 5's ViTModel names
    fused=("attn.qkv.", "attention."))
QKV = ("q_proj", "k_proj", "v_proj")


def _layer_patterns(layers: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(rf"^{re.escape(src)}(\d+)\.(.+)$"), dst) for src, dst in layers.items()]


def convert_keys(state: dict[str, torch.Tensor], keys: KeyMap) -> dict[str, torch.Tensor]:
    """open_clip keys -> the converted model's (q/k/v split from the fused projection, open_clip's x @ W
    projections transposed); ModelLoadError for a key the map does not know."""
    out: dict[str, torch.Tensor] = {}
    layers = _layer_patterns(keys.layers)
    for key, value in state.items():
        if key in keys.single:
            out[keys.single[key]] = value
        elif key in keys.transposed:
            out[keys.transposed[key]] = value.t().contiguous()
        elif key in keys.ignored:
            continue
        elif prefix := next((p for p in keys.prefixes if key.startswith(p)), None):
            out[keys.prefixes[prefix] + key.removeprefix(prefix)] = value
        elif found := next(((m, dst) for pattern, dst in layers if (m := pattern.match(key))), None):
            match, dst = found
            layer, rest = f"{dst}{match.group(1)}.", match.group(2)
            if rest.startswith(keys.fused[0]):
                param = rest.removeprefix(keys.fused[0])
                for name, part in zip(QKV, value.chunk(3, dim=0), strict=True):
                    out[f"{layer}{keys.fused[1]}{name}.{param}"] = part.contiguous()
                continue
            module, _, param = rest.rpartition(".")
            if module not in keys.block:
                raise ModelLoadError(f"open_clip key {key!r} has no counterpart in the converted model")
            out[f"{layer}{keys.block[module]}.{param}"] = value
        else:
            raise ModelLoadError(f"open_clip key {key!r} has no counterpart in the converted model")
    return out


def invert_keys(state: dict[str, torch.Tensor], keys: KeyMap) -> dict[str, torch.Tensor]:
    """The inverse of `convert_keys`: a converted model's state with open_clip's key names (tests and
    benchmarks write open_clip checkpoints with it)."""
    single = {v: k for k, v in keys.single.items()}
    transposed = {v: k for k, v in keys.transposed.items()}
    prefixes = {v: k for k, v in keys.prefixes.items()}
    block = {v: k for k, v in keys.block.items()}
    layers = _layer_patterns({v: k for k, v in keys.layers.items()})
    fused = {keys.fused[1] + name for name in QKV}
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in single:
            out[single[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.t().contiguous()
        elif key.endswith("position_ids"):
            continue
        elif prefix := next((p for p in prefixes if key.startswith(p)), None):
            out[prefixes[prefix] + key.removeprefix(prefix)] = value
        elif found := next(((m, src) for pattern, src in layers if (m := pattern.match(key))), None):
            match, src = found
            layer = f"{src}{match.group(1)}."
            module, _, param = match.group(2).rpartition(".")
            if module in fused:
                pending.setdefault((layer, param), {})[module.rsplit(".", 1)[-1]] = value
            else:
                out[f"{layer}{block[module]}.{param}"] = value
        else:
            raise KeyError(key)
    for (layer, param), parts in pending.items():
        out[f"{layer}{keys.fused[0]}{param}"] = torch.cat([parts[name] for name in QKV])
    return out


_TIMM_VISION_ALLOWED = {"timm_model_name": None, "timm_model_pretrained": None, "timm_pool": ("", "token"),
                        "timm_proj": ("linear",), "timm_proj_bias": (False,), "timm_drop": None,
                        "timm_drop_path": None, "image_size": None, "patch_dropout": None}
_HF_TEXT_ALLOWED = {"hf_model_name": None, "hf_tokenizer_name": None, "hf_proj_type": ("linear", "mlp"),
                    "hf_pooler_type": ("cls_last_hidden_state_pooler",), "context_length": None, "proj_bias": (False,),
                    "hf_model_pretrained": None, "tokenizer_kwargs": None}
_TIMM_VIT = re.compile(r"^vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)")
_VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
              "huge": (1280, 32, 16)}


def _text_source(name: str, directory: Path) -> str:
    """Where the text model's config and tokenizer are: a folder in the checkpoint, a local path, or the hub
    cache (never downloaded here)."""
    for candidate in (directory / "text_model", directory / Path(name).name, Path(name).expanduser()):
        if (candidate / "config.json").is_file():
            return str(candidate)
    return name


def build_dual_encoder(config: dict, directory: Path, state: dict[str, torch.Tensor]):
    """(OpenClipDualEncoder, tokenizer) for a timm-ViT + HF-text checkpoint."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, ViTConfig, ViTModel

    from cxrmodel.model.openclip_dual import OpenClipDualEncoder

    vision, text = config["vision_cfg"], config["text_cfg"]
    _refuse("vision_cfg", vision, _TIMM_VISION_ALLOWED)
    _refuse("text_cfg", text, _HF_TEXT_ALLOWED)
    match = _TIMM_VIT.match(vision["timm_model_name"])
    if not match:
        raise ModelLoadError(f"timm model {vision['timm_model_name']!r} is not a plain ViT RadLens can convert")
    width, _, heads = _VIT_SIZES[match.group(1)]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"^visual\.trunk\.blocks\.(\d+)\.", k)))
    width = int(state["visual.trunk.cls_token"].shape[-1])  # tiny test models override the named size
    heads = heads if width == _VIT_SIZES[match.group(1)][0] else max(1, width // 64)
    image_size = vision.get("image_size", int(match.group(3)))
    vit = ViTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                    intermediate_size=int(state["visual.trunk.blocks.0.mlp.fc1.weight"].shape[0]),
                    image_size=int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size),
                    patch_size=int(match.group(2)), layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)
    source = _text_source(text["hf_model_name"], directory)
    tokenizer_source = str(directory) if any((directory / f).is_file() for f in TOKENIZER_FILES) else \
        _text_source(text.get("hf_tokenizer_name") or text["hf_model_name"], directory)
    try:
        text_config = AutoConfig.from_pretrained(source, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"the text tower of this open_clip checkpoint is {text['hf_model_name']!r}, whose config and tokenizer "
            f"are not on this machine ({str(exc).splitlines()[0]}). Copy that model's config.json and tokenizer "
            f"files into {directory / 'text_model'} (or its hub cache) and load again.") from None
    tokenizer.model_max_length = int(text.get("context_length", tokenizer.model_max_length))
    pooler = any(k.startswith("text.transformer.pooler.") for k in state)  # open_clip's cls pooler needs none
    model = OpenClipDualEncoder.build(ViTModel(vit, add_pooling_layer=False),
                                      AutoModel.from_config(text_config, add_pooling_layer=pooler),
                                      projection_dim=int(config["embed_dim"]),
                                      text_proj=text.get("hf_proj_type", "linear"),
                                      text_proj_hidden=_mlp_hidden(state))
    return model, tokenizer


def _mlp_hidden(state: dict[str, torch.Tensor]) -> int | None:
    first = state.get("text.proj.0.weight")
    return int(first.shape[0]) if first is not None else None


def _tokenizer_for_clip(directory: Path, config: dict):
    from transformers import AutoTokenizer

    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{directory} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): "
                             "open_clip keeps its CLIP tokenizer inside the package; save one beside the weights, e.g. "
                             "`CLIPTokenizer.from_pretrained('openai/clip-vit-base-patch32').save_pretrained(DIR)`")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.model_max_length = int(config["text_cfg"].get("context_length", 77))
    return tokenizer


def load_open_clip_dir(directory: str | Path):
    """(model, tokenizer, preprocess, format) of an open_clip hub-layout directory, converted."""
    directory = Path(directory)
    config = read_config(directory)
    fmt = checkpoint_format(config)
    state = read_state_dict(directory)
    if fmt == FORMAT_CLIP:
        from transformers import CLIPModel

        tokenizer = _tokenizer_for_clip(directory, config)
        model = CLIPModel(_clip_config(config, tokenizer))
        converted = convert_keys(state, CLIP_KEYS)
    else:
        model, tokenizer = build_dual_encoder(config, directory, state)
        converted = convert_keys(state, TIMM_HF_KEYS)
    _load_exactly(model, converted, directory)
    return model.eval(), tokenizer, preprocess_from(config, directory), fmt


def _load_exactly(model, converted: dict[str, torch.Tensor], directory: Path) -> None:
    """Fill every parameter from `converted` (shapes checked); ModelLoadError naming what is missing or extra."""
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    buffers = ("position_ids", "embeddings.token_type_ids")  # saved by some transformers versions, rebuilt here
    converted = {k: v for k, v in converted.items() if k in expected or not k.endswith(buffers)}
    missing, extra = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or extra:
        raise ModelLoadError(f"the open_clip checkpoint in {directory} does not match its config: "
                             f"{len(missing)} parameters missing ({', '.join(missing[:4])}), "
                             f"{len(extra)} left over ({', '.join(extra[:4])})")
    try:
        model.load_state_dict(converted, strict=False)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise ModelLoadError(f"the open_clip checkpoint in {directory} does not match its config: {detail}") from None
