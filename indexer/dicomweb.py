"""DICOMweb sources: index a PACS or vendor-neutral archive in place (QIDO-RS to list, WADO-RS to fetch).

A source is a URL: ``dicomweb+http://host:8042/dicom-web`` (or ``dicomweb+https://``), optionally with
study-level QIDO filters as its query string: ``...?ModalitiesInStudy=CR&StudyDate=20240101-``. The
same form works on the command line, with ``--engine ray`` and in a manifest's path column.

Each instance is one image, identified by its *locator*
``dicomweb+http://host:8042/dicom-web/studies/S/series/R/instances/I`` (the source plus the three UIDs:
what a re-fetch needs, and nothing else). Listing is paged (``limit``/``offset``); instances are fetched
as native DICOM (WADO-RS ``application/dicom``, the transfer syntax the archive holds) and decoded like
files, so only the whitelisted attributes are read. Instances are immutable by UID: a locator already
indexed in the served generation is not fetched again.

Credentials come from the environment or a file, never from the command line, and are never logged:
``RADLENS_DICOMWEB_TOKEN`` (bearer), or ``RADLENS_DICOMWEB_USER`` + ``RADLENS_DICOMWEB_PASSWORD``
(basic), or ``RADLENS_DICOMWEB_AUTH_FILE`` naming a JSON file with ``{"token": ...}`` or
``{"username": ..., "password": ...}``. Connection errors and 5xx answers are retried with back-off.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from cxrmodel.errors import DataError

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
PAGE = 500  # QIDO results per request
TIMEOUT = (5.0, 120.0)  # seconds to connect, to read
RETRIES = 4  # per request, with exponential back-off from 0.5 s, for connection errors and 429/5xx
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"


def is_dicomweb(source: str) -> bool:
    """True for a DICOMweb source URL or instance locator."""
    return str(source).startswith(SCHEMES)


@dataclass(frozen=True)
class DicomwebSource:
    """A parsed source URL: the archive's DICOMweb root (http[s]) and the QIDO study filters."""

    root: str  # e.g. http://host:8042/dicom-web
    filters: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, url: str) -> DicomwebSource:
        """Parse `dicomweb+http[s]://host/root[?Key=Value&...]`; DataError for anything else."""
        if not is_dicomweb(url):
            raise DataError(f"{url}: a DICOMweb source starts with dicomweb+http:// or dicomweb+https://")
        parts = urlsplit(url.removeprefix("dicomweb+"))
        if not parts.hostname:
            raise DataError(f"{url}: no host")
        if parts.username or parts.password:
            raise DataError("credentials do not belong in the source URL (it is stored and shown): set "
                            "RADLENS_DICOMWEB_USER/RADLENS_DICOMWEB_PASSWORD or RADLENS_DICOMWEB_TOKEN")
        path = parts.path.rstrip("/")
        if "/studies/" in path + "/":
            raise DataError(f"{url}: give the archive's DICOMweb root (e.g. .../dicom-web), not a study")
        return cls(urlunsplit((parts.scheme, parts.netloc, path, "", "")), tuple(parse_qsl(parts.query)))

    @property
    def url(self) -> str:
        """The source as RadLens writes it (without the filters): the prefix of its locators."""
        return "dicomweb+" + self.root

    def locator(self, study: str, series: str, instance: str) -> str:
        """The locator of one instance of this archive."""
        return f"{self.url}/studies/{study}/series/{series}/instances/{instance}"


@dataclass(frozen=True)
class Locator:
    """One instance: its archive and UIDs, parsed from a locator string."""

    source: DicomwebSource
    study: str
    series: str
    instance: str

    @classmethod
    def parse(cls, locator: str) -> Locator:
        head, sep, tail = locator.partition("/studies/")
        parts = tail.split("/")
        if not sep or len(parts) != 5 or parts[1] != "series" or parts[3] != "instances":
            raise DataError(f"{locator}: not a DICOMweb instance locator (.../studies/S/series/R/instances/I)")
        return cls(DicomwebSource.parse(head), parts[0], parts[2], parts[4])


def locator_problem(locator: str) -> str | None:
    """Why a manifest's DICOMweb path is not an instance locator, or None when it is one."""
    try:
        Locator.parse(locator)
    except DataError as exc:
        return str(exc)
    return None


def _credentials() -> dict:
    """{"token": ...} or {"username": ..., "password": ...} from the environment or the auth file; {}."""
    if os.environ.get("RADLENS_DICOMWEB_TOKEN"):
        return {"token": os.environ["RADLENS_DICOMWEB_TOKEN"]}
    if os.environ.get("RADLENS_DICOMWEB_USER"):
        return {"username": os.environ["RADLENS_DICOMWEB_USER"],
                "password": os.environ.get("RADLENS_DICOMWEB_PASSWORD", "")}
    path = os.environ.get("RADLENS_DICOMWEB_AUTH_FILE")
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"RADLENS_DICOMWEB_AUTH_FILE {path}: cannot read it ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not ({"token"} <= data.keys() or {"username", "password"} <= data.keys()):
        raise DataError(f"RADLENS_DICOMWEB_AUTH_FILE {path}: expected {{\"token\": ...}} or "
                        "{\"username\": ..., \"password\": ...}")
    return data


_clients: dict[str, object] = {}
_sessions: dict[str, object] = {}  # the requests sessions under the clients, to close them
_clients_lock = threading.Lock()


