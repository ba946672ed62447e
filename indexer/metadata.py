"""Metadata as stored: normalised study fields, and patient keys as salted hashes (a salt per data dir).

A raw patient key (manifest `patient_id`, DICOM PatientID) exists only in memory between reading a
file and `row_fields`; the DB holds `patient_hash = sha256(salt + key)`, so studies of one patient can
be listed together without the key being recoverable from the data dir's DB alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from pathlib import Path

from cxrmodel.reporting.report import age_band

from .store import ImageRow, write_private_file

SALT_FILE = "patient-key.salt"


def data_dir_salt(data_dir: str | Path) -> bytes:
    """The data dir's random salt, created (mode 0600) on first use."""
    path = Path(data_dir) / SALT_FILE
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        write_private_file(tmp, secrets.token_hex(32))
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # first writer wins; others keep its salt
        tmp.unlink()
    return bytes.fromhex(path.read_text().strip())


SALT_SETTING = "patient_salt_fingerprint"


def check_salt(db, salt: bytes, data_dir: str | Path) -> None:
    """Every data dir writing one database must hash patient keys with the same salt.

    The database keeps a fingerprint of the first writer's salt (never the salt itself, so the DB
    alone cannot be used to test guesses of patient keys); a writer with another salt is refused.
    """
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from cxrmodel.errors import DataError

    from .store import SettingRow, upsert

    fingerprint = hashlib.sha256(b"radlens-salt-fingerprint:" + salt).hexdigest()
    with Session(db) as session, session.begin():
        upsert(session, SettingRow, [dict(key=SALT_SETTING, value=fingerprint)], keys=("key",), update=False)
        stored = session.scalar(select(SettingRow.value).where(SettingRow.key == SALT_SETTING))
    if stored != fingerprint:
        raise DataError(f"this database's patient keys were hashed with another salt than "
                        f"{Path(data_dir) / SALT_FILE}; copy {SALT_FILE} from the data dir that first wrote to "
                        "this database into this one")


def patient_hash(key: str, salt: bytes) -> str:
    """sha256 of salt + normalised key."""
    return hashlib.sha256(salt + key.strip().encode("utf-8")).hexdigest()


def normalise_date(value) -> str | None:
    """'20240131', '2024-01-31', '2024/01/31' -> '2024-01-31'; anything else -> None."""
    digits = re.sub(r"[^0-9]", "", str(value or ""))
    if len(digits) != 8:
        return None
    y, m, d = digits[:4], digits[4:6], digits[6:]
    if not ("1900" <= y <= "2100" and "01" <= m <= "12" and "01" <= d <= "31"):
        return None
    return f"{y}-{m}-{d}"


def row_fields(meta: dict, salt: bytes) -> dict:
    """ImageRow metadata columns from merged DICOM/manifest metadata."""
    out = {k: meta.get(k) or None for k in ImageRow.METADATA_FIELDS
           if k not in ("age_band", "study_date")}
    out["age_band"] = meta.get("age_band") or age_band(meta.get("age"))
    out["study_date"] = normalise_date(meta.get("study_date"))
    sex = str(meta.get("sex") or "").strip().upper()[:1]
    out["sex"] = sex if sex in ("M", "F", "O") else None
    key = str(meta.get("patient_key") or "").strip()
    out["patient_hash"] = patient_hash(key, salt) if key else None
    return out
