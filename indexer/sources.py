"""Reader stage: folders and manifest files -> `SourceRecord`s (a path plus optional metadata).

Folders are walked recursively for image and DICOM files. Manifests are CSV or JSONL with a
path column (``path``, ``file``, ``file_name``, ``filename``, ``image`` or ``image_path``; relative
paths resolve against the manifest's folder) and optional metadata columns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cxrmodel.errors import DataError
from cxrmodel.imaging.decode import DICOM_MAGIC_OFFSET, is_image_path
from cxrmodel.tables import ERROR_KEY, find_column, read_rows

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".ndjson")
PATH_COLUMNS = ("path", "file", "file_name", "filename", "image", "image_path", "name")
# manifest column -> ImageRow field
METADATA_COLUMNS = {
    "caption": "caption", "modality": "modality", "body_part": "body_part", "anatomy": "body_part",
    "bodypart": "body_part", "view": "view", "view_position": "view", "labels": "labels",
    "finding_labels": "labels", "source": "source", "source_repo": "source",
    "study_description": "study_description", "indication": "indication", "age": "age", "sex": "sex",
    "study_date": "study_date", "date": "study_date", "patient_id": "patient_key", "patient": "patient_key",
    "patient_key": "patient_key",
}


@dataclass(frozen=True)
class SourceRecord:
    """One file to index, with metadata from its manifest row (if any)."""

    path: Path
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class ManifestProblem:
    """A manifest row that could not be used."""

    source: str
    line: int
    reason: str


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(DICOM_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def walk_folder(folder: Path) -> Iterator[SourceRecord]:
    """Image/DICOM files under `folder`, recursively, in sorted order (hidden entries skipped)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            if is_image_path(path) or ("." not in name and _has_dicom_preamble(path)):
                yield SourceRecord(path.resolve())


def read_manifest(path: Path, problems: list[ManifestProblem]) -> Iterator[SourceRecord]:
    """Records of a manifest; rows without a usable path are appended to `problems`."""
    base = path.parent
    path_col = None
    for line, row in read_rows(path):
        if ERROR_KEY in row:
            problems.append(ManifestProblem(str(path), line, row[ERROR_KEY]))
            continue
        path_col = path_col or find_column(row, PATH_COLUMNS)
        if path_col is None:
            raise DataError(f"{path}: no path column (expected one of: {', '.join(PATH_COLUMNS)})")
        value = str(row.get(path_col, "")).strip()
        if not value:
            problems.append(ManifestProblem(str(path), line, f"empty {path_col!r}"))
            continue
        file_path = Path(value) if Path(value).is_absolute() else base / value
        meta = {}
        for column, field_name in METADATA_COLUMNS.items():
            cell = row.get(column)
            if isinstance(cell, list):
                cell = ";".join(str(c) for c in cell)
            if cell not in (None, "") and field_name not in meta:
                meta[field_name] = str(cell).strip()
        yield SourceRecord(file_path.resolve(), meta)


def collect(sources: Iterable[str | Path], problems: list[ManifestProblem] | None = None,
            exclude: Path | None = None) -> list[SourceRecord]:
    """All records from folders and manifests, de-duplicated by path (first one wins); files under
    `exclude` (the data dir, with its cached thumbnails) are left out."""
    problems = problems if problems is not None else []
    exclude = exclude.resolve() if exclude is not None else None
    seen: dict[Path, SourceRecord] = {}
    for src in sources:
        src = Path(src)
        if src.is_dir():
            records = walk_folder(src)
        elif src.is_file() and src.suffix.lower() in MANIFEST_EXTENSIONS:
            records = read_manifest(src, problems)
        elif src.is_file() and is_image_path(src):
            records = iter([SourceRecord(src.resolve())])
        elif src.exists():
            raise DataError(f"{src}: not a folder, an image or a manifest (.csv, .jsonl)")
        else:
            raise DataError(f"{src}: no such file or folder")
        for record in records:
            if exclude is not None and record.path.is_relative_to(exclude):
                continue
            if record.path not in seen or record.metadata and not seen[record.path].metadata:
                seen[record.path] = record
    return list(seen.values())
