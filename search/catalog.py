"""What the DB says about indexed images, as a query needs it: hits, one image's record, its file path,
its prior studies. Reads only; every read names the generation whose scores it wants.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import Select, func, select
from sqlalchemy.engine import Engine as DB
from sqlalchemy.orm import Session

from cxrmodel.errors import NotFoundError
from indexer.store import DecisionRow, EmbeddingRow, ImageRow, ScoreRow

MAX_ID = {"postgresql": 2**31 - 1}  # images.id is INTEGER: 32-bit there, 64-bit on SQLite


@dataclass
class Hit:
    """One search result."""

    id: int
    score: float
    image: dict
    pathologies: dict[str, float] = field(default_factory=dict)
    applicability: dict | None = None
    generation: int | None = None  # the index generation that answered (its model made the score)
    match: object = None  # search.relevance.Match: how strong this score is against unrelated content

    def top_pathologies(self, n: int = 3) -> list[tuple[str, float]]:
        return sorted(self.pathologies.items(), key=lambda kv: -kv[1])[:n]

    def to_dict(self) -> dict:
        return {"id": self.id, "score": round(self.score, 6), "generation": self.generation, "image": self.image,
                "match": self.match.to_dict() if self.match is not None else None,
                "applicability": self.applicability,
                "pathologies": {k: round(v, 4) for k, v in self.pathologies.items()},
                "top_pathologies": [{"pathology": p, "probability": round(v, 4)} for p, v in self.top_pathologies()]}


class Catalog:
    """Reads image rows, stored scores and decisions of one database."""

    def __init__(self, db: DB):
        self.db = db
        self.max_id = MAX_ID.get(db.dialect.name, 2**63 - 1)

    def valid_id(self, image_id) -> bool:
        """True for ids this database can hold (a larger one can name no image, and must not reach SQL)."""
        try:
            return 0 <= int(image_id) <= self.max_id
        except (TypeError, ValueError):
            return False

    def hits(self, found: list[tuple[int, float]], generation: int, k: int) -> list[Hit]:
        """The first `k` distinct images (by content hash) of ranked `(id, score)` candidates, with their
        metadata, stored scores and applicability in `generation`."""
        if not found:
            return []
        ids = [i for i, _ in found]
        with Session(self.db) as session:
            rows = {r.id: r for r in session.scalars(select(ImageRow).where(ImageRow.id.in_(ids)))}
            scores: dict[int, dict[str, float]] = {}
            for s in session.scalars(select(ScoreRow).where(ScoreRow.generation_id == generation,
                                                            ScoreRow.image_id.in_(ids))):
                scores.setdefault(s.image_id, {})[s.pathology] = s.probability
            decisions = {d.image_id: d.to_dict() for d in session.scalars(select(DecisionRow).where(
                DecisionRow.generation_id == generation, DecisionRow.image_id.in_(ids)))}
            hits, seen = [], set()
            for image_id, score in found:
                row = rows.get(image_id)
                if row is None or row.content_hash in seen:
                    continue
                seen.add(row.content_hash)
                hits.append(Hit(image_id, score, row.to_dict(), scores.get(image_id, {}), decisions.get(image_id),
                                generation))
                if len(hits) == k:
                    break
        return hits

    def record(self, image_id: int, generation: int) -> dict | None:
        """Metadata, stored scores and applicability of one image in `generation`, or None."""
        if not self.valid_id(image_id):
            return None
        with Session(self.db) as session:
            row = session.get(ImageRow, int(image_id))
            if row is None:
                return None
            out = row.to_dict()
            out["scores"] = {s.pathology: {"probability": s.probability, "uncertainty": s.uncertainty}
                             for s in session.scalars(select(ScoreRow).where(
                                 ScoreRow.generation_id == generation, ScoreRow.image_id == row.id))}
            decision = session.get(DecisionRow, (generation, row.id))
            out["applicability"] = decision.to_dict() if decision else None
        return out

    def facet_counts(self, columns: tuple[str, ...], ids: Select, generation: int) -> dict[str, dict[str, int]]:
        """Per column, how many of the images `ids` selects (and `generation` embeds) have each value."""
        embedded = select(EmbeddingRow.image_id).where(EmbeddingRow.generation_id == generation)
        out = {}
        with Session(self.db) as session:
            for column in columns:
                field = getattr(ImageRow, column)
                rows = session.execute(select(field, func.count()).where(
                    field.is_not(None), ImageRow.id.in_(ids), ImageRow.id.in_(embedded)).group_by(field))
                out[column] = dict(sorted(((v, n) for v, n in rows if str(v).strip()), key=lambda kv: -kv[1]))
        return out

    def vector(self, image_id: int, generation: int) -> np.ndarray | None:
        """The embedding stored for an image in `generation` (exact, whatever the index compresses), or None."""
        if not self.valid_id(image_id):
            return None
        with Session(self.db) as session:
            row = session.get(EmbeddingRow, (generation, int(image_id)))
            return np.frombuffer(row.vector, dtype="<f4").astype(np.float32) if row is not None else None

    def path(self, image_id: int) -> str:
        """The file an image was indexed from (server side only; never sent to clients)."""
        path = None
        if self.valid_id(image_id):
            with Session(self.db) as session:
                row = session.get(ImageRow, int(image_id))
                path = row.path if row is not None else None
        if path is None:
            raise NotFoundError(f"no image with id {image_id}")
        return path

    def priors(self, image_id: int, generation: int) -> dict:
        """The same patient's indexed studies in time order, with stored scores and the change per pathology.

        Studies are linked by the keyed patient pseudonym only. Time is given as intervals in days
        (`days_from_this`: negative before this study), never as a date: the stored day numbers are
        shifted per patient (indexer.pseudonyms) and would mislead if shown as dates.
        """
        with Session(self.db) as session:
            row = session.get(ImageRow, int(image_id)) if self.valid_id(image_id) else None
            if row is None:
                raise NotFoundError(f"no image with id {image_id}")
            if row.patient_hash is None:
                return {"studies": [], "changes": [], "reason": "the metadata carries no patient key"}
            rows = session.scalars(select(ImageRow).where(ImageRow.patient_hash == row.patient_hash)
                                   .order_by(ImageRow.study_day.asc().nulls_last(), ImageRow.id)).all()
            ids = [r.id for r in rows]
            scores: dict[int, dict[str, float]] = {}
            for s in session.scalars(select(ScoreRow).where(ScoreRow.generation_id == generation,
                                                            ScoreRow.image_id.in_(ids))):
                scores.setdefault(s.image_id, {})[s.pathology] = round(s.probability, 4)
            studies = [{"id": r.id, "days_from_this": days_between(row.study_day, r.study_day),
                        "file_name": Path(r.path).name, "modality": r.modality, "view": r.view,
                        "current": r.id == row.id, "scores": scores.get(r.id, {})} for r in rows]
        changes = []
        for before, after in itertools.pairwise(studies):
            common = set(before["scores"]) & set(after["scores"])
            changes.append({"from": before["id"], "to": after["id"],
                            "delta": {p: round(after["scores"][p] - before["scores"][p], 4) for p in sorted(common)}})
        return {"studies": studies, "changes": changes}


def days_between(this_day: int | None, other_day: int | None) -> int | None:
    """Days from this study to another (negative: the other came first); None when either has no date."""
    return None if this_day is None or other_day is None else other_day - this_day
