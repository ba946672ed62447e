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
    """The app on a real threaded HTTP server on a free loopback port. Werkzeug's server stops cleanly
    (`shutdown` ends `serve_forever` between requests); closing waitress's socket map under its running
    poll loop raised EBADF in that thread whenever a browser keep-alive connection was still open."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)
    server.server_close()


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

    cards.first.locator("a.result-link").click()
    page.wait_for_selector(".bar-row")
    assert page.locator(".bar-row").count() == 14
    assert page.locator(".report .impression li").count() >= 1
    page.wait_for_function("document.querySelector('img.full').naturalWidth > 0")
    page.wait_for_function("['img.heatmap', 'img.summary'].every(s => document.querySelector(s).naturalWidth > 0)")
    assert "the 14 labels apply" in page.locator("[data-applicability]").inner_text()
    with page.expect_navigation():  # releasing the slider re-renders the page at that threshold
        page.locator("[data-threshold-slider]").fill("0")
    assert page.locator("[data-findings] li").count() == 14
    assert page.locator(".bar-row.positive").count() == 14
    with page.expect_navigation():
        page.locator("[data-threshold-slider]").fill("1")
    assert page.locator("[data-findings] li").inner_text() == "No finding above threshold."
    assert "threshold=1.00" in page.locator("[data-downloads] a").first.get_attribute("href")
    page.screenshot(path=str(ARTIFACTS / "e2e-image.png"), full_page=True)
    page.select_option("[data-lang]", "de")
    page.wait_for_selector("text=Beurteilung")

    page.goto(live_url + "/upload")
    page.set_input_files("input[type=file]", str(image_dir / "gray" / "g1.png"))
    page.click("form.upload button")
    page.wait_for_selector("text=Similar cases")
    assert page.locator("#results .card").count() >= 1
    assert "g1.png" in page.locator("#results .card img").first.get_attribute("alt")
    assert page.locator(".bar-row").count() == 14
    page.screenshot(path=str(ARTIFACTS / "e2e-upload.png"), full_page=True)

    assert not errors, errors
    assert not external, external  # everything is served by the app itself
    page.close()


def test_the_threshold_is_one_state_for_report_and_downloads(browser, live_url, engine):
    """Moving the slider re-renders findings, impression and recommendations and every download at that
    threshold; the language selector keeps it; the Markdown and PDF downloads list the same findings."""
    import urllib.parse
    import urllib.request

    hit = next(h for h in engine.text("x", k=50) if h.applicability and h.applicability["applicable"])
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{live_url}/image/{hit.id}")
    values = sorted(hit.pathologies.values())
    cut = (values[len(values) // 2] + values[len(values) // 2 + 1]) / 2  # half the assessed ones above
    with page.expect_navigation():
        page.locator("[data-threshold-slider]").fill(f"{cut:.2f}")
        page.locator("[data-threshold-slider]").dispatch_event("change")
    assert f"threshold={cut:.2f}" in page.url
    shown = page.locator(".report .impression li").all_inner_texts()
    expected = sorted(p.lower() for p, v in hit.pathologies.items() if v >= float(f"{cut:.2f}"))
    assert sorted(line.split(" (")[0].replace(" ", "_").lower() for line in shown) == expected
    markdown_link = page.locator("[data-downloads] a", has_text="report (Markdown)").get_attribute("href")
    assert f"threshold={cut:.2f}" in markdown_link
    for link in page.locator("[data-downloads] a").all():
        assert f"threshold={cut:.2f}" in link.get_attribute("href")
    markdown = urllib.request.urlopen(urllib.parse.urljoin(live_url + "/", markdown_link)).read().decode()
    impression = markdown.split("## Impression")[1].split("##")[0]
    assert sorted(ln.split(". ", 1)[1].split(" (")[0].replace(" ", "_").lower()
                  for ln in impression.strip().splitlines()) == expected
    page.select_option("[data-lang]", "de")
    page.wait_for_selector("text=Beurteilung")
    assert f"threshold={cut:.2f}" in page.url  # the language change kept it
    assert not errors, errors
    page.close()


def _axe_serious(page) -> list[str]:
    """Serious or critical axe-core violations on the page (axe-core as packaged by axe-playwright-python,
    injected into the page; nothing is fetched)."""
    import axe_playwright_python

    page.evaluate((Path(axe_playwright_python.__file__).parent / "axe.min.js").read_text(encoding="utf-8"))
    result = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    return [f"{v['id']} ({v['impact']}): {v['help']} x{len(v['nodes'])}" for v in result["violations"]
            if v["impact"] in ("serious", "critical")]


def test_browse_a_corpus_more_like_this_pages_facets_chips_compare(browser, live_url, image_dir):
    """The browsing workflow in a real browser, failing on any script error, console error or failed
    request (favicon included), and on serious or critical accessibility violations on every page kind."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.on("requestfailed", lambda req: problems.append(f"failed: {req.url}"))
    page.on("response", lambda r: problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None)
    violations = {}

    page.goto(live_url + "/?q=a+red+cross&k=4")
    page.wait_for_selector("#results .card")
    violations["search"] = _axe_serious(page)
    first_ids = [a.get_attribute("href") for a in page.locator("#results .result-link").all()]
    with page.expect_navigation():
        page.click("a[rel=next]")
    assert "Showing 5–8" in page.locator("[data-counts]").inner_text()
    assert not set(first_ids) & {a.get_attribute("href") for a in page.locator("#results .result-link").all()}
    with page.expect_navigation():
        page.click("a[rel=prev]")
    assert [a.get_attribute("href") for a in page.locator("#results .result-link").all()] == first_ids

    with page.expect_navigation():  # tick a facet: modality CT
        page.locator("[data-facets] a", has_text="CT").first.click()
    assert page.locator("[data-chips] .filter-chip").count() == 1
    assert all("CT" in d for d in page.locator("#results .desc").all_inner_texts())
    with page.expect_navigation():  # remove the chip
        page.locator("[data-chips] .filter-chip").first.click()
    assert page.locator("[data-chips]").count() == 0

    with page.expect_navigation():
        page.locator("#results .more-like").first.click()
    assert page.locator("h1").inner_text().startswith("Images like")
    with page.expect_navigation():
        page.locator("#results a.compare").first.click()
    page.wait_for_function("Array.from(document.querySelectorAll('img.full')).every(i => i.naturalWidth > 0)")
    assert page.locator("[data-applicability]").count() == 2
    violations["compare"] = _axe_serious(page)

    with page.expect_navigation():
        page.locator(".compare h2 a").first.click()
    page.wait_for_selector(".bar-row")
    page.select_option("[data-zoom]", "200")
    assert page.locator("[data-zoom-target]").get_attribute("style").startswith("width: 200%")
    violations["image"] = _axe_serious(page)

    page.goto(live_url + "/upload")
    page.set_input_files("input[type=file]", str(image_dir / "gray" / "g1.png"))
    page.click("form.upload button")
    page.wait_for_selector("text=Similar cases")
    assert page.locator("[data-upload-downloads] a").count() == 3
    violations["upload"] = _axe_serious(page)
    page.screenshot(path=str(ARTIFACTS / "e2e-upload-downloads.png"), full_page=True)

    assert not problems, problems
    assert not any(violations.values()), violations
    page.close()


