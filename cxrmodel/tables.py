"""Tabular inputs (CSV and JSONL manifests, pairs files): rows with line numbers, never a traceback."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from cxrmodel.errors import DataError

ERROR_KEY = "__error__"


def read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a CSV or JSONL file; keys lower-cased; a bad JSON line yields {ERROR_KEY: reason}."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames:
                    raise DataError(f"{path}: empty CSV (no header row)")
                yield from _csv_rows(reader)
        else:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        yield number, {ERROR_KEY: f"invalid JSON ({exc.msg})"}
                        continue
                    if not isinstance(row, dict):
                        yield number, {ERROR_KEY: "line is not a JSON object"}
                        continue
                    yield number, {str(k).strip().lower(): "" if v is None else v for k, v in row.items()}
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _csv_rows(reader: csv.DictReader) -> Iterator[tuple[int, dict]]:
    """Rows of a CSV; a row the parser rejects (e.g. a field over csv's 128 KiB limit) becomes one
    {ERROR_KEY: reason} row and the file goes on, so good rows are never lost to one bad one."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num + 1, {ERROR_KEY: f"malformed CSV row ({exc})"}  # the line being parsed
            continue
        yield reader.line_num, {(k or "").strip().lower(): (v or "") for k, v in row.items()}


def find_column(columns: Iterable[str], candidates: Iterable[str]) -> str | None:
    """The first of `candidates` present in `columns`."""
    columns = set(columns)
    return next((c for c in candidates if c in columns), None)
