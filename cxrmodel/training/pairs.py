"""Image-caption pairs files (CSV or JSONL, ROCO's id/name/caption layout included).

Bad rows -- no image path, a missing image file, an empty caption, a broken JSON line -- are
reported with their line numbers, skipped and counted; only a file with no usable row is fatal.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cxrmodel.errors import DataError
from cxrmodel.labels.applicability import stated_view
from cxrmodel.tables import ERROR_KEY, find_column, read_rows

IMAGE_COLUMNS = ("path", "image", "image_path", "file", "file_name", "filename", "file name", "name")
CAPTION_COLUMNS = ("caption", "text", "report", "findings", "impression")
LABEL_COLUMNS = ("labels", "finding_labels", "finding labels")
GROUP_COLUMNS = ("patient_id", "patient", "group", "study_id")


@dataclass(frozen=True)
class Pair:
    """One image with its caption, optional `;`-separated labels and a group (e.g. patient) id."""

    image: Path
    caption: str
    labels: tuple[str, ...] = ()
    group: str | None = None
    line: int = 0
    composed: bool = False  # caption built from structured columns by a template, not written by a person


@dataclass
class PairsFile:
    """Usable pairs and the rows that were skipped (line, reason)."""

    rows: list[Pair]
    skipped: list[dict] = field(default_factory=list)


class _Blank(dict):
    def __missing__(self, key):
        return ""


def view_class(view: str) -> str:
    """'frontal' for a PA or AP view, 'lateral' for a lateral one, '' otherwise (any spelling
    `stated_view` knows: DICOM's LL/RL, a manifest's "AP supine", ...)."""
    return {"PA": "frontal", "AP": "frontal", "lateral": "lateral"}.get(stated_view({"view": view}) or "", "")


def compose_caption(template: str, row: dict) -> str:
    """Fill `template` ({modality}, {view}, {anatomy}, {labels}, any column) from a row and tidy it.

    `{view_class}` is derived from the view column unless the row has its own: "frontal" (PA, AP) or
    "lateral", so a caption can name the projection both ways radiologists do ("frontal PA X-ray").
    Missing or empty fields vanish with their surrounding punctuation; a word repeated by two fields
    ("lateral lateral") is written once; label lists read as prose.
    """
    values = _Blank(view_class=view_class(str(row.get("view") or "")))
    for key, value in row.items():
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        text = str(value).strip().replace("_", " ")
        if key in LABEL_COLUMNS:
            text = ", ".join(t.strip().lower() for t in re.split(r"[;|]", text) if t.strip())
        values[key] = text
    try:
        text = string.Formatter().vformat(template, (), values)
    except (ValueError, IndexError) as exc:
        raise DataError(f"bad --caption-template {template!r}: {exc}") from None
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\b(\w+) \1\b", r"\1", text, flags=re.IGNORECASE)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r"([,;:])(?=[,.;:])", "", text)
    text = re.sub(r"^[\s,.;:]+|[\s,;:]+$", "", text)
    return text.strip()


@dataclass(frozen=True)
class _Columns:
    """Which column of a pairs file holds what (found on its first good row)."""

    image: str
    caption: str | None
    labels: str | None
    group: str | None

    @classmethod
    def find(cls, path: Path, row: dict, caption_template: str | None) -> _Columns:
        image, caption = find_column(row, IMAGE_COLUMNS), find_column(row, CAPTION_COLUMNS)
        if image is None or (caption is None and caption_template is None):
            raise DataError(f"{path}: needs an image column ({', '.join(IMAGE_COLUMNS)}) and a caption "
                            f"column ({', '.join(CAPTION_COLUMNS)}); found {', '.join(sorted(row)) or 'none'}")
        return cls(image, caption, find_column(row, LABEL_COLUMNS), find_column(row, GROUP_COLUMNS))


def _check_pairs_source(path: Path, images: str | Path | None) -> Path:
    """The folder image paths resolve against; DataError for a missing or unsupported file."""
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist")
    if path.suffix.lower() not in (".csv", ".jsonl", ".ndjson", ".json"):
        raise DataError(f"pairs file {path}: expected .csv or .jsonl")
    base = Path(images) if images else path.parent
    if images and not base.is_dir():
        raise DataError(f"--images {base} is not a folder")
    return base


def _row_pairs(row: dict, line: int, cols: _Columns, base: Path, caption_template: str | None
               ) -> tuple[list[Pair], str | None]:
    """The pairs of one row (composed caption first), or ([], the reason it is skipped)."""
    value = str(row.get(cols.image, "")).strip()
    caption = str(row.get(cols.caption, "")).strip() if cols.caption else ""
    composed = compose_caption(caption_template, row) if caption_template else ""
    if not value:
        return [], f"empty {cols.image!r}"
    if not caption and not composed:
        return [], "empty caption"
    image = Path(value) if Path(value).is_absolute() else base / value
    if not image.is_file():
        return [], f"image not found: {value}"
    labels = row.get(cols.labels, "") if cols.labels else ""
    labels = labels if isinstance(labels, list) else str(labels).replace("|", ";").split(";")
    group = str(row.get(cols.group, "")).strip() or None if cols.group else None
    labels = tuple(str(s).strip() for s in labels if str(s).strip())
    pairs = [Pair(image, composed, labels, group, line, composed=True)] if composed else []
    return pairs + ([Pair(image, caption, labels, group, line)] if caption else []), None


def load_pairs(path: str | Path, images: str | Path | None = None,
               log: Callable[[str], None] | None = None, max_report: int = 20,
               caption_template: str | None = None) -> PairsFile:
    """Read a pairs file; image paths resolve against `images` (default: the file's folder).

    With `caption_template`, every row also yields a pair whose caption is composed from its
    structured columns (`Pair.composed`); rows with a written caption keep that pair too.
    """
    path = Path(path)
    base = _check_pairs_source(path, images)
    rows, skipped = [], []
    cols = None
    for line, row in read_rows(path):
        if ERROR_KEY in row:
            skipped.append({"line": line, "reason": row[ERROR_KEY]})
            continue
        cols = cols or _Columns.find(path, row, caption_template)
        pairs, reason = _row_pairs(row, line, cols, base, caption_template)
        if reason:
            skipped.append({"line": line, "reason": reason})
        rows += pairs
    if log:
        for problem in skipped[:max_report]:
            log(f"{path.name}:{problem['line']}: skipped ({problem['reason']})")
        if len(skipped) > max_report:
            log(f"... and {len(skipped) - max_report} more skipped rows")
    if not rows:
        raise DataError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return PairsFile(rows, skipped)


def split_pairs(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Train/validation split; pairs sharing a group (patient) never land on both sides."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError("--val-fraction must be in [0, 1)")
    # a row's pairs (written + composed caption) share its line, so they stay on one side
    groups = sorted({p.group if p.group is not None else f"__line{p.line}" for p in pairs})
    random.Random(seed).shuffle(groups)
    n_val = int(round(len(groups) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(groups) > 1:
        n_val = 1
    val_groups = set(groups[:n_val])
    key = lambda p: p.group if p.group is not None else f"__line{p.line}"  # noqa: E731
    return [p for p in pairs if key(p) not in val_groups], [p for p in pairs if key(p) in val_groups]
