"""Bounded work per request: endpoints that decode or label a whole image run a few at a time.

A 9400 x 9400 upload decodes to 88-265 MB; eight at once would take a server past its memory. A
heavy request waits up to `ServeConfig.heavy_wait_seconds` for one of `ServeConfig.heavy_requests`
slots (per server process), then gets 503 with Retry-After instead of queueing without bound.
The upload itself is read only once a slot is held (werkzeug spools large bodies to disk).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading

from flask import current_app

from . import HTTPError

SLOTS_KEY = "radlens_heavy_slots"
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
log = logging.getLogger(__name__)


def return_large_buffers_to_the_os(threshold: int = 4 << 20) -> bool:
    """Make glibc serve allocations of `threshold` bytes and more from mmap, so they go back to the OS
    when freed (a server process calls this once, at start).

    glibc raises its mmap threshold after each large free, so later image buffers come from per-thread
    arenas that keep them: measured (bench/upload_memory.py) 8 concurrent 9400 x 9400 uploads left a
    server at 2.5 GB RSS with 2 heavy slots, 1.35 GB peak and 0.64 GB after with this. False (and no
    change) where the C library is not glibc.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        log.info("not glibc: large buffers are returned to the OS as this C library does")
        return False


def install(app, slots: int) -> None:
    """Give `app` its pool of heavy-request slots."""
    app.extensions[SLOTS_KEY] = threading.BoundedSemaphore(max(1, slots))


def heavy(view):
    """Run `view` holding a heavy-request slot; 503 + Retry-After when none frees in time."""
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        config = current_app.extensions["radlens_config"]
        slots = current_app.extensions[SLOTS_KEY]
        if not slots.acquire(timeout=config.heavy_wait_seconds):
            raise HTTPError(503, f"the server is busy with {config.heavy_requests} large image requests; "
                                 "try again in a few seconds", headers={"Retry-After": str(config.retry_after_seconds)})
        try:
            return view(*args, **kwargs)
        finally:
            slots.release()
    return wrapper
