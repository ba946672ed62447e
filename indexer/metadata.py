"""Metadata as stored: normalised study fields; patient keys and study dates only as pseudonyms
(`indexer.pseudonyms`): a keyed patient hash and a per-patient shifted study day."""

from __future__ import annotations

import contextlib
from pathlib import Path

from cxrmodel.reporting.report import age_band

from .pseudonyms import Pseudonymizer, parse_date
from .store import ImageRow

LEGACY_SALT_FILE = "patient-key.salt"  # the unkeyed salt of RadLens before schema 0004; removed by the next run


def row_fields(meta: dict, pseudonyms: Pseudonymizer | None) -> dict:
    """ImageRow metadata columns from merged DICOM/manifest metadata.

    The patient key becomes its keyed hash; a study date is kept only with a patient key (it serves
    nothing else), as that patient's shifted day number. Without a `pseudonyms` both are dropped.
    """
    out = {k: meta.get(k) or None for k in ImageRow.METADATA_FIELDS if k not in ("age_band", "study_day")}
    out["age_band"] = meta.get("age_band") or age_band(meta.get("age"))
    sex = str(meta.get("sex") or "").strip().upper()[:1]
    out["sex"] = sex if sex in ("M", "F", "O") else None
    key = str(meta.get("patient_key") or "").strip()
    out["patient_hash"] = pseudonyms.patient_hash(key) if key and pseudonyms else None
    date = parse_date(meta.get("study_date")) if out["patient_hash"] else None
    out["study_day"] = pseudonyms.study_day(out["patient_hash"], date) if date else None
    return out


def remove_legacy_salt(data_dir: str | Path) -> None:
    """The pre-0004 salt file serves nothing once a run has rewritten the patient hashes."""
    with contextlib.suppress(FileNotFoundError):
        (Path(data_dir) / LEGACY_SALT_FILE).unlink()
