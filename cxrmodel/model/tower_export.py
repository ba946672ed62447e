"""Export an encoder's text tower to ONNX for torch-free text queries, checked against torch in fp32.

The tower exported is the checkpoint's own fp32 text tower with the adapter merged (not the int8 or
bf16 one an `auto` encoder may run), so the ONNX tower reproduces the reference numerics; the check
encodes `CHECK_PROMPTS` with both and requires identical token ids and cosine >= `MIN_COSINE` on
every prompt. See `cxrmodel.model.query_tower` for the reading side.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrmodel.errors import ModelLoadError
from cxrmodel.hashing import file_sha256
from cxrmodel.model.encoder import Encoder, attach_adapter, features, load_pretrained_parts
from cxrmodel.model.query_tower import (
    CHECK_PROMPTS,
    MANIFEST,
    MIN_COSINE,
    ONNX_FILE,
    TOKENIZER_FILE,
    TOWER_DIR,
    QueryTower,
    TowerManifest,
    onnxruntime_available,
    tower_dir,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TowerExport:
    """What `export_query_tower` did: `exported`, `kept` (already there and valid) or `skipped` (why)."""

    status: str
    directory: Path | None = None
    min_cosine: float | None = None
    reason: str = ""

    def line(self) -> str:
        """One line for the end of `radlens index`."""
        if self.status == "skipped":
            return f"text queries: torch encoder (no ONNX query tower: {self.reason})"
        return (f"text queries: ONNX query tower {self.status} (min cosine to the torch tower in fp32 "
                f"{self.min_cosine:.6f} on {len(CHECK_PROMPTS)} prompts)")


class _TextTower(torch.nn.Module):
    """token ids (+ mask, token types) -> unit text embeddings, as `Encoder.encode_texts` computes them."""

    def __init__(self, model, inputs: list[str]):
        super().__init__()
        self.model = model
        self.inputs = inputs
        self.eval()  # the exporter restores the wrapper's mode onto every submodule: training would mean dropout

    def forward(self, *tensors):
        vectors = features(self.model.get_text_features(**dict(zip(self.inputs, tensors, strict=True))))
        return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def tower_tokenizer(encoder: Encoder):
    """The encoder's tokenizer as a `tokenizers.Tokenizer` that pads and truncates like `Encoder.tokenize`."""
    from tokenizers import Tokenizer

    hf = encoder.tokenizer
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(f"the tokenizer of {encoder.model_name} has no `tokenizers` form (a slow tokenizer)")
    tok = Tokenizer.from_str(backend.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length=encoder.max_text_tokens, direction=getattr(hf, "truncation_side", "right"))
    tok.enable_padding(pad_id=int(hf.pad_token_id), pad_token=str(hf.pad_token),
                       direction=getattr(hf, "padding_side", "right"))
    return tok


def _fp32_text_model(encoder: Encoder):
    """The checkpoint again, in fp32 with the adapter merged: the reference the ONNX tower must match."""
    config = encoder.config
    if config is None:
        raise ModelLoadError("the encoder was not made by load_encoder, so its checkpoint cannot be reloaded")
    model, _, _ = load_pretrained_parts(config.model, dtype=torch.float32, revision=encoder.revision or config.revision)
    if config.adapter:
        model = attach_adapter(model, config.adapter, merge=True)
    return model.eval().requires_grad_(False)


def export_onnx(module: torch.nn.Module, sample: dict[str, torch.Tensor], target, dynamic: dict[str, dict]) -> str:
    """Write `module` (run on `sample`'s tensors, in order) as ONNX to `target` (a path or a binary file
    object), axes `dynamic` per input name, the output named "embeddings" with a dynamic batch; returns the
    exporter used. ModelLoadError when neither exporter manages."""
    axes = dynamic | {"embeddings": {0: "batch"}}
    errors = []
    for dynamo in (False, True):  # the TorchScript exporter is fast and needs nothing more; dynamo needs onnxscript
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, tuple(sample.values()), str(target) if isinstance(target, Path) else target,
                                  input_names=list(sample), output_names=["embeddings"], dynamic_axes=axes,
                                  opset_version=17, dynamo=dynamo)
            return f"torch {torch.__version__} onnx.export(dynamo={dynamo}), opset 17"
        except Exception as exc:  # noqa: BLE001 -- any exporter failure means: try the other, else give up
            errors.append(f"dynamo={dynamo}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}")
    raise ModelLoadError("ONNX export failed (" + "; ".join(errors) + ")")


