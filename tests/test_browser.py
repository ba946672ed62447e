"""End to end in real headless Chromium (Debian's package, driven by Playwright): search, open, label, upload.

Needs /usr/bin/chromium (`.ci/run` installs it). Skipped locally when it is missing; in CI (CI=true) a
missing browser is a failure, so this test can never silently stop running there.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("RADLENS_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--no-first-run", "--disable-sync", "--disable-quic"]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).exists()):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} not found: .ci/run must install Debian's chromium")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def live_url(app):
    """The app on a real WSGI server (waitress) on a free loopback port."""
    from waitress import create_server

    server = create_server(app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()


def test_search_open_label_and_upload(browser, live_url, image_dir):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    external = []
    page.on("request", lambda req: external.append(req.url) if not req.url.startswith((live_url, "data:")) else None)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    page.goto(live_url + "/")
    page.fill("input[name=q]", "a red cross")
    page.fill("input[name=filter]", "modality=XR")  # chest radiographs per the manifest
    page.press("input[name=q]", "Enter")
    page.wait_for_selector("#results .card")
    cards = page.locator("#results .card")
    assert cards.count() == 12
    page.wait_for_function(
        "Array.from(document.querySelectorAll('#results img')).every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(ARTIFACTS / "e2e-search.png"), full_page=True)

    cards.first.locator("a").click()
    page.wait_for_selector(".bar-row")
    assert page.locator(".bar-row").count() == 14
    assert page.locator(".report .impression li").count() >= 1
    page.wait_for_function("document.querySelector('img.full').naturalWidth > 0")
    page.wait_for_function("['img.heatmap', 'img.summary'].every(s => document.querySelector(s).naturalWidth > 0)")
    assert "the 14 labels apply" in page.locator("[data-applicability]").inner_text()
    slider = page.locator("[data-threshold-slider]")
    slider.fill("0")
    assert page.locator("[data-findings] li").count() == 14
    assert page.locator(".bar-row.positive").count() == 14
    slider.fill("1")
    assert page.locator("[data-findings] li").inner_text() == "No finding above threshold."
    assert "threshold=1.00" in page.locator("[data-downloads] a").first.get_attribute("href")
    page.screenshot(path=str(ARTIFACTS / "e2e-image.png"), full_page=True)
    page.select_option("[data-lang]", "de")
    page.wait_for_selector("text=Beurteilung")

    page.goto(live_url + "/upload")
    page.set_input_files("input[type=file]", str(image_dir / "cross_green_1.png"))
    page.click("form.upload button")
    page.wait_for_selector("text=Similar cases")
    assert page.locator("#results .card").count() >= 1
    assert "cross_green_1.png" in page.locator("#results .card img").first.get_attribute("alt")
    assert page.locator(".bar-row").count() == 14
    page.screenshot(path=str(ARTIFACTS / "e2e-upload.png"), full_page=True)

    assert not errors, errors
    assert not external, external  # everything is served by the app itself
    page.close()
