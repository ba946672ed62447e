"""The error types RadLens raises for problems a user can fix.

Every entry point catches `RadLensError` and prints its message on one line, so a
corrupt image or a missing model never shows a traceback.
"""


class RadLensError(Exception):
    """Base class for errors whose message is meant for the user."""


class ImageDecodeError(RadLensError):
    """The bytes or file given are not a readable image (or are too large)."""


class ImageTooLargeError(ImageDecodeError):
    """An image over a size limit (bytes, pixels): refused before it is decoded."""


class UnsupportedImageError(ImageDecodeError):
    """Bytes in no image format RadLens reads."""


class ModelLoadError(RadLensError):
    """A checkpoint, processor or adapter could not be loaded."""


class DataError(RadLensError):
    """A manifest, pairs file or data directory is unusable."""


class NotFoundError(DataError):
    """A thing asked for by name or id (an image id, a file) does not exist."""
