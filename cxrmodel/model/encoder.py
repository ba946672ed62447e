"""Load a dual-encoder checkpoint (+ optional LoRA adapter) and turn images and texts into vectors.

`load_encoder(EncoderConfig(...))` is the only place RadLens loads a model. Nothing is loaded at
import time and nothing is downloaded unless a hub id is given and not found locally.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxrmodel.errors import ModelLoadError
from cxrmodel.imaging.preprocess import PREPROCESSOR_FILE, PROCESSOR_FILE, PROCESSOR_FILES, ImagePreprocess
from cxrmodel.model.config import MODEL_ENV, PRECISIONS, EncoderConfig
from cxrmodel.model.fastpath import apply_fastpaths
from cxrmodel.model.lora import unwrap

log = logging.getLogger(__name__)

NUMERICS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # of the image vectors


def cpu_supports_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (AVX-512 BF16 / AMX) through oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_device(requested: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def choose_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Resolve `auto` to bf16 where the hardware runs it fast, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def adapter_fingerprint(adapter_dir: str | Path | None, model: str | None = None) -> str | None:
    """sha256 over what was trained: an adapter directory's files and, for a RadLens model
    directory, its own weights -- so an index knows exactly which weights built it."""
    from cxrmodel.model.dualencoder import is_model_dir, read_manifest

    parts = []
    if model and Path(model).is_dir() and is_model_dir(model):
        manifest = read_manifest(model)
        parts.append(manifest["weights_sha256"].encode())
        if manifest.get("adapter"):
            parts.append(adapter_fingerprint(Path(model) / manifest["adapter"]).encode())
    if adapter_dir:
        for path in sorted(Path(adapter_dir).iterdir()):
            if path.is_file() and path.name.startswith("adapter_"):
                parts += [path.name.encode(), path.read_bytes()]
    if not parts:
        return None
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def features(output) -> torch.Tensor:
    """The projected embedding from `get_*_features`, which returns a tensor or an output object."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def _hub_hint(name: str) -> str:
    return (
        f"RadLens tried to load {name!r}. If this machine cannot reach the Hugging Face hub, copy the "
        f"checkpoint to a local directory on a connected machine "
        f"(`hf download {name} --local-dir DIR`) and pass `--model DIR` or set {MODEL_ENV}=DIR; "
        f"or use `--model radlens-mini`, the small offline model bundled with RadLens (not for clinical use)."
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint (HF_ENDPOINT, default huggingface.co:443) opens
    within `timeout`: when it does not, loading by hub id reads the local cache only, at once, instead of
    retrying for half a minute."""
    import os
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _model_class(model_type: str):
    from transformers import CLIPModel, VisionTextDualEncoderModel

    classes = {"clip": CLIPModel, "vision-text-dual-encoder": VisionTextDualEncoderModel}
    if model_type not in classes:
        raise ModelLoadError(
            f"model type {model_type!r} is not a supported dual encoder (supported: {', '.join(classes)})"
        )
    return classes[model_type]


def load_pretrained_parts(name: str, dtype: torch.dtype = torch.float32, revision: str | None = None):
    """Load (model, tokenizer, preprocess) from a hub id (at `revision`) or a local directory; raises
    ModelLoadError."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoTokenizer

    from cxrmodel.model.bundled import resolve_alias

    name = resolve_alias(name)
    local = Path(name).expanduser()
    from cxrmodel.model.dualencoder import is_model_dir, load_model_dir

    if local.is_dir() and is_model_dir(local):
        model, tokenizer, preprocess = load_model_dir(local)
        return model.to(dtype), tokenizer, preprocess
    from cxrmodel.model.openclip import is_open_clip_dir, load_open_clip_dir

    if local.is_dir() and is_open_clip_dir(local):
        model, tokenizer, preprocess, _ = load_open_clip_dir(local)
        return model.to(dtype), tokenizer, preprocess
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"--model {name!r} is a file; give the checkpoint's directory. " + _hub_hint(name))
    if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelLoadError(f"model directory {name!r} does not exist. " + _hub_hint(name))
    source = str(local) if local.is_dir() else name
    pinned = {"revision": revision} if revision and not local.is_dir() else {}
    offline = not local.is_dir() and not os.environ.get("HF_HUB_OFFLINE") and not hub_reachable()
    if offline:
        pinned["local_files_only"] = True  # the cache, if it has the checkpoint; no retries against the network
    try:
        config = AutoConfig.from_pretrained(source, **pinned)
        model = _model_class(config.model_type).from_pretrained(source, dtype=dtype, **pinned)
        tokenizer = AutoTokenizer.from_pretrained(source, **pinned)
        preprocess = _load_preprocess(source, **pinned)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # junk or mismatched weights too
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("Its files are damaged or incomplete: copy the checkpoint again." if local.is_dir()
                else ("The Hugging Face hub is not reachable from this machine and the checkpoint is not in "
                      "its local cache. " if offline else "") + _hub_hint(name))
        raise ModelLoadError(f"cannot load model {name!r}: {first_line}. {hint}") from None
    model.eval()
    return model, tokenizer, preprocess