def check_tower(tower: QueryTower, encoder_tokenize, reference) -> float:
    """Min cosine over `CHECK_PROMPTS` between the ONNX tower and `reference` (fp32 torch); ModelLoadError
    when the token ids differ or the cosine is below `MIN_COSINE`."""
    prompts = list(CHECK_PROMPTS)
    theirs = encoder_tokenize(prompts)
    ours = tower.tokenize(prompts)
    for name, ids in ours.items():
        if not np.array_equal(ids, theirs[name].cpu().numpy()):
            raise ModelLoadError(f"the exported tokenizer's {name} differ from the model tokenizer's")
    with torch.inference_mode():
        expected = reference(*theirs.values()).float().numpy()
    got = tower.encode(prompts)
    cosine = float(np.min(np.sum(got * expected, axis=1)))
    if not cosine >= MIN_COSINE:
        raise ModelLoadError(f"the ONNX tower differs from the torch one (min cosine {cosine:.6f} < {MIN_COSINE})")
    return cosine


def export_query_tower(encoder: Encoder, data_dir: str | Path) -> TowerExport:
    """Export (or keep) the ONNX query tower of `encoder` in `data_dir` and remove other models' towers.
    Never raises for a model that cannot be exported: the result says why (queries then use torch)."""
    if not onnxruntime_available():
        return TowerExport("skipped", reason="onnxruntime is not installed")
    target = tower_dir(data_dir, encoder.identity)
    try:
        if (target / MANIFEST).is_file():
            try:
                kept = QueryTower.load(target, full_check=True)
                _remove_others(Path(data_dir), keep=target)
                return TowerExport("kept", target, kept.manifest.min_cosine)
            except ModelLoadError as exc:
                log.warning("%s; exporting it again", exc)
        cosine = _write(encoder, target)
    except (ModelLoadError, OSError, RuntimeError, ValueError) as exc:
        return TowerExport("skipped", reason=str(exc))
    _remove_others(Path(data_dir), keep=target)
    return TowerExport("exported", target, cosine)


def _write(encoder: Encoder, target: Path) -> float:
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        # traced on a padded batch: models that skip the attention mask when nothing is padded (a branch
        # taken at trace time) would otherwise export a graph that ignores it
        sample = {k: v.cpu() for k, v in encoder.tokenize(["x", CHECK_PROMPTS[2]]).items()}
        reference = _TextTower(_fp32_text_model(encoder), list(sample))
        exporter = export_onnx(reference, sample, staging / ONNX_FILE,
                               {name: {0: "batch", 1: "tokens"} for name in sample})
        tower_tokenizer(encoder).save(str(staging / TOKENIZER_FILE))
        manifest = TowerManifest(identity=dict(encoder.identity), inputs=list(sample),
                                 max_tokens=int(encoder.max_text_tokens), min_cosine=0.0, prompts=len(CHECK_PROMPTS),
                                 onnx_sha256=file_sha256(staging / ONNX_FILE),
                                 onnx_bytes=(staging / ONNX_FILE).stat().st_size, exporter=exporter)
        (staging / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
        cosine = check_tower(QueryTower.load(staging), lambda texts: {
            k: v.cpu() for k, v in encoder.tokenize(texts).items()}, reference)
        manifest = TowerManifest(**{**manifest.__dict__, "min_cosine": round(cosine, 7)})
        (staging / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
        shutil.rmtree(target, ignore_errors=True)
        staging.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cosine


def _remove_others(data_dir: Path, keep: Path) -> None:
    """Towers of models no index here uses any more (a rebuild with another model leaves one behind)."""
    for path in (data_dir / TOWER_DIR).iterdir():
        if path != keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
