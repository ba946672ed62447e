"""Query filters: metadata equality and pathology-score bounds, parsed from `key=value` strings.

Filter values only ever reach SQL as bound parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Select, and_, func, select
from sqlalchemy.orm import aliased

from cxrmodel.errors import DataError
from indexer.store import ImageRow, ScoreRow

METADATA_FILTERS = ("modality", "body_part", "view", "source", "format")
_OPS = {">=": "__ge__", "<=": "__le__", ">": "__gt__", "<": "__lt__", "=": "__ge__"}
FILTER_PATTERN = r"^\s*([A-Za-z_][A-Za-z0-9_ \-]*?)\s*(>=|<=|>|<|=)\s*(.*?)\s*$"  # also the API contract's
_EXPR = re.compile(FILTER_PATTERN)


@dataclass(frozen=True)
class ScoreBound:
    """`probability <op> value` for one pathology."""

    pathology: str
    op: str
    value: float


@dataclass(frozen=True)
class Filters:
    """All conditions of one query (empty: no filtering)."""

    metadata: tuple[tuple[str, str], ...] = ()
    scores: tuple[ScoreBound, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.metadata or self.scores)

    def cache_key(self) -> tuple:
        """The same key for filters that select the same rows (metadata compares case-insensitively)."""
        return (tuple(sorted((k, v.strip().lower()) for k, v in self.metadata)),
                tuple(sorted((s.pathology, s.op, s.value) for s in self.scores)))

    def to_dict(self) -> dict:
        return {"metadata": dict(self.metadata),
                "scores": [{"pathology": s.pathology, "op": s.op, "value": s.value} for s in self.scores]}


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_KEY_WITH_OP = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*\s*(>=|<=|>|<|=)")
_OP_FIRST = re.compile(r"^(>=|<=|>|<|=)")


def split_filter_text(text: str) -> list[str]:
    """Several filters typed in one box, as separate expressions: split on commas, and on spaces where the
    next word starts a new `key=value` or `pathology >= x` (so `view=AP supine` stays one filter)."""
    out = []
    for part in (text or "").split(","):
        words, current = part.split(), []
        for i, word in enumerate(words):
            starts = _KEY_WITH_OP.match(word) or (
                _KEY.match(word) and i + 1 < len(words) and _OP_FIRST.match(words[i + 1]))
            if current and starts:
                out.append(" ".join(current))
                current = []
            current.append(word)
        if current:
            out.append(" ".join(current))
    return out


def suggest_value(value: str, present: list[str]) -> str | None:
    """The value in `present` closest to a `value` no image has (case, '-' and spaces aside), or None."""
    import difflib

    def norm(v: str) -> str:
        return re.sub(r"[\s_\-]+", "", v.lower())

    by_norm = {norm(v): v for v in present if v}
    if norm(value) in by_norm:
        return by_norm[norm(value)]
    close = difflib.get_close_matches(norm(value), list(by_norm), n=1, cutoff=0.6)
    return by_norm[close[0]] if close else None


def parse_filters(expressions: list[str] | None, pathologies: list[str]) -> Filters:
    """Parse `modality=CT`, `view=PA`, `effusion>=0.6` ... (pathology `=` means `>=`)."""
    by_lower = {p.lower(): p for p in pathologies}
    metadata, scores = [], []
    for expr in expressions or []:
        match = _EXPR.match(expr or "")
        if not match:
            raise DataError(f"bad filter {expr!r}: use key=value or pathology>=number")
        key, op, value = match.group(1).strip().lower().replace(" ", "_").replace("-", "_"), match.group(2), \
            match.group(3)
        if key in METADATA_FILTERS:
            if op != "=":
                raise DataError(f"filter {expr!r}: {key} takes '=' only")
            metadata.append((key, value))
        elif key in by_lower:
            try:
                number = float(value)
            except ValueError:
                raise DataError(f"filter {expr!r}: {value!r} is not a number") from None
            if not 0.0 <= number <= 1.0:
                raise DataError(f"filter {expr!r}: probabilities lie in [0, 1]")
            scores.append(ScoreBound(by_lower[key], ">=" if op == "=" else op, number))
        else:
            raise DataError(f"unknown filter key {key!r}; use one of {', '.join(METADATA_FILTERS)} "
                            f"or a pathology ({', '.join(pathologies)})")
    return Filters(tuple(metadata), tuple(scores))


def calibrated_filters(filters: Filters, calibration) -> Filters:
    """Pathology bounds given as calibrated probabilities, turned into bounds on the stored raw score
    (the calibration's map is non-decreasing). A pathology without measured skill cannot be filtered on:
    DataError with the measured reason."""
    import math

    bounds = []
    for bound in filters.scores:
        cal = calibration.pathologies.get(bound.pathology) if calibration is not None else None
        if cal is None or not cal.assessed:
            why = cal.reason if cal is not None else \
                "the served model has no calibration, so its scores are not probabilities"
            raise DataError(f"cannot filter on {bound.pathology}: this model does not assess it ({why})")
        # p >= v  <=>  raw >= first raw whose probability reaches v;  p > v  <=>  the same just above v
        above = bound.value if bound.op in (">=", "<") else math.nextafter(bound.value, 2.0)
        raw = cal.raw_at_least(above)
        bounds.append(ScoreBound(bound.pathology, ">=" if bound.op in (">=", ">") else "<", raw))
    return Filters(filters.metadata, tuple(bounds))


def matching_ids_query(filters: Filters, generation: int) -> Select:
    """SELECT of the image ids that satisfy every condition (bound parameters only)."""
    query = select(ImageRow.id)
    for key, value in filters.metadata:  # served by the lower(column) indexes (migration 0003)
        query = query.where(func.lower(getattr(ImageRow, key)) == value.strip().lower())
    for bound in filters.scores:
        score = aliased(ScoreRow)
        query = query.join(score, and_(score.image_id == ImageRow.id, score.generation_id == generation,
                                       score.pathology == bound.pathology))
        query = query.where(getattr(score.probability, _OPS[bound.op])(bound.value))
    return query