def client_for(source: DicomwebSource):
    """A `dicomweb_client.DICOMwebClient` for the archive (one per process and root): credentials from the
    environment, time-outs, retries with back-off."""
    with _clients_lock:
        if source.root not in _clients:
            _clients[source.root], _sessions[source.root] = _new_client(source.root)
        return _clients[source.root]


def reset_clients() -> None:
    """Close and forget every client (new credentials in the environment apply to the next request)."""
    with _clients_lock:
        for session in _sessions.values():
            session.close()
        _clients.clear()
        _sessions.clear()


def _new_client(root: str):
    try:
        import requests
        from dicomweb_client.api import DICOMwebClient
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry
    except ImportError:
        raise DataError("DICOMweb sources need the dicomweb-client package: pip install 'radlens[pacs]'") from None
    session = requests.Session()
    retry = Retry(total=RETRIES, connect=RETRIES, read=RETRIES, backoff_factor=0.5,
                  status_forcelist=(429, 500, 502, 503, 504), allowed_methods=frozenset({"GET"}),
                  raise_on_status=False)
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    credentials = _credentials()
    if "token" in credentials:
        session.headers["Authorization"] = f"Bearer {credentials['token']}"
    elif credentials:
        session.auth = (credentials["username"], credentials["password"])
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # retries stay quiet; failures are one line
    client = DICOMwebClient(url=root, session=session, timeout=TIMEOUT)
    client.set_http_retry_params(retry=False)  # the session's back-off above is the one retry policy
    return client, session


def explain(exc: Exception, source: DicomwebSource) -> DataError:
    """A one-line DataError for a failed DICOMweb request (never the credentials)."""
    import requests

    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        why = (f"refused the credentials (HTTP {status}): set RADLENS_DICOMWEB_USER and RADLENS_DICOMWEB_PASSWORD, "
               "or RADLENS_DICOMWEB_TOKEN")
    elif status is not None:
        why = f"answered HTTP {status}"
    elif isinstance(exc, requests.exceptions.Timeout):
        why = "did not answer in time"
    elif isinstance(exc, requests.exceptions.ConnectionError):
        why = "cannot be reached (connection refused or no route)"
    else:
        why = f"failed ({exc.__class__.__name__})"
    return DataError(f"the DICOMweb archive {source.root} {why}")


def _request(fn, source: DicomwebSource, *args, **kwargs):
    import requests

    try:
        return fn(*args, **kwargs)
    except (requests.exceptions.RequestException, OSError) as exc:
        raise explain(exc, source) from None


def check_source(url: str) -> DicomwebSource:
    """Parse the source and ask the archive for one study: a clear DataError when it is unreachable or
    refuses, before anything is written."""
    source = DicomwebSource.parse(url)
    client = client_for(source)
    _request(client.search_for_studies, source, limit=1, fields=[STUDY_UID],
             search_filters=dict(source.filters) or None)
    return source


def _uid(dataset: dict, tag: str) -> str | None:
    values = (dataset.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def _paged(fetch) -> Iterator[dict]:
    offset = 0
    while True:
        page = fetch(offset)
        yield from page
        if len(page) < PAGE:
            return
        offset += len(page)


def list_locators(url: str) -> Iterator[str]:
    """The locators of every instance of the studies the source's filters select, study by study (QIDO-RS,
    paged). Raises DataError when the archive fails mid-way (what was indexed so far stays)."""
    source = DicomwebSource.parse(url)
    client = client_for(source)
    filters = dict(source.filters) or None
    studies = _paged(lambda offset: _request(client.search_for_studies, source, limit=PAGE, offset=offset,
                                             fields=[STUDY_UID], search_filters=filters))
    for study in studies:
        study_uid = _uid(study, STUDY_UID)
        if study_uid is None:
            continue
        instances = _paged(lambda offset, s=study_uid: _request(
            client.search_for_instances, source, study_instance_uid=s, limit=PAGE, offset=offset,
            fields=[SERIES_UID, SOP_UID]))
        for instance in instances:
            series, sop = _uid(instance, SERIES_UID), _uid(instance, SOP_UID)
            if series and sop:
                yield source.locator(study_uid, series, sop)


def fetch(locator: str, max_bytes: int | None = None) -> bytes:
    """One instance as DICOM Part 10 bytes (WADO-RS); DataError when the archive fails or refuses."""
    where = Locator.parse(locator)
    client = client_for(where.source)
    dataset = _request(client.retrieve_instance, where.source, where.study, where.series, where.instance)
    buf = io.BytesIO()
    dataset.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    if max_bytes is not None and len(data) > max_bytes:
        raise DataError(f"instance is {len(data)} bytes, over the {max_bytes}-byte limit")
    return data


def instance_header(locator: str, keywords) -> object:
    """The attributes `keywords` of one archived instance, from its WADO-RS metadata (no pixels fetched), as a
    pydicom Dataset; DataError when the archive fails or refuses."""
    from pydicom import Dataset
    from pydicom.datadict import tag_for_keyword

    where = Locator.parse(locator)
    client = client_for(where.source)
    answer = _request(client.retrieve_instance_metadata, where.source, where.study, where.series, where.instance)
    wanted = {f"{tag_for_keyword(k):08X}" for k in keywords}
    try:
        return Dataset.from_json({tag: value for tag, value in answer.items() if tag.upper() in wanted})
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise DataError(f"the archive's metadata of {where.instance} is malformed ({exc})") from None
