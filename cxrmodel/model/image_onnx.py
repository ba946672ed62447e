"""The image tower on ONNX Runtime, fp32: where an index run embeds in fp32 on a CPU, ONNX Runtime's
kernels do it faster than torch's to the same numbers.

Measured side by side (`python -m bench.int8_image`, ViT-B/32, batch 32, 2 threads, AMD EPYC with
AVX-512 BF16 + VNNI): torch fp32 19.4 img/s, ONNX Runtime fp32 36.7 (1.89x, top-10 agreement 1.000),
torch bf16 (what `auto` runs on such a CPU) 63.1, ONNX Runtime int8 dynamic 66.7 but agreement 0.964 and
int8 static 82.1 at 0.828 -- below the 0.98 an index needs, so int8 is not used. The choice
(`choose_image_backend`) therefore follows the number format `choose_dtype` picked from the CPU's
features: bf16 (AVX-512 BF16 or AMX) stays on torch; fp32 on a CPU goes to ONNX Runtime.

The tower is exported in memory from the encoder's own model (fast paths and adapter included) and
checked against it before use (min cosine >= `MIN_COSINE` on generated images); a failed export or check
leaves the torch tower in place.
"""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
import torch

from cxrmodel.errors import ModelLoadError
from cxrmodel.model.encoder import Encoder, features
from cxrmodel.model.query_tower import onnxruntime_available
from cxrmodel.model.tower_export import export_onnx

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999


def choose_image_backend(numerics: str, device_type: str, onnx_available: bool) -> str:
    """"onnx" for fp32 image vectors on a CPU with onnxruntime installed; "torch" otherwise (bf16 on AVX-512
    BF16/AMX, any GPU, or no onnxruntime)."""
    return "onnx" if numerics == "fp32" and device_type == "cpu" and onnx_available else "torch"


class ImageTower(torch.nn.Module):
    """pixels -> unit image embeddings, as `Encoder.encode_pixels` computes them (the module exported)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.eval()  # the exporter restores this mode onto every submodule

    def forward(self, pixel_values):
        vectors = features(self.model.get_image_features(pixel_values=pixel_values))
        return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class OnnxImageTower:
    """Preprocessed pixels -> unit vectors on ONNX Runtime (thread-safe: one run at a time)."""

    def __init__(self, session, min_cosine: float):
        self._session = session
        self.min_cosine = min_cosine
        self._lock = threading.Lock()

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        with self._lock:
            out = self._session.run(None, {"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)})[0]
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def build_image_tower(encoder: Encoder, seed: int = 0) -> OnnxImageTower:
    """Export `encoder`'s image tower to ONNX (in memory), load it on ONNX Runtime with torch's thread count,
    and check it against the torch tower; ModelLoadError when either step fails."""
    import onnxruntime

    h, w = encoder.preprocess.output_size
    rng = np.random.default_rng(seed)
    probe = torch.from_numpy(rng.normal(0, 1, (4, 3, h, w)).astype(np.float32))
    buffer = io.BytesIO()
    try:
        with torch.inference_mode(False), torch.no_grad():
            export_onnx(ImageTower(encoder.model), {"pixel_values": probe[:2]}, buffer, {"pixel_values": {0: "batch"}})
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 -- any exporter/runtime failure: keep the torch tower
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"the image tower could not run on ONNX Runtime ({first})") from None
    tower = OnnxImageTower(session, 0.0)
    expected = encoder.encode_pixels(probe)
    cosine = float(np.min(np.sum(tower.encode(probe.numpy()) * expected, axis=1)))
    if not cosine >= MIN_COSINE:
        raise ModelLoadError(f"the ONNX image tower differs from the torch one (min cosine {cosine:.6f})")
    tower.min_cosine = cosine
    return tower


def use_onnx_image_tower(encoder: Encoder) -> str:
    """Switch `encoder`'s image embedding to ONNX Runtime where `choose_image_backend` says so; returns the
    line an index run prints about it."""
    numerics = encoder.identity["numerics"]
    if choose_image_backend(numerics, encoder.device.type, onnxruntime_available()) != "onnx":
        return f"image tower: torch ({numerics} on {encoder.device.type})"
    try:
        encoder.image_tower = build_image_tower(encoder)
    except ModelLoadError as exc:
        log.warning("%s; embedding with torch", exc)
        return f"image tower: torch ({exc})"
    return (f"image tower: ONNX Runtime fp32 (min cosine to the torch tower {encoder.image_tower.min_cosine:.6f} "
            "on probe images)")