@pytest.fixture(scope="module")
def dicom_live_url(tmp_path_factory, tiny_encoder):
    """A server over a tiny index holding one CT DICOM (for the window presets)."""
    import numpy as np
    from werkzeug.serving import make_server

    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig
    from tests.imagegen import write_dicom
    from web import ServeConfig, create_app

    root = tmp_path_factory.mktemp("dicom-live")
    (root / "src").mkdir()
    hu = np.repeat(np.array([[-1000, -700, 40, 1000]], dtype=np.int16), 16, axis=0).repeat(16, axis=1)
    write_dicom(root / "src" / "ct.dcm", (hu + 1024).astype(np.uint16), Modality="CT", BodyPartExamined="CHEST",
                RescaleIntercept=-1024, RescaleSlope=1, WindowCenter=40, WindowWidth=400)
    run_index(IndexJob(sources=[str(root / "src")], data_dir=root / "data", workers=0, progress=False),
              tiny_encoder)
    engine = Engine.open(EngineConfig(data_dir=root / "data"), encoder=tiny_encoder)
    server = make_server("127.0.0.1", 0, create_app(ServeConfig(api_token=None), engine=engine), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", engine.text("x", k=1)[0].id
    server.shutdown()
    thread.join(timeout=10)
    server.server_close()
    engine.close()


def test_switching_a_dicom_window_preset(browser, dicom_live_url):
    url, image_id = dicom_live_url
    page = browser.new_page()
    problems = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("response", lambda r: problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None)
    page.goto(f"{url}/image/{image_id}")
    page.wait_for_function("document.querySelector('img.full').naturalWidth > 0")
    pixels = "(() => { const i = document.querySelector('img.full'); const c = document.createElement('canvas');" \
             " c.width = i.naturalWidth; c.height = 1; const x = c.getContext('2d'); x.drawImage(i, 0, 0);" \
             " return Array.from(x.getImageData(0, 0, c.width, 1).data).filter((_, k) => k % 4 === 0); })()"
    own = page.evaluate(pixels)
    with page.expect_navigation():
        page.click("nav.windows a:text-is('lung')")
    page.wait_for_function("document.querySelector('img.full').naturalWidth > 0")
    assert "window=lung" in page.locator("img.full").get_attribute("src")
    assert page.locator("nav.windows a[aria-current]").inner_text() == "lung"
    lung = page.evaluate(pixels)
    assert lung[16] > own[16]  # the lung column (-700 HU), black in the file's soft-tissue window, now grey
    assert not problems, problems
    page.close()
