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

from .dicomweb import is_dicomweb, locator_problem

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

    path: str  # absolute, symbolic links resolved (a str: a million rows of Path objects cost seconds)
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


def walk_folder(folder: Path) -> Iterator[SourceRecord | ManifestProblem]:
    """Image/DICOM files under `folder`, recursively, in sorted order (hidden entries skipped); files that
    cannot be used (a symbolic-link loop, a name that is not UTF-8) come as problems, and the walk goes on."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            if is_image_path(path) or ("." not in name and _has_dicom_preamble(path)):
                resolved, reason = _resolved(path)
                yield ManifestProblem(printable(path), None, reason) if reason else SourceRecord(str(resolved))


class _ResolvedDirs:
    """Resolved folders by their path as written: a manifest's rows share a few folders, so resolving each
    row's folder once and lstat-ing only the file costs one system call per row, not one per component."""

    def __init__(self, limit: int = 65_536):
        self.limit = limit
        self.cache: dict[str, str] = {}

    def file_path(self, path: str) -> str:
        folder, name = os.path.split(path)
        real = self.cache.get(folder)
        if real is None:
            if len(self.cache) >= self.limit:
                self.cache.clear()  # bounded memory for manifests spread over very many folders
            real = self.cache[folder] = os.path.realpath(folder)
        return os.path.join(real, name)


def manifest_path_column(path: Path) -> str:
    """The manifest's path column, from its first well-formed row (DataError when there is none)."""
    for _, row in read_rows(path):
        if ERROR_KEY not in row:
            column = find_column(row, PATH_COLUMNS)
            if column is None:
                raise DataError(f"{path}: no path column (expected one of: {', '.join(PATH_COLUMNS)})")
            return column
    return PATH_COLUMNS[0]  # no usable row at all: every row is reported as a problem


def read_manifest(path: Path) -> Iterator[SourceRecord | ManifestProblem]:
    """Records of a manifest, read as a stream; rows without a usable path come as problems."""
    base = str(path.parent)
    path_col = manifest_path_column(path)
    dirs = _ResolvedDirs()
    for line, row in read_rows(path):
        if ERROR_KEY in row:
            yield ManifestProblem(str(path), line, row[ERROR_KEY])
            continue
        value = str(row.get(path_col, "")).strip()
        if not value or "\0" in value:
            yield ManifestProblem(str(path), line, f"empty {path_col!r}" if not value else "path holds a NUL byte")
            continue
        if is_dicomweb(value):  # one archived instance, by its locator (indexer.dicomweb)
            reason = locator_problem(value)
            yield ManifestProblem(str(path), line, reason) if reason else SourceRecord(value, _row_metadata(row))
            continue
        file_path = os.path.abspath(os.path.join(base, value))  # an absolute value stays as it is
        if os.path.islink(file_path):
            resolved, reason = _resolved(Path(file_path))
            if reason:
                yield ManifestProblem(str(path), line, f"{value}: {reason}")
                continue
            file_path = str(resolved)
        else:
            file_path = dirs.file_path(file_path)
        yield SourceRecord(file_path, _row_metadata(row))


def _row_metadata(row: dict) -> dict[str, str]:
    meta = {}
    for column, field_name in METADATA_COLUMNS.items():
        cell = row.get(column)
        if isinstance(cell, list):
            cell = ";".join(str(c) for c in cell)
        if cell not in (None, "") and field_name not in meta:
            meta[field_name] = str(cell).strip()
    return meta


def check_sources(sources: Iterable[str | Path]) -> list[Path | str]:
    """The sources, checked before anything is written: each must be a folder, an image, a manifest with
    a path column or a reachable DICOMweb archive (`indexer.dicomweb`; DataError otherwise). Manifests
    come first, so their metadata wins over a folder's bare listing of the same file."""
    from .dicomweb import check_source

    checked: list[Path | str] = []
    remote = [str(s) for s in sources if is_dicomweb(str(s))]
    for url in remote:
        check_source(url)
    for src in (Path(s) for s in sources if not is_dicomweb(str(s))):
        if src.is_file() and src.suffix.lower() in MANIFEST_EXTENSIONS:
            manifest_path_column(src)
        elif not src.is_dir() and not (src.is_file() and is_image_path(src)):
            raise DataError(f"{src}: not a folder, an image or a manifest (.csv, .jsonl)" if src.exists()
                            else f"{src}: no such file or folder")
        checked.append(src)
    manifests_first = sorted(checked, key=lambda p: not (p.is_file() and p.suffix.lower() in MANIFEST_EXTENSIONS))
    return manifests_first + remote


def iter_sources(sources: Iterable[str | Path], exclude: Path | None = None
                 ) -> Iterator[SourceRecord | ManifestProblem]:
    """Records (and the problems met on the way) from folders and manifests, as a stream, de-duplicated
    by path (the first wins; manifests are read first); files under `exclude` (the data dir, with its
    cached thumbnails) are left out. Memory: one machine word per path seen (its hash), not the records."""
    inside = str(exclude.resolve()) + os.sep if exclude is not None else None
    seen: set[int] = set()
    from .dicomweb import list_locators

    for src in check_sources(sources):
        if isinstance(src, str):
            items = (SourceRecord(locator) for locator in list_locators(src))
        elif src.is_dir():
            items = walk_folder(src)
        elif src.suffix.lower() in MANIFEST_EXTENSIONS:
            items = read_manifest(src)
        else:
            items = iter([SourceRecord(str(src.resolve()))])
        for item in items:
            if isinstance(item, ManifestProblem):
                yield item
                continue
            if inside is not None and (item.path + os.sep).startswith(inside):
                continue
            key = hash(item.path)
            if key not in seen:
                seen.add(key)
                yield item


def collect(sources: Iterable[str | Path], problems: list[ManifestProblem] | None = None,
            exclude: Path | None = None) -> list[SourceRecord]:
    """All records of `iter_sources` as a list, problems appended to `problems` (small jobs and tests)."""
    problems = problems if problems is not None else []
    records = []
    for item in iter_sources(sources, exclude):
        (problems if isinstance(item, ManifestProblem) else records).append(item)
    return records
