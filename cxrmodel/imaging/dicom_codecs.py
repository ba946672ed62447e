"""A fast decoder for the compressed grey films archives hold: JPEG Lossless (Process 14, and its Selection Value 1)
and 12-bit JPEG Extended through libjpeg-turbo 3, JPEG-LS through CharLS, both in imagecodecs, handed to pydicom as
one of its decoding plugins, so pydicom still does everything after the codestream (frames, dtype, sign, unused
bits).

GDCM, pydicom's plugin for these, takes ~190-300 ms per 3000 x 2500 JPEG Lossless film here, most of it copying the
result through Python strings, gets slower on two threads, and refuses 12-bit JPEG Extended; libjpeg-turbo takes
~50-60 ms with the GIL released (`python -m bench.dicom_decode`). JPEG-LS: ~320 ms against ~170, 83 on two threads.
Colour images, JPEG 2000 and RLE stay with pydicom's own plugins (Pillow, GDCM).
"""

from __future__ import annotations

import importlib.util
import threading

import numpy as np
from pydicom import uid as uids  # imported only where a DICOM is decoded (`decode.stored_values`)

PLUGIN = "radlens-imagecodecs"
_JPEG = (uids.JPEGLossless, uids.JPEGLosslessSV1, uids.JPEGExtended12Bit)
_JPEG_LS = (uids.JPEGLSLossless, uids.JPEGLSNearLossless)
DECODER_DEPENDENCIES = {uid: ("imagecodecs>=2024.1.1",) for uid in _JPEG + _JPEG_LS}
_registering = threading.Lock()  # pydicom's add_plugin is not thread-safe; decoding runs on threads


def is_available(uid: str) -> bool:
    """pydicom's plugin interface: whether this plugin can decode pixel data of transfer syntax `uid`."""
    return uid in DECODER_DEPENDENCIES and importlib.util.find_spec("imagecodecs") is not None


def decode_frame(src: bytes, runner) -> bytes:
    """pydicom's plugin interface: one grey frame's codestream to its samples, in the file's Bits Allocated."""
    import imagecodecs

    if runner.samples_per_pixel != 1:
        raise NotImplementedError("colour is left to pydicom's other plugins")
    dtype = {8: np.uint8, 16: np.uint16}.get(runner.bits_allocated)
    if dtype is None:
        raise NotImplementedError(f"{runner.bits_allocated} bits allocated")
    jpeg_ls = runner.transfer_syntax in _JPEG_LS
    precision = runner.get_option("jls_precision", runner.bits_stored) if jpeg_ls else runner.bits_stored
    # Decoded into the header's size, which the pixel limit has checked: a codestream claiming more is refused
    # before anything is allocated for it (ValueError), never decoded into a buffer of its own choosing.
    out = np.empty((runner.rows, runner.columns), dtype=np.uint8 if precision <= 8 else np.uint16)
    samples = (imagecodecs.jpegls_decode if jpeg_ls else imagecodecs.jpeg8_decode)(src, out=out)
    return np.ascontiguousarray(samples, dtype=dtype).tobytes()


def preferred_plugin(transfer_syntax: str, samples_per_pixel: int) -> str:
    """The decoding plugin to ask pydicom for first ("" for pydicom's own order): this one for a grey film in
    a syntax it decodes, registered with pydicom on first use."""
    from pydicom.pixels.decoders import (
        JPEGExtended12BitDecoder,
        JPEGLosslessDecoder,
        JPEGLosslessSV1Decoder,
        JPEGLSLosslessDecoder,
        JPEGLSNearLosslessDecoder,
    )

    if samples_per_pixel != 1 or not is_available(str(transfer_syntax)):
        return ""
    with _registering:
        for decoder in (JPEGLosslessDecoder, JPEGLosslessSV1Decoder, JPEGExtended12BitDecoder, JPEGLSLosslessDecoder,
                        JPEGLSNearLosslessDecoder):
            if PLUGIN not in decoder.available_plugins:
                decoder.add_plugin(PLUGIN, (__name__, "decode_frame"))
    return PLUGIN
