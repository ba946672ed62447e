"""Grey levels to 8 bits: a pointwise map (a DICOM modality LUT and window) and the min..max scaling after it,
computed once per stored value of an integer image and looked up, instead of once per pixel.

A 2500 x 3000 film holds a few thousand distinct stored values among 7.5 million pixels: the float64 chain run
per pixel costs tens of milliseconds of one core, the lookup a fraction (`python -m bench.dicom_decode`). The
result is the same, bit for bit: each value goes through the same elementwise operations, and the min..max
the scaling uses is taken over the values the image holds (`tests/test_levels.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MAX_TABLE = 1 << 20  # the widest range of stored values looked up (a table of this many entries)


def scale_to_uint8(pixels: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linearly map an array's min..max (or `lo`..`hi`) onto 0..255 (a flat array becomes all zeros)."""
    pixels = np.asarray(pixels, dtype=np.float64)
    if lo is None or hi is None:
        lo, hi = float(np.min(pixels)), float(np.max(pixels))
        if not np.isfinite(lo) or not np.isfinite(hi):
            pixels = np.nan_to_num(pixels, nan=0.0, posinf=0.0, neginf=0.0)
            lo, hi = float(np.min(pixels)), float(np.max(pixels))
    if hi <= lo:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def map_to_uint8(arr: np.ndarray, to_levels: Callable[[np.ndarray], np.ndarray] | None = None, scale: bool = True,
                 invert: bool = False) -> np.ndarray:
    """`to_levels(arr)` (an elementwise map; None: the values themselves), then with `scale` its min..max over
    the image onto 0..255, without it the map's own uint8 result; `invert`: 255 minus that. Per distinct stored
    value for an integer image whose range of values is small beside its size, else per pixel: the same result."""
    to_levels = to_levels or (lambda values: values)
    if arr.dtype.kind in "iu" and arr.size:
        least, most = int(arr.min()), int(arr.max())
        lo = 0 if arr.dtype.kind == "u" and least < most - least else least  # from 0: the image is the index
        if most - lo < min(MAX_TABLE, arr.size // 4):
            by_value = _map_by_value(arr, to_levels, scale, invert, lo, (least, most))
            if by_value is not None:
                return by_value
    return _finish(to_levels(arr), scale, invert)


def _finish(levels: np.ndarray, scale: bool, invert: bool) -> np.ndarray:
    out = scale_to_uint8(levels) if scale else np.asarray(levels, dtype=np.uint8)
    return 255 - out if invert else out


def _map_by_value(arr: np.ndarray, to_levels: Callable[[np.ndarray], np.ndarray], scale: bool, invert: bool,
                  lo: int, extremes: tuple[int, int]) -> np.ndarray | None:
    """The lookup for stored values lo..max (`extremes`: the image's min and max); None where it cannot match
    the per-pixel map (non-finite levels)."""
    index = arr if lo == 0 else np.subtract(arr, lo, dtype=np.int32)  # < MAX_TABLE: fits, half the memory
    levels = to_levels(np.arange(lo, extremes[1] + 1).astype(arr.dtype))
    if not scale:
        table = np.asarray(levels, dtype=np.uint8)
    else:
        levels = np.asarray(levels, dtype=np.float64)
        if not np.isfinite(levels).all():
            return None
        held = np.zeros(len(levels), dtype=bool)
        held[[extremes[0] - lo, extremes[1] - lo]] = True  # the image's own extremes
        steps = np.diff(levels)
        if not ((steps >= 0).all() or (steps <= 0).all()):  # a map that turns: find every value held
            held = np.bincount(index.ravel(), minlength=len(levels)) > 0
        low, high = float(levels[held].min()), float(levels[held].max())
        table = np.zeros(len(levels), dtype=np.uint8)
        if high > low:  # values the image does not hold may fall outside 0..255: never looked up, clipped
            table = np.clip(np.round((levels - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    if invert:
        table = 255 - table
    return lookup(table, index)


def lookup(table: np.ndarray, index: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """`table[index]`, a chunk at a time: numpy widens every index to 64 bits first, and a chunk's worth stays
    in cache (6 ms instead of 12 for a 2500 x 3000 film here)."""
    flat = index.ravel()
    out = np.empty(flat.size, dtype=table.dtype)
    for start in range(0, flat.size, chunk):
        np.take(table, flat[start : start + chunk], out=out[start : start + chunk])
    return out.reshape(index.shape)
