"""The error types RadLens raises for problems a user can fix.

Every entry point catches `RadLensError` and prints its message on one line, so a
corrupt image or a missing model never shows a traceback.
"""


class RadLensError(Exception):
    """Base class for errors whose message is meant for the user."""


class ImageDecodeError(RadLensError):
    """The bytes or file given are not a readable image (or are too large)."""


class ModelLoadError(RadLensError):
    """A checkpoint, processor or adapter could not be loaded."""


class DataError(RadLensError):
    """A manifest, pairs file or data directory is unusable."""