def _load_preprocess(source: str, revision: str | None = None, local_files_only: bool = False) -> ImagePreprocess:
    """The checkpoint's image-processor settings, from either processor file layout (local or hub)."""
    if Path(source).is_dir():
        if not any((Path(source) / name).exists() for name in PROCESSOR_FILES):
            raise ModelLoadError(f"{source} has no {PREPROCESSOR_FILE} or {PROCESSOR_FILE}; save the processor "
                                 "beside the model (CLIPProcessor.save_pretrained)")
        try:
            return ImagePreprocess.from_pretrained(source)
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"cannot read the image processor of {source}: {exc}") from None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for name in PROCESSOR_FILES:
        try:
            return ImagePreprocess.from_file(hf_hub_download(source, name, revision=revision,
                                                             local_files_only=local_files_only))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
    raise ModelLoadError(f"{source} has no {PREPROCESSOR_FILE} or {PROCESSOR_FILE} on the hub")


def attach_adapter(model, adapter_dir: str | Path, merge: bool = False, trainable: bool = False):
    """Wrap `model` with a saved peft adapter; optionally merge it into the base weights."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelLoadError(f"{adapter_dir} is not a peft adapter directory (no adapter_config.json)")
    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load adapter {adapter_dir}: {exc}") from None
    return wrapped.merge_and_unload() if merge else wrapped


class Encoder:
    """Turns images and texts into L2-normalised float32 vectors in one shared space.

    Thread-safe: forward passes are serialised by a lock, so one Encoder can serve a web app.
    """

    def __init__(self, model, tokenizer, preprocess: ImagePreprocess, *, model_name: str,
                 adapter: str | None = None, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32, batch_size: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.model_name = model_name
        self.adapter = adapter
        self.adapter_hash = adapter_fingerprint(adapter, model_name)
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self.max_text_tokens = _max_text_tokens(model, tokenizer)
        self.cache_dir: Path | None = None  # where derived text embeddings (prompt banks) may be kept
        self.config: EncoderConfig | None = None  # set by load_encoder
        self.revision: str | None = None  # a hub model's resolved commit; set by load_encoder
        self.checkpoint_format: str | None = None  # e.g. "transformers CLIP", "open_clip (CLIP)"; by load_encoder
        self.image_tower = None  # an `image_onnx.OnnxImageTower` embedding images instead of torch (index runs)
        self.int8_text_cosine: float | None = None  # measured when load_encoder tried an int8 text tower

    @property
    def dim(self) -> int:
        """Length of every vector this encoder returns."""
        return int(self._base_config().projection_dim)

    @property
    def fingerprint(self) -> str:
        """Identifies everything that shapes this encoder's outputs (weights, adapter, precision)."""
        import json

        blob = json.dumps({**self.identity, "dtype": str(self.dtype), "text": self._text_impl,
                           "numerics": "fp32 residuals, folded quick-GELU"}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def query_fingerprint(self) -> str:
        """What shapes this encoder's query vectors (`search.relevance` caches by it)."""
        return self.fingerprint

    @property
    def identity(self) -> dict:
        """What an index records to know which encoder built it."""
        return {"model": self.model_name, "adapter": self.adapter, "adapter_hash": self.adapter_hash,
                "dim": self.dim, "numerics": NUMERICS.get(self.dtype, str(self.dtype)), "revision": self.revision,
                "format": self.checkpoint_format}

    @property
    def logit_scale(self) -> float:
        """The model's learned softmax temperature (CLIP: 100), capped like CLIP does."""
        scale = getattr(unwrap(self.model), "logit_scale", None)
        return float(min(scale.detach().float().exp().item(), 100.0)) if scale is not None else 100.0

    def _base_config(self):
        model = self.model
        return unwrap(model).config

    def _autocast(self, enabled: bool = True):
        """Matmuls in `dtype` on weights already stored in it; norms and residual sums in fp32."""
        return torch.autocast(self.device.type, dtype=self.dtype,
                              enabled=enabled and self.dtype != torch.float32)

    @property
    def _text_impl(self) -> str:
        """Module of the text projection's class: transformers', or torch's quantized one (int8)."""
        projection = getattr(unwrap(self.model), "text_projection", None)
        if not isinstance(projection, torch.nn.Module):
            return type(projection).__module__
        leaves = [m for m in projection.modules() if not list(m.children())]  # an MLP projection: its first layer
        return type(leaves[0] if leaves else projection).__module__

    @property
    def _text_is_quantized(self) -> bool:
        return "quantized" in self._text_impl

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Preprocessed pixel batch (B, 3, H, W) -> (B, dim) unit vectors."""
        out = []
        for start in range(0, len(pixels), self.batch_size):
            if self.image_tower is not None:  # ONNX Runtime, checked equal to the torch tower (image_onnx.py)
                out.append(self.image_tower.encode(pixels[start : start + self.batch_size].float().numpy()))
                continue
            chunk = pixels[start : start + self.batch_size].to(self.device, torch.float32)
            with self._lock, torch.inference_mode(), self._autocast():
                out.append(_normalise(features(self.model.get_image_features(pixel_values=chunk))))
        return _stack(out, self.dim)

    def encode_arrays(self, pixel_arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Resized 8-bit pixels (`preprocess.pixels`, e.g. from decode workers) -> (N, dim) unit vectors."""
        if not len(pixel_arrays):
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_pixels(self.preprocess.batch_tensor(list(pixel_arrays)))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images (``L`` or ``RGB``) -> (N, dim) unit vectors."""
        out = []
        for start in range(0, len(images), self.batch_size):
            out.append(self.encode_pixels(self.preprocess.to_tensor(list(images[start : start + self.batch_size]))))
        return _stack(out, self.dim)

    def encode_texts(self, texts: Iterable[str]) -> np.ndarray:
        """Strings -> (N, dim) unit vectors."""
        texts = list(texts)
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenize(texts[start : start + self.batch_size])
            with self._lock, torch.inference_mode(), self._autocast(enabled=not self._text_is_quantized):
                out.append(_normalise(features(self.model.get_text_features(**batch))))
        return _stack(out, self.dim)

    def encode_queries(self, texts: Iterable[str]) -> np.ndarray:
        """Search queries -> unit vectors (the same as `encode_texts`; a served `TowerEncoder` runs them on
        ONNX instead)."""
        return self.encode_texts(texts)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise texts for the text tower, padded to the longest and truncated to its limit."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_tokens,
                               return_tensors="pt")
        keep = {"input_ids", "attention_mask"}
        if "token_type_ids" in batch and self._base_config().model_type != "clip":
            keep.add("token_type_ids")
        return {k: v.to(self.device) for k, v in batch.items() if k in keep}


def _max_text_tokens(model, tokenizer) -> int:
    cfg = unwrap(model).config
    limit = getattr(cfg.text_config, "max_position_embeddings", None) or 77
    tok_limit = getattr(tokenizer, "model_max_length", limit) or limit
    return int(min(limit, tok_limit))


def _normalise(vectors: torch.Tensor) -> np.ndarray:
    vectors = vectors.float()
    vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return vectors.cpu().numpy().astype(np.float32, copy=False)


def _stack(parts: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, dim), dtype=np.float32)


def lower_matmul_weights(model, dtype: torch.dtype):
    """Store the Linear and Conv weights (where nearly all the work is) in `dtype`, and keep norms,
    embeddings and the residual stream in fp32; run the model under `torch.autocast(dtype)`.

    Casting the whole model instead rounds the residual stream at every layer: on ViT-B/32 the
    neighbour order then drifts from fp32 (top-10 agreement 0.975 vs 0.991 this way, bench/indexing.py)
    and it is no faster, since bf16 norms and activations run slower than fp32 ones on CPU.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.to(dtype)
    return model


INT8_TEXT_MIN_COSINE = 0.998  # an int8 text tower is kept only this close to the bf16 one (itself >= 0.9999 of fp32)


def quantize_text_tower(model):
    """int8 dynamic quantisation of the text tower's Linear layers (CPU). One query's text encode is
    memory-bound: int8 weights halve the bytes of bf16 and use VNNI. How close it stays to the unquantised
    tower depends on the weights (ViT-B/32's CLIP text tower: cosine >= 0.998; radlens-mini's MiniLM + LoRA:
    0.87), so `load_encoder` keeps it only where `int8_text_if_close` measures it close."""
    import warnings

    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    model.text_model.float()
    model.text_projection.float()
    linears = {f"text_model.{name}" for name, m in model.text_model.named_modules() if isinstance(m, torch.nn.Linear)}
    with warnings.catch_warnings():  # the eager API is deprecated in favour of torchao, not removed
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {name: default_dynamic_qconfig for name in linears | {"text_projection"}},
                         dtype=torch.qint8, inplace=True)
    return model


