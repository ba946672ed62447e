"""Helpers for tests that start real servers (radlens serve, Ray, gunicorn) on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def radlens_server(data: Path, log_path: Path, *flags: str, boot_seconds: float = 90):
    """`radlens serve --data-dir DATA FLAGS` on a free loopback port, as a user starts it; yields
    (process, base URL) once /api/health answers, and stops it afterwards."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "radlens", "serve", "--data-dir", str(data),
                                   "--port", str(port), *flags], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + boot_seconds
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=10).close()
                    break
                except OSError:
                    assert server.poll() is None and time.time() < deadline, log_path.read_text()
                    time.sleep(0.3)
            yield server, f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


ORTHANC_USER, ORTHANC_PASSWORD = "radlens", "s3cret-for-tests"


@dataclass
class Orthanc:
    """A running `orthanc_server`: its REST root, its DICOMweb source URL, and uploads/deletes over REST."""

    url: str  # http://127.0.0.1:PORT

    @property
    def source(self) -> str:
        return "dicomweb+" + self.url + "/dicom-web"

    def upload(self, path: Path) -> dict:
        """POST one DICOM file; Orthanc's answer (its ID for the instance, ...)."""
        import requests

        response = requests.post(f"{self.url}/instances", data=path.read_bytes(),
                                 auth=(ORTHANC_USER, ORTHANC_PASSWORD), timeout=60)
        response.raise_for_status()
        return response.json()

    def delete(self, orthanc_id: str) -> None:
        import requests

        requests.delete(f"{self.url}/instances/{orthanc_id}", auth=(ORTHANC_USER, ORTHANC_PASSWORD),
                        timeout=30).raise_for_status()


@contextmanager
def orthanc_server(root: Path, binary: str = "Orthanc", boot_seconds: float = 60):
    """Debian's Orthanc with its DICOMweb plugin on a free loopback port, storage under `root`, HTTP basic
    auth (`ORTHANC_USER`/`ORTHANC_PASSWORD`); yields an `Orthanc` once DICOMweb answers."""
    import json

    import requests

    port = free_port()
    config = {"Name": "radlens-test", "HttpPort": port, "DicomServerEnabled": False,
              "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
              "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD}, "Plugins": ["/usr/share/orthanc/plugins"],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (root / "config.json").write_text(json.dumps(config))
    with open(root / "orthanc.log", "w") as log:
        process = subprocess.Popen([binary, str(root / "config.json")], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + boot_seconds
            while True:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/dicom-web/studies",
                                    auth=(ORTHANC_USER, ORTHANC_PASSWORD), timeout=5).ok:
                        break
                except requests.ConnectionError:
                    pass
                assert process.poll() is None and time.time() < deadline, (root / "orthanc.log").read_text()
                time.sleep(0.3)
            yield Orthanc(f"http://127.0.0.1:{port}")
        finally:
            process.terminate()
            process.wait(timeout=30)
