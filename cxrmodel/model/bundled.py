"""The models that ship inside the package (no download): `radlens-mini`."""

from __future__ import annotations

from pathlib import Path

from cxrmodel.errors import ModelLoadError

MINI = "radlens-mini"
ASSETS = Path(__file__).resolve().parents[1] / "assets"  # cxrmodel/assets


def bundled_model_dir(name: str = MINI) -> Path:
    """Directory of a bundled model; ModelLoadError when this installation lacks it."""
    path = ASSETS / name
    if not (path / "radlens_model.json").exists():
        raise ModelLoadError(f"the bundled model {name!r} is missing from this installation ({path})")
    return path


def resolve_alias(name: str) -> str:
    """Map a bundled model's name to its directory; any other name is returned unchanged."""
    return str(bundled_model_dir(name)) if name == MINI else name