def int8_text_if_close(encoder: Encoder, texts: Sequence[str] | None = None, min_cosine: float | None = None
                       ) -> float:
    """Quantise `encoder`'s text tower to int8 only where its embeddings of `texts` (default: the query
    tower's check prompts) stay within `min_cosine` (default `INT8_TEXT_MIN_COSINE`) of the unquantised
    tower's; otherwise put that tower back. Returns the measured minimum cosine either way."""
    import copy

    from cxrmodel.model.query_tower import CHECK_PROMPTS

    texts = list(texts or CHECK_PROMPTS)
    min_cosine = INT8_TEXT_MIN_COSINE if min_cosine is None else min_cosine
    model = unwrap(encoder.model)
    reference = encoder.encode_texts(texts)
    kept = copy.deepcopy(model.text_model), copy.deepcopy(model.text_projection)
    quantize_text_tower(model)
    cosine = float(np.min(np.sum(encoder.encode_texts(texts) * reference, axis=1)))
    if cosine < min_cosine:
        model.text_model, model.text_projection = kept
        log.info("int8 text tower not used: min cosine %.4f to the %s tower < %s", cosine,
                 str(encoder.dtype).replace("torch.", ""), min_cosine)
    return cosine


def load_encoder(config: EncoderConfig) -> Encoder:
    """Load checkpoint, tokenizer, preprocessing and adapter as `config` says; raises ModelLoadError."""
    device = choose_device(config.device)
    dtype = choose_dtype(config.precision, device)
    model, tokenizer, preprocess = load_pretrained_parts(config.model, dtype=torch.float32, revision=config.revision)
    int8_text = config.precision == "auto" and device.type == "cpu" and dtype == torch.bfloat16
    if config.adapter:
        model = attach_adapter(model, config.adapter, merge=config.merge or int8_text)
    model = model.to(device=device).requires_grad_(False)  # an encoder only runs the model
    apply_fastpaths(model, device)
    if dtype != torch.float32:
        lower_matmul_weights(model, dtype)
    model.eval()
    log.info("loaded %s%s on %s in %s", config.model,
             f" + adapter {config.adapter}" if config.adapter else "", device, dtype)
    adapter = str(Path(config.adapter).resolve()) if config.adapter else None
    from cxrmodel.model.bundled import resolve_alias

    local = Path(resolve_alias(config.model)).expanduser()
    name = str(local.resolve()) if local.is_dir() else config.model
    encoder = Encoder(model, tokenizer, preprocess, model_name=name, adapter=adapter,
                      device=device, dtype=dtype, batch_size=config.batch_size)
    encoder.int8_text_cosine = int8_text_if_close(encoder) if int8_text else None
    encoder.config = config  # so that other processes (e.g. Ray actors) can load the same encoder
    encoder.revision = None if local.is_dir() else hub_commit(config.model, config.revision)
    encoder.checkpoint_format = checkpoint_format_of(local, model)
    return encoder


def checkpoint_format_of(source: Path, model) -> str:
    """The layout a checkpoint was loaded from, in words an index records."""
    from cxrmodel.model.dualencoder import is_model_dir
    from cxrmodel.model.openclip import checkpoint_format, is_open_clip_dir, read_config

    if source.is_dir() and is_model_dir(source):
        return "radlens dual encoder"
    if source.is_dir() and is_open_clip_dir(source):
        return checkpoint_format(read_config(source))
    model_type = unwrap(model).config.model_type
    return {"clip": "transformers CLIP", "vision-text-dual-encoder": "transformers dual encoder"}.get(
        model_type, f"transformers {model_type}")


def hub_commit(name: str, revision: str | None = None) -> str | None:
    """The commit a hub model id (at `revision`, default the latest) resolved to in the local hub cache,
    read from the snapshot folder its config was loaded from; None when it cannot be told."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(name, "config.json", revision=revision)
    if not isinstance(path, str):
        return None
    snapshot = Path(path).parent
    return snapshot.name if snapshot.parent.name == "snapshots" else None
