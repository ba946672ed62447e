"""Patient pseudonyms and shifted study days: what prior-study comparison needs, and nothing more.

A raw patient key (manifest `patient_id`, DICOM PatientID) and a raw study date exist only in memory
between reading a file and `row_fields`. The database keeps

- `patient_hash = HMAC-SHA256(key, "patient:" + id)`: studies of one patient can be listed together,
  but with the key outside the data dir a copy of the data dir cannot be used to test guesses of
  patient IDs (short MRNs would fall to a plain or salted hash);
- `study_day`: the study date as a day number, shifted back by a per-patient offset of 1-10 years
  derived from the same key (DICOM PS3.15 "Retain Longitudinal Temporal Information with Modified
  Dates"): order and intervals between one patient's studies are kept, the calendar date is not.
  Pages and the API show only intervals ("412 days before this study"), never the shifted date.

The key is 32 random bytes from `RADLENS_PATIENT_KEY` (hex), or a key file (`RADLENS_PATIENT_KEY_FILE`,
default `~/.config/radlens/patient-key`, mode 0600) that is created on first use and must not lie
inside the data dir. It is read only when a file carries a patient key.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cxrmodel.errors import DataError

KEY_ENV = "RADLENS_PATIENT_KEY"
KEY_FILE_ENV = "RADLENS_PATIENT_KEY_FILE"
KEY_SETTING = "patient_key_fingerprint"
MIN_SHIFT_DAYS, MAX_SHIFT_DAYS = 365, 3650


def default_key_file() -> Path:
    """`$XDG_CONFIG_HOME/radlens/patient-key` (XDG_CONFIG_HOME defaults to ~/.config)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "radlens" / "patient-key"


@dataclass(frozen=True)
class PatientKeyConfig:
    """Where the patient-key secret comes from (built once from the environment by the CLI)."""

    key_hex: str | None = field(default=None, repr=False, metadata={"help": "The key itself, 64 hex digits."})
    key_file: Path | None = field(default=None, metadata={"help": "A file holding the key; None: the default."})

    @classmethod
    def from_env(cls, environ=os.environ) -> PatientKeyConfig:
        """`RADLENS_PATIENT_KEY` (hex) wins over `RADLENS_PATIENT_KEY_FILE`, which wins over the default file."""
        key_file = environ.get(KEY_FILE_ENV)
        return cls(key_hex=environ.get(KEY_ENV) or None, key_file=Path(key_file) if key_file else None)


def load_key(config: PatientKeyConfig, data_dir: str | Path) -> bytes:
    """The secret key, creating the key file (0600) on first use. Never from inside the data dir."""
    if config.key_hex:
        try:
            key = bytes.fromhex(config.key_hex.strip())
        except ValueError:
            key = b""
        if len(key) < 16:
            raise DataError(f"{KEY_ENV} must hold at least 32 hex digits (e.g. `python -c \"import secrets; "
                            "print(secrets.token_hex(32))\"`)")
        return key
    path = (config.key_file or default_key_file()).expanduser().absolute()
    if path.resolve().is_relative_to(Path(data_dir).absolute().resolve()):
        raise DataError(f"the patient key file {path} lies inside the data dir {data_dir}: anyone with a copy of "
                        f"the data dir could then test guesses of patient IDs; set {KEY_FILE_ENV} to a path "
                        "outside it")
    if not path.exists():
        _create_key_file(path)
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the patient key file {path} ({getattr(exc, 'strerror', None) or exc}); it "
                        "must hold the 64 hex digits RadLens wrote there") from None
    if len(key) < 16:
        raise DataError(f"the patient key file {path} holds {len(key)} bytes; it needs at least 16")
    return key


def _create_key_file(path: Path) -> None:
    from .store import write_private_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        write_private_file(tmp, secrets.token_hex(32))
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # first writer wins; others keep its key
        tmp.unlink()
    except OSError as exc:
        raise DataError(f"cannot create the patient key file {path} ({exc.strerror or exc}); set "
                        f"{KEY_FILE_ENV} to a writable path outside the data dir") from None


class Pseudonymizer:
    """Keyed patient pseudonyms and per-patient date shifts. The key is loaded on first use; a database
    remembers the fingerprint of the first key that wrote to it and refuses any other (`verify`, in
    the same transaction as the rows that carry pseudonyms)."""

    def __init__(self, config: PatientKeyConfig, data_dir: str | Path):
        self.config = config
        self.data_dir = data_dir
        self._key: bytes | None = None
        self._verified = False

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = load_key(self.config, self.data_dir)
        return self._key

    def verify(self, session) -> None:
        """Check (once per run) that `session`'s database has seen no other key, when a key was used."""
        if self._key is not None and not self._verified:
            check_key(session, self._key)
            self._verified = True

    def patient_hash(self, patient_id: str) -> str:
        """HMAC-SHA256 of the stripped patient key, hex."""
        return hmac.new(self.key, b"patient:" + patient_id.strip().encode("utf-8"), hashlib.sha256).hexdigest()

    def study_day(self, patient_hash: str, date: dt.date) -> int:
        """The date's ordinal day, shifted back by this patient's fixed offset (1-10 years)."""
        digest = hmac.new(self.key, b"date-shift:" + patient_hash.encode("ascii"), hashlib.sha256).digest()
        shift = MIN_SHIFT_DAYS + int.from_bytes(digest[:8], "big") % (MAX_SHIFT_DAYS - MIN_SHIFT_DAYS + 1)
        return date.toordinal() - shift


def key_fingerprint(key: bytes) -> str:
    """A value that tells keys apart without revealing them."""
    return hmac.new(key, b"radlens-patient-key-fingerprint", hashlib.sha256).hexdigest()


def check_key(session, key: bytes) -> None:
    """Every writer of one database must use the same key (several data dirs sharing a database server)."""
    from sqlalchemy import select

    from .store import SettingRow, upsert

    fingerprint = key_fingerprint(key)
    upsert(session, SettingRow, [dict(key=KEY_SETTING, value=fingerprint)], keys=("key",), update=False)
    stored = session.scalar(select(SettingRow.value).where(SettingRow.key == KEY_SETTING))
    if stored != fingerprint:
        raise DataError(f"this database's patient keys were hashed with another key: set {KEY_FILE_ENV} (or "
                        f"{KEY_ENV}) to the key of the first writer of this database")


def parse_date(value) -> dt.date | None:
    """'20240131', '2024-01-31', '2024/01/31' -> date(2024, 1, 31); anything else -> None."""
    digits = "".join(c for c in str(value or "") if c.isdigit())
    if len(digits) != 8:
        return None
    try:
        date = dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None
    return date if 1900 <= date.year <= 2100 else None
