"""RadLens: semantic search for medical images (command-line entry point lives in `radlens.cli`)."""

from cxrmodel.constants import VERSION as __version__  # noqa: F401 -- the one version source
