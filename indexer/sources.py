"""Reader stage: folders and manifest files -> `SourceRecord`s (a path plus optional metadata).

Folders are walked recursively for image and DICOM files. Manifests are CSV or JSONL with a
path column (``path``, ``file``, ``file_name``, ``filename``, ``image`` or ``image_path``; relative
paths resolve against the manifest's folder) and optional metadata columns.
"""

from __future__ import annotations

import errno
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
    """A manifest row (`line` set) or a found file (`line` None) that could not be used."""

    source: str
    line: int | None
    reason: str

    @property
    def key(self) -> str:
        """The skipped table's key: `manifest:line`, or the file's path."""
        return self.source if self.line is None else f"{self.source}:{self.line}"


def printable(path: Path | str) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 shown as \\xNN (a name can hold any bytes)."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _resolved(path: Path) -> tuple[Path | None, str | None]:
    """(the absolute path behind `path`, None), or (None, why it cannot be used)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return None, "file name is not valid UTF-8; rename the file to index it"
    try:
        return path.resolve(strict=True), None
    except RuntimeError:  # Python < 3.13: a symbolic-link loop
        return None, "symbolic link loop"
    except OSError as exc:
        return None, "symbolic link loop" if exc.errno == errno.ELOOP else f"cannot follow the path ({exc.strerror})"


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(DICOM_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def walk_folder(folder: Path, problems: list[ManifestProblem] | None = None) -> Iterator[SourceRecord]:
    """Image/DICOM files under `folder`, recursively, in sorted order (hidden entries skipped); files that
    cannot be used (a symbolic-link loop, a name that is not UTF-8) go to `problems`, and the walk goes on."""
    problems = problems if problems is not None else []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            if is_image_path(path) or ("." not in name and _has_dicom_preamble(path)):
                resolved, reason = _resolved(path)
                if reason:
                    problems.append(ManifestProblem(printable(path), None, reason))
                    continue
                yield SourceRecord(resolved)


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
        if file_path.is_symlink():
            resolved, reason = _resolved(file_path)
            if reason:
                problems.append(ManifestProblem(str(path), line, f"{value}: {reason}"))
                continue
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
            records = walk_folder(src, problems)
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
