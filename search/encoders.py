"""The encoder an engine serves a generation with: torch, or the ONNX query tower with torch on demand.

When the index has a checked ONNX text tower (`cxrmodel.model.query_tower`), a `TowerEncoder` answers
the identity questions and text queries (search, the relevance null) without importing torch,
transformers or peft; the first image, label or report request loads the torch encoder. Label prompts
are always embedded by the torch encoder, so zero-shot scores keep the numerics calibration measured.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxrmodel.errors import ModelLoadError
from cxrmodel.model.config import EncoderConfig
from cxrmodel.model.query_tower import QueryTower, find_tower

if TYPE_CHECKING:
    from cxrmodel.model.encoder import Encoder
    from indexer.store import Generation

log = logging.getLogger(__name__)


class TowerEncoder:
    """Identity and text queries from an ONNX query tower; everything else from a torch `Encoder` loaded
    on first use (thread-safe). Quacks like `Encoder` for the engine."""

    def __init__(self, tower: QueryTower, load: Callable[[], Encoder]):
        identity = tower.manifest.identity
        self.tower = tower
        self.model_name: str = identity["model"]
        self.adapter: str | None = identity.get("adapter")
        self.adapter_hash: str | None = identity.get("adapter_hash")
        self.revision: str | None = identity.get("revision")
        self.cache_dir: Path | None = None
        self._load = load
        self._encoder: Encoder | None = None
        self._lock = threading.Lock()

    @property
    def identity(self) -> dict:
        """The identity of the encoder that built the index (recorded with the tower)."""
        return dict(self.tower.manifest.identity)

    @property
    def dim(self) -> int:
        return self.tower.dim

    @property
    def query_fingerprint(self) -> str:
        """What shapes this encoder's query vectors: the exported tower's bytes."""
        return "onnx:" + self.tower.manifest.onnx_sha256

    @property
    def torch_loaded(self) -> bool:
        """Whether a request has needed the torch encoder yet."""
        return self._encoder is not None

    def encode_queries(self, texts: Iterable[str]) -> np.ndarray:
        """Search queries -> unit vectors, by the ONNX tower (fp32)."""
        return self.tower.encode(list(texts))

    def torch_encoder(self) -> Encoder:
        """The torch encoder, loaded on first call."""
        with self._lock:
            if self._encoder is None:
                log.info("loading the torch encoder of %s (an image, label or report request)", self.model_name)
                encoder = self._load()
                if encoder.cache_dir is None:
                    encoder.cache_dir = self.cache_dir
                self._encoder = encoder
            return self._encoder

    def __getattr__(self, name: str):
        if name.startswith("_"):  # private names and dunders never trigger a model load
            raise AttributeError(name)
        return getattr(self.torch_encoder(), name)


def served_encoder(config, gen: Generation) -> Encoder | TowerEncoder:
    """The encoder for generation `gen` of `config.data_dir` (an `EngineConfig`): a `TowerEncoder` when the
    index has a query tower for the model it was built with (and no other model is asked for), else the
    torch encoder, loaded now."""
    if gen.adapter_path and not Path(gen.adapter_path).exists():
        raise ModelLoadError(f"the index was built with adapter {gen.adapter_path}, which no longer exists")
    encoder_config = EncoderConfig(model=config.model or gen.model, adapter=gen.adapter_path,
                                   precision=config.precision, device=config.device,
                                   revision=None if config.model else gen.model_revision)

    def load() -> Encoder:
        from cxrmodel.model.encoder import load_encoder

        return load_encoder(encoder_config)

    if config.model is None and config.query_tower:
        tower = find_tower(config.data_dir, gen.query_identity(), prepack=config.query_tower_prepack)
        if tower is not None and gen.serves(tower.manifest.identity):
            return TowerEncoder(tower, load)
    return load()
