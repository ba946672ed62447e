"""The text tower as ONNX beside an index: text queries without torch, transformers or peft.

`radlens index` exports the fp32 text tower of the model that built the index (adapter merged) to
``DATA_DIR/query_tower/<key>/`` with its tokenizer (a `tokenizers` JSON, padding and truncation set
as the model's tokenizer applies them) and a manifest, after checking the ONNX tower against the torch
one on a fixed prompt set (`cxrmodel.model.tower_export`). `QueryTower` loads those files with
onnxruntime and `tokenizers` only; importing this module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrmodel.errors import ModelLoadError
from cxrmodel.hashing import file_sha256

log = logging.getLogger(__name__)

TOWER_DIR = "query_tower"
MANIFEST = "manifest.json"
ONNX_FILE = "text_tower.onnx"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "radlens-query-tower/1"
MIN_COSINE = 0.9999  # the ONNX tower must agree with the torch one in fp32 at least this well
CHECK_PROMPTS = (
    "lateral lumbar spine", "frontal chest radiograph", "PA chest x-ray with a left pleural effusion",
    "axial CT of the abdomen", "MRI of the brain", "cardiomegaly", "no acute cardiopulmonary abnormality",
    "a photo of a dog", "x", "Röntgen Thorax p.a. in zwei Ebenen",
    "a very long query " + " ".join(["about the right lower lobe"] * 30),  # longer than any text tower's limit
)


def tower_key(identity: dict) -> str:
    """Which index space a tower embeds into: the fields `Generation.serves` compares."""
    fields = {k: identity.get(k) for k in ("model", "adapter_hash", "dim", "revision")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def tower_dir(data_dir: str | Path, identity: dict) -> Path:
    """Where the tower for the encoder with `identity` lives in a data dir."""
    return Path(data_dir) / TOWER_DIR / tower_key(identity)


def onnxruntime_available() -> bool:
    """Whether onnxruntime can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


@dataclass(frozen=True)
class TowerManifest:
    """What an exported tower is and how it was checked."""

    identity: dict  # the identity of the encoder that built the index (its `Encoder.identity`)
    inputs: list[str]  # ONNX input names, in order: input_ids, attention_mask[, token_type_ids]
    max_tokens: int
    min_cosine: float  # measured against the torch tower in fp32 on CHECK_PROMPTS
    prompts: int
    onnx_sha256: str
    onnx_bytes: int
    exporter: str

    def to_dict(self) -> dict:
        return {"format": FORMAT, **self.__dict__}

    @classmethod
    def read(cls, directory: Path) -> TowerManifest:
        data = json.loads((directory / MANIFEST).read_text())
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
        return cls(**data)


class QueryTower:
    """Strings -> unit vectors with the exported text tower (onnxruntime + tokenizers). Thread-safe."""

    def __init__(self, directory: Path, manifest: TowerManifest, session, tokenizer):
        self.directory = directory
        self.manifest = manifest
        self._session = session
        self._tokenizer = tokenizer
        self._lock = threading.Lock()  # a tokenizers.Tokenizer with padding set is not shared across threads

    @classmethod
    def load(cls, directory: str | Path, full_check: bool = False, prepack: bool = True) -> QueryTower:
        """Open an exported tower; ModelLoadError when its files are missing, damaged or changed (by size;
        `full_check`: by sha256 too, which reads the whole file). `prepack` False: onnxruntime keeps the
        weights as stored (ViT-B/32's tower opens in 0.25 s instead of 0.4, each query a few ms slower)."""
        directory = Path(directory)
        onnx_path = directory / ONNX_FILE
        try:
            manifest = TowerManifest.read(directory)
            if onnx_path.stat().st_size != manifest.onnx_bytes or (
                    full_check and file_sha256(onnx_path) != manifest.onnx_sha256):
                raise ValueError(f"{ONNX_FILE} does not match its manifest")
            import onnxruntime
            from tokenizers import Tokenizer

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            if not prepack:
                options.add_session_config_entry("session.disable_prepacking", "1")
            session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as exc:  # noqa: BLE001 -- files, JSON, and onnxruntime's own errors (no common base class)
            raise ModelLoadError(f"the query tower in {directory} cannot be used: {exc}") from None
        return cls(directory, manifest, session, tokenizer)

    @property
    def dim(self) -> int:
        return int(self.manifest.identity["dim"])

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Token ids, attention mask (and token types) as the model's own tokenizer makes them."""
        with self._lock:
            encodings = self._tokenizer.encode_batch(texts)
        batch = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
        return {name: batch[name] for name in self.manifest.inputs}

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """(N, dim) float32 unit vectors."""
        texts = list(texts)
        out = [self._session.run(None, self.tokenize(texts[i : i + batch_size]))[0]
               for i in range(0, len(texts), batch_size)]
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = np.concatenate(out).astype(np.float32, copy=False)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def find_tower(data_dir: str | Path, identity: dict, prepack: bool = True) -> QueryTower | None:
    """The data dir's tower for the encoder with `identity`, if one was exported and loads; else None
    (the caller then uses the torch encoder)."""
    directory = tower_dir(data_dir, identity)
    if not (directory / MANIFEST).is_file() or not onnxruntime_available():
        return None
    try:
        tower = QueryTower.load(directory, prepack=prepack)
    except ModelLoadError as exc:
        log.warning("%s; text queries use the torch encoder", exc)
        return None
    return tower
