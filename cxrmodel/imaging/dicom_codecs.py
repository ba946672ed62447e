"""A fast decoder for the compressed grey films archives hold most: JPEG Lossless (Process 14, and its Selection
Value 1) and 12-bit JPEG Extended, decoded by libjpeg-turbo 3 through imagecodecs and handed to pydicom as one of its
decoding plugins, so pydicom still does everything after the codestream (frames, dtype, sign, unused bits).

GDCM, pydicom's plugin for these, takes ~290 ms per 3000 x 2500 JPEG Lossless film here, most of it copying the
result through Python strings, and refuses 12-bit JPEG Extended; libjpeg-turbo takes ~50 ms, with the GIL released
(`python -m bench.dicom_decode`). Colour images stay with pydicom's own plugins (Pillow, GDCM).
"""

from __future__ import annotations

import importlib.util
import threading

import numpy as np
from pydicom import uid as uids  # imported only where a DICOM is decoded (`decode.stored_values`)

PLUGIN = "radlens-libjpeg-turbo"
DECODER_DEPENDENCIES = {uid: ("imagecodecs>=2024.1.1",)
                        for uid in (uids.JPEGLossless, uids.JPEGLosslessSV1, uids.JPEGExtended12Bit)}
_registering = threading.Lock()  # pydicom's add_plugin is not thread-safe; decoding runs on threads


def is_available(uid: str) -> bool:
    """pydicom's plugin interface: whether this plugin can decode pixel data of transfer syntax `uid`."""
    return uid in DECODER_DEPENDENCIES and importlib.util.find_spec("imagecodecs") is not None


def decode_frame(src: bytes, runner) -> bytes:
    """pydicom's plugin interface: one grey frame's codestream to its samples, in the file's Bits Allocated."""
    import imagecodecs

    if runner.samples_per_pixel != 1:
        raise NotImplementedError("colour JPEG is left to pydicom's other plugins")
    dtype = {8: np.uint8, 16: np.uint16}.get(runner.bits_allocated)
    if dtype is None:
        raise NotImplementedError(f"{runner.bits_allocated} bits allocated")
    # Decoded into the header's size, which the pixel limit has checked: a codestream claiming more is refused
    # before anything is allocated for it (ValueError), never decoded into a buffer of its own choosing.
    out = np.empty((runner.rows, runner.columns), dtype=np.uint8 if runner.bits_stored <= 8 else np.uint16)
    samples = imagecodecs.jpeg8_decode(src, out=out)
    return np.ascontiguousarray(samples, dtype=dtype).tobytes()


def preferred_plugin(transfer_syntax: str, samples_per_pixel: int) -> str:
    """The decoding plugin to ask pydicom for first ("" for pydicom's own order): this one for a grey film in
    a syntax it decodes, registered with pydicom on first use."""
    from pydicom.pixels.decoders import JPEGExtended12BitDecoder, JPEGLosslessDecoder, JPEGLosslessSV1Decoder

    if samples_per_pixel != 1 or not is_available(str(transfer_syntax)):
        return ""
    with _registering:
        for decoder in (JPEGLosslessDecoder, JPEGLosslessSV1Decoder, JPEGExtended12BitDecoder):
            if PLUGIN not in decoder.available_plugins:
                decoder.add_plugin(PLUGIN, (__name__, "decode_frame"))
    return PLUGIN
