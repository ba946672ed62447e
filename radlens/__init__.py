"""RadLens: semantic search for medical images (command-line entry point lives in `radlens.cli`)."""

__version__ = "0.1.0"
