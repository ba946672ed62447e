"""Decode stage, run in worker processes: file -> content hash + model-sized pixels.

Kept free of torch and SQL so that spawned workers start fast and stay small. A file whose hash
equals the one already indexed is not decoded at all.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrmodel.errors import DataError, ImageDecodeError
from cxrmodel.imaging.decode import ImageLimits, decode_bytes, header_metadata
from cxrmodel.imaging.preprocess import ImagePreprocess

from .dicomweb import fetch, is_dicomweb
from .schedule import DecodePlan, PlanTrial, ScheduleConfig


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
    changed_unreadable: bool = False  # an indexed file whose new content does not decode: its row is stale

    @property
    def skip_kind(self) -> str:
        """The `skipped` table's kind for this file's error."""
        return "changed" if self.changed_unreadable else "file"

    @property
    def needs_vector(self) -> bool:
        """A new or changed file that decoded: its pixels are to be embedded."""
        return self.error is None and not self.unchanged


@dataclass(frozen=True)
class PrepareTask:
    """One file to prepare, with the hash the DB already holds for it (if any)."""

    path: str
    known_hash: str | None = None


CHANGED_UNREADABLE = ("changed since it was indexed: the index still holds the earlier content, "
                      "which `radlens index --prune` removes")


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
        decoded = decode_bytes(data, name=Path(task.path).name, limits=limits, model_side=preprocess.decode_side)
    except ImageDecodeError as exc:
        out.error = str(exc)
        if task.known_hash is not None:  # its row holds content the file no longer has
            out.changed_unreadable = True
            out.error += f"; {CHANGED_UNREADABLE}"
        return out
    (out.width, out.height), out.format = decoded.file_size, decoded.format
    out.metadata = decoded.metadata
    out.pixels = np.asarray(decoded.model_input(preprocess), dtype=np.uint8)
    return out


_worker_args: tuple | None = None


def _init_worker(preprocess: ImagePreprocess, limits: ImageLimits) -> None:
    global _worker_args
    _worker_args = (preprocess, limits)


def _prepare_in_worker(task: PrepareTask) -> Prepared:
    return prepare(task, *_worker_args)


def prepare_all(tasks: Iterable[PrepareTask], preprocess: ImagePreprocess, limits: ImageLimits,
                workers: int, window: int = 256, while_starting: Callable[[], None] | None = None,
                batch: int = 32, threads: int | None = None, trial: PlanTrial | None = None,
                set_model_threads: Callable[[int], None] | None = None) -> Iterator[Prepared]:
    """Prepare tasks in order.

    `workers` > 0: in that many processes, concurrently with the caller, at most `window` ahead.
    `workers` == 0: in this process, `batch` files at a time on threads, as `trial` plans each batch
    (default: in turns on `threads` threads, default every core -- nothing is decoded while the caller
    works on a batch, so a CPU model then has every core to itself); see `prepare_scheduled`.
    `while_starting` runs once, before the first result is awaited.
    """
    if workers <= 0:
        if while_starting is not None:
            while_starting()
        tasks = list(tasks)
        if trial is None:
            cores = threads or available_cores()
            trial = PlanTrial(cores, len(tasks), ScheduleConfig(plan="turns"))
        yield from prepare_scheduled(tasks, preprocess, limits, batch, trial, set_model_threads)
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


def prepare_scheduled(tasks: list[PrepareTask], preprocess: ImagePreprocess, limits: ImageLimits, batch: int,
                      trial: PlanTrial, set_model_threads: Callable[[int], None] | None = None,
                      clock: Callable[[], float] = time.perf_counter) -> Iterator[Prepared]:
    """Prepare `batch` tasks at a time on pools of threads (Pillow and hashlib release the GIL while they
    decode, resize and hash), each batch as `trial.next_plan()` says: in turns (the batch is decoded when
    the caller asks for it) or ahead (the next batch is submitted before this one is handed over, so it
    decodes while the caller runs the model). Before a batch is handed over, `set_model_threads` gets the
    plan's model threads; the batch's wall time (until the caller asks for the next one), decode wait and
    decode CPU time go back to `trial`. Results come in task order whatever the plans.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(task: PrepareTask) -> tuple[Prepared, float]:
        started = time.thread_time()
        out = prepare(task, preprocess, limits)
        return out, time.thread_time() - started

    pools: dict[int, ThreadPoolExecutor] = {}

    def submit(plan: DecodePlan, batch_tasks: list[PrepareTask]) -> list:
        if plan.decode_threads not in pools:
            pools[plan.decode_threads] = ThreadPoolExecutor(plan.decode_threads, thread_name_prefix="radlens-decode")
        return [pools[plan.decode_threads].submit(one, t) for t in batch_tasks]

    batches = [tasks[start : start + batch] for start in range(0, len(tasks), batch)]
    ahead: list | None = None  # futures of the next batch, when it was submitted early
    threads_now = None
    try:
        for n, batch_tasks in enumerate(batches):
            plan = trial.next_plan()
            started = clock()
            results = [f.result() for f in (ahead if ahead is not None else submit(plan, batch_tasks))]
            decoded = clock()
            ahead = submit(plan, batches[n + 1]) if plan.ahead and n + 1 < len(batches) else None
            if set_model_threads is not None and plan.model_threads != threads_now:
                set_model_threads(plan.model_threads)
                threads_now = plan.model_threads
            for prepared, _ in results:
                yield prepared
            trial.record(plan, clock() - started, len(batch_tasks), decoded - started,
                         sum(cpu for _, cpu in results))
    finally:
        for pool in pools.values():
            pool.shutdown(wait=True, cancel_futures=True)


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
