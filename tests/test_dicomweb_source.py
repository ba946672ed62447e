"""DICOMweb source URLs, locators and the client's failure handling, without an archive (a tiny HTTP
server on loopback stands in where one must answer)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cxrmodel.errors import DataError
from indexer import dicomweb


def test_source_urls_and_locators_parse_and_round_trip():
    source = dicomweb.DicomwebSource.parse("dicomweb+https://pacs.example.org/dicom-web/?ModalitiesInStudy=CR"
                                           "&StudyDate=20240101-")
    assert source.root == "https://pacs.example.org/dicom-web"
    assert dict(source.filters) == {"ModalitiesInStudy": "CR", "StudyDate": "20240101-"}
    locator = source.locator("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert locator == "dicomweb+https://pacs.example.org/dicom-web/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"
    parsed = dicomweb.Locator.parse(locator)
    assert (parsed.source.root, parsed.study, parsed.series, parsed.instance) == (source.root, "1.2.3", "1.2.3.4",
                                                                                 "1.2.3.4.5")
    for bad, why in (("http://pacs/dicom-web", "starts with dicomweb"), ("dicomweb+http:///x", "no host"),
                     ("dicomweb+http://u:p@pacs/dicom-web", "credentials do not belong"),
                     ("dicomweb+http://pacs/dicom-web/studies/1.2", "not a study")):
        with pytest.raises(DataError, match=why):
            dicomweb.DicomwebSource.parse(bad)
    assert "not a DICOMweb instance locator" in dicomweb.locator_problem("dicomweb+http://pacs/dicom-web/studies/1")


def test_credentials_come_from_the_environment_or_a_file_never_the_url(monkeypatch, tmp_path):
    for name in ("RADLENS_DICOMWEB_TOKEN", "RADLENS_DICOMWEB_USER", "RADLENS_DICOMWEB_PASSWORD",
                 "RADLENS_DICOMWEB_AUTH_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert dicomweb._credentials() == {}
    (tmp_path / "auth.json").write_text('{"username": "u", "password": "p"}')
    monkeypatch.setenv("RADLENS_DICOMWEB_AUTH_FILE", str(tmp_path / "auth.json"))
    assert dicomweb._credentials() == {"username": "u", "password": "p"}
    monkeypatch.setenv("RADLENS_DICOMWEB_TOKEN", "t0k")
    assert dicomweb._credentials() == {"token": "t0k"}
    monkeypatch.delenv("RADLENS_DICOMWEB_TOKEN")
    (tmp_path / "auth.json").write_text('{"user": "u"}')
    with pytest.raises(DataError, match="expected"):
        dicomweb._credentials()


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first two requests, then an empty QIDO result; records the auth header."""

    seen: list[str | None] = []

    def do_GET(self):  # noqa: N802 -- the http.server API
        type(self).seen.append(self.headers.get("Authorization"))
        if len(type(self).seen) <= 2:
            self.send_response(503)
            self.end_headers()
            return
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_5xx_answers_are_retried_with_back_off_and_the_token_is_sent(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("RADLENS_DICOMWEB_TOKEN", "t0k")
    dicomweb.reset_clients()
    try:
        url = f"dicomweb+http://127.0.0.1:{server.server_port}/dicom-web"
        assert dicomweb.check_source(url).root.endswith("/dicom-web")
        assert list(dicomweb.list_locators(url)) == []
        assert _Flaky.seen[:3] == ["Bearer t0k"] * 3  # two 503s, then the answer
    finally:
        server.shutdown()
        server.server_close()
        dicomweb.reset_clients()


def test_a_manifest_row_may_name_an_archived_instance_with_its_metadata(tmp_path):
    from indexer.sources import ManifestProblem, SourceRecord, read_manifest

    good = "dicomweb+http://pacs:8042/dicom-web/studies/1.2/series/1.2.3/instances/1.2.3.4"
    (tmp_path / "m.csv").write_text(f"path,caption,view\n{good},left effusion,PA\n"
                                    "dicomweb+http://pacs:8042/dicom-web/studies/1.2,whole study,\n")
    record, problem = list(read_manifest(tmp_path / "m.csv"))
    assert isinstance(record, SourceRecord) and record.path == good
    assert record.metadata == {"caption": "left effusion", "view": "PA"}
    assert isinstance(problem, ManifestProblem) and problem.line == 3 and "instance locator" in problem.reason
