"""Decode stage, run in worker processes: file -> content hash + model-sized pixels.

Kept free of torch and SQL so that spawned workers start fast and stay small. A file whose hash
equals the one already indexed is not decoded at all.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrmodel.errors import DataError, ImageDecodeError
from cxrmodel.imaging.decode import ImageLimits, decode_bytes, header_metadata
from cxrmodel.imaging.preprocess import ImagePreprocess

from .dicomweb import fetch, is_dicomweb


@dataclass
class Prepared:
    """What a worker learned about one file."""

    path: str
    size_bytes: int = 0
    mtime_ns: int = 0
    content_hash: str = ""
    unchanged: bool = False
    pixels: np.ndarray | None = None
    width: int = 0
    height: int = 0
    format: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def needs_vector(self) -> bool:
        """A new or changed file that decoded: its pixels are to be embedded."""
        return self.error is None and not self.unchanged


@dataclass(frozen=True)
class PrepareTask:
    """One file to prepare, with the hash the DB already holds for it (if any)."""

    path: str
    known_hash: str | None = None


def file_hash(data: bytes) -> str:
    """sha256 hex digest of file contents."""
    return hashlib.sha256(data).hexdigest()


def prepare(task: PrepareTask, preprocess: ImagePreprocess, limits: ImageLimits) -> Prepared:
    """Read, hash and (when new or changed) decode and resize one file. Never raises for bad files."""
    out = Prepared(path=task.path)
    if is_dicomweb(task.path):
        try:
            data = fetch(task.path, limits.max_bytes)
        except DataError as exc:
            out.error = str(exc)
            return out
        out.size_bytes = len(data)
        return _prepare_bytes(out, data, task, preprocess, limits)
    try:
        st = os.stat(task.path)
        out.size_bytes, out.mtime_ns = st.st_size, st.st_mtime_ns
        if st.st_size > limits.max_bytes:
            out.error = f"file is {st.st_size} bytes, over the {limits.max_bytes}-byte limit"
            return out
        data = Path(task.path).read_bytes()
    except OSError as exc:
        out.error = f"cannot read file ({exc.strerror or exc})"
        return out
    return _prepare_bytes(out, data, task, preprocess, limits)


def _prepare_bytes(out: Prepared, data: bytes, task: PrepareTask, preprocess: ImagePreprocess,
                   limits: ImageLimits) -> Prepared:
    out.content_hash = file_hash(data)
    if out.content_hash == task.known_hash:
        out.unchanged = True
        out.metadata = header_metadata(data, Path(task.path).name)  # a touched file's header may have changed
        return out
    try:
        decoded = decode_bytes(data, name=Path(task.path).name, limits=limits)
    except ImageDecodeError as exc:
        out.error = str(exc)
        return out
    out.width, out.height, out.format = decoded.width, decoded.height, decoded.format
    out.metadata = decoded.metadata
    out.pixels = preprocess.pixels(decoded.image)
    return out


_worker_args: tuple | None = None


def _init_worker(preprocess: ImagePreprocess, limits: ImageLimits) -> None:
    global _worker_args
    _worker_args = (preprocess, limits)


def _prepare_in_worker(task: PrepareTask) -> Prepared:
    return prepare(task, *_worker_args)


def prepare_all(tasks: Iterable[PrepareTask], preprocess: ImagePreprocess, limits: ImageLimits,
                workers: int, window: int = 256, while_starting: Callable[[], None] | None = None,
                batch: int = 32, threads: int | None = None) -> Iterator[Prepared]:
    """Prepare tasks in order.

    `workers` > 0: in that many processes, concurrently with the caller, at most `window` ahead.
    `workers` == 0: in this process, `batch` files at a time on `threads` threads (default: every
    core), taking turns with the caller -- nothing is decoded while the caller works on a batch, so a
    CPU model then has every core to itself rather than sharing them with decoders.
    `while_starting` runs once, before the first result is awaited.
    """
    if workers <= 0:
        if while_starting is not None:
            while_starting()
        yield from prepare_in_turns(list(tasks), preprocess, limits, batch, threads or available_cores())
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(preprocess, limits)) as pool:
        yield from bounded_imap(pool.apply_async, _prepare_in_worker, tasks, window, while_starting)


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def prepare_in_turns(tasks: list[PrepareTask], preprocess: ImagePreprocess, limits: ImageLimits,
                     batch: int, threads: int) -> Iterator[Prepared]:
    """Prepare `batch` tasks at a time on a pool of threads (Pillow and hashlib release the GIL
    while they decode, resize and hash); the next batch starts only when the caller asks for it."""
    from concurrent.futures import ThreadPoolExecutor

    def one(task: PrepareTask) -> Prepared:
        return prepare(task, preprocess, limits)

    if threads <= 1:
        yield from map(one, tasks)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="radlens-decode") as pool:
        for start in range(0, len(tasks), batch):
            yield from list(pool.map(one, tasks[start : start + batch]))


def bounded_imap(submit: Callable, fn: Callable, items: Iterable, window: int,
                 while_starting: Callable[[], None] | None = None) -> Iterator:
    """Ordered results of fn(item) via `submit`, keeping at most `window` in flight; `while_starting`
    runs once, after the first window is submitted and before waiting for the first result."""
    pending: deque = deque()
    for item in items:
        pending.append(submit(fn, (item,)))
        if len(pending) >= window:
            if while_starting is not None:
                while_starting()
                while_starting = None
            yield pending.popleft().get()
    if while_starting is not None:
        while_starting()
    while pending:
        yield pending.popleft().get()
