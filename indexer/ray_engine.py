"""`radlens index --engine ray`: the decode and embed stages on Ray Data, the same writer.

list (the driver's plan) -> decode (Ray CPU tasks, `prepare` as in the one-process pipeline) ->
embed (an actor pool, one model per actor, `num_gpus` per actor where GPUs exist) -> the driver's
`ChunkWriter`, one transaction per chunk. Only the driver writes, keyed by path and (generation,
image) with upserts, so a task Ray retries after a worker dies cannot duplicate or lose a row; the
order of the plan is kept, so on SQLite ids equal those of a one-process run.

Ray is optional (`pip install 'radlens[ray]'`) and imported only here, only when asked for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from cxrmodel.errors import DataError
from cxrmodel.imaging.decode import ImageLimits
from cxrmodel.imaging.preprocess import ImagePreprocess

from .prepare import Prepared, PrepareTask, prepare

log = logging.getLogger(__name__)

_SCALARS = ("path", "size_bytes", "mtime_ns", "content_hash", "unchanged", "width", "height", "format", "error",
            "changed_unreadable")


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide the Ray pipeline runs."""

    address: str | None = field(default=None, metadata={
        "help": "Ray cluster address (host:port, or 'auto'); None starts a local Ray for this run."})
    actors: int = field(default=1, metadata={"help": "Embedding actors (one model each)."})
    gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per embedding actor (0 on CPU nodes)."})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs reserved per embedding actor."})
    decode_batch: int = field(default=16, metadata={"help": "Files per decode task."})
    decode_cpus: float = field(default=1.0, metadata={"help": "CPUs per decode task."})
    task_retries: int = field(default=5, metadata={"help": "Retries of a decode task whose worker died."})
    plan_slice: int = field(default=200_000, metadata={"help": "Files per Ray dataset (the plan runs in slices)."})
    embed_batch: int = field(default=32, metadata={"help": "Images per embedding call."})


def require_ray():
    """Import Ray Data, or explain how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise DataError("--engine ray needs Ray: pip install 'radlens[ray]' (or pip install 'ray[data]')") from None
    return ray


def decode_batch(batch: dict, preprocess: ImagePreprocess, limits: ImageLimits) -> dict:
    """Ray task body: `prepare` each file of a batch; columns out, pixels zero-filled where absent."""
    h, w = preprocess.output_size
    items = [prepare(PrepareTask(str(p), str(k) or None), preprocess, limits)
             for p, k in zip(batch["path"], batch["known_hash"], strict=True)]
    out = {name: np.array([getattr(it, name) if getattr(it, name) is not None else "" for it in items])
           for name in _SCALARS}
    out["has_pixels"] = np.array([it.pixels is not None for it in items])
    out["metadata"] = np.array([json.dumps(it.metadata) for it in items])
    out["pixels"] = np.stack([_rgb(it.pixels, h, w) for it in items]) if items \
        else np.zeros((0, h, w, 3), np.uint8)
    return out


def _rgb(pixels: np.ndarray | None, h: int, w: int) -> np.ndarray:
    if pixels is None:
        return np.zeros((h, w, 3), np.uint8)
    return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels


class EmbedActor:
    """One model per actor; embeds the decoded images of a batch (others get a zero vector)."""

    def __init__(self, encoder_config):
        from cxrmodel.model.encoder import load_encoder

        self.encoder = load_encoder(encoder_config)

    def __call__(self, batch: dict) -> dict:
        keep = np.flatnonzero(batch["has_pixels"])
        vectors = np.zeros((len(batch["path"]), self.encoder.dim), dtype=np.float32)
        if len(keep):
            vectors[keep] = self.encoder.encode_arrays([batch["pixels"][i] for i in keep])
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["vector"] = vectors
        return out


def embed_with_ray(tasks: list[PrepareTask], encoder, limits: ImageLimits, config: RayConfig,
                   chunk_size: int) -> Iterator[tuple[list[Prepared], np.ndarray]]:
    """Yield (prepared chunk, vectors of its freshly decoded items) in plan order, computed on Ray."""
    ray = require_ray()
    if encoder.config is None:
        raise DataError("--engine ray needs an encoder made by load_encoder (its config is sent to the actors)")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=config.address, logging_level=logging.WARNING, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the writer sees the plan's order: same ids as one process
        ctx.enable_progress_bars = False
        # absolute model and adapter paths: actors run in directories of their own, on other machines
        actor_config = replace(encoder.config, model=encoder.model_name, adapter=encoder.adapter)
        for lo in range(0, len(tasks), config.plan_slice):  # the driver never holds a whole archive's dataset
            ds = _dataset(ray, tasks[lo:lo + config.plan_slice], encoder.preprocess, limits, actor_config, config)
            for batch in ds.iter_batches(batch_size=chunk_size, batch_format="numpy"):
                chunk = [_prepared(batch, i) for i in range(len(batch["path"]))]
                fresh = [i for i, p in enumerate(chunk) if p.needs_vector]
                yield chunk, np.asarray(batch["vector"][fresh], dtype=np.float32).reshape(len(fresh), encoder.dim)
    finally:
        if started_here:
            ray.shutdown()


def _dataset(ray, tasks: list[PrepareTask], preprocess: ImagePreprocess, limits: ImageLimits, encoder_config,
             config: RayConfig):
    """list -> decode tasks -> embedding actors, for one slice of the plan."""
    items = [{"path": t.path, "known_hash": t.known_hash or ""} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // config.decode_batch, 200)))
    ds = ds.map_batches(decode_batch, batch_size=config.decode_batch, batch_format="numpy",
                        fn_kwargs={"preprocess": preprocess, "limits": limits},
                        num_cpus=config.decode_cpus, max_retries=config.task_retries)
    return ds.map_batches(EmbedActor, batch_size=config.embed_batch, batch_format="numpy",
                          fn_constructor_kwargs={"encoder_config": encoder_config},
                          compute=ray.data.ActorPoolStrategy(size=config.actors),
                          num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor or None)


def _prepared(batch: dict, i: int) -> Prepared:
    return Prepared(path=str(batch["path"][i]), size_bytes=int(batch["size_bytes"][i]),
                    mtime_ns=int(batch["mtime_ns"][i]), content_hash=str(batch["content_hash"][i]),
                    unchanged=bool(batch["unchanged"][i]), width=int(batch["width"][i]),
                    height=int(batch["height"][i]), format=str(batch["format"][i]),
                    metadata=json.loads(str(batch["metadata"][i])), error=str(batch["error"][i]) or None,
                    changed_unreadable=bool(batch["changed_unreadable"][i]))
