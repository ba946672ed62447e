"""The package as users install it: a wheel (not the checkout) carries every asset, and the demo runs
from it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSET_DIRS = ("cxrmodel/assets/radlens-mini", "radlens/samples", "web/templates", "web/static",
              "indexer/migrations/versions")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, cwd=out, capture_output=True)
    return next(out.glob("radlens-*.whl"))


def test_the_wheel_carries_every_asset_one_version_and_the_console_script(wheel):
    from cxrmodel.constants import VERSION

    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ASSET_DIRS:
        files = [p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts]
        assert files and not set(files) - names, (folder, sorted(set(files) - names)[:5])
    assert "cxrmodel/reporting/report_templates.json" in names and "indexer/migrations/script.py.mako" in names
    assert wheel.name.startswith(f"radlens-{VERSION}-")
    meta = zipfile.ZipFile(wheel).read(f"radlens-{VERSION}.dist-info/METADATA").decode()
    required = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any(name in " ".join(required) for name in ("ray", "psycopg", "gunicorn", "pytest"))  # extras only
    assert "radlens = radlens.cli:main" in zipfile.ZipFile(wheel).read(
        f"radlens-{VERSION}.dist-info/entry_points.txt").decode()


def test_the_demo_runs_from_the_installed_wheel_not_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import radlens.commands.demo as d; print(d.SAMPLES)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(target))  # the wheel's copy, with its own samples
    run = subprocess.run([sys.executable, "-m", "radlens", "demo", "--no-serve", "--data-dir", str(tmp_path / "d")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
