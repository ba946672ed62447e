"""Web app through Flask's test client: every route, bad uploads as 4xx JSON, token enforcement."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from tests.imagegen import gray_image, png_bytes, shape_image, write_dicom
from web import ServeConfig, create_app

pytestmark = pytest.mark.usefixtures("on_backend")  # SQLite, and PostgreSQL when RADLENS_TEST_DB_URL is set


def _upload(data: bytes, name: str = "x.png", **fields):
    return {"image": (io.BytesIO(data), name), **fields}


@pytest.fixture(scope="module")
def some_id(engine):
    """An indexed chest radiograph (XR + chest in the manifest), so the 14 labels apply."""
    return engine.text("a red cross", k=1, filters=engine.parse_filters(["modality=XR"]))[0].id


@pytest.fixture(scope="module")
def ct_id(engine):
    """An indexed CT (per the manifest): the labels do not apply."""
    return engine.text("a red circle", k=1, filters=engine.parse_filters(["modality=CT"]))[0].id


def test_health(client):
    r = client.get("/api/health")
    assert r.status_code == 200 and r.json["status"] == "ok" and r.json["vectors"] > 0


def test_search_api(client, engine, image_dir):
    r = client.get("/api/search", query_string={"q": "a green square", "k": 4})
    assert r.status_code == 200
    assert [h["id"] for h in r.json["results"]] == [h.id for h in engine.text("a green square", k=4)]
    r = client.get("/api/search", query_string=[("q", "x"), ("k", "3"), ("filter", "modality=CT")])
    assert len(r.json["results"]) == 3 and {h["image"]["modality"] for h in r.json["results"]} == {"CT"}
    assert str(image_dir) not in json.dumps(r.json)  # server paths never leak


@pytest.mark.parametrize("params,message", [({}, "q"), ({"q": "x", "k": "abc"}, "integer"),
                                            ({"q": "x", "k": 0}, "between"), ({"q": "x", "filter": "colour=red"},
                                                                              "unknown filter")])
def test_search_api_bad_params(client, params, message):
    r = client.get("/api/search", query_string=params)
    assert r.status_code == 400 and message in r.json["error"]


def test_similar_api_returns_the_image_itself(client, image_dir):
    data = (image_dir / "triangle_blue_0.png").read_bytes()
    r = client.post("/api/similar", data=_upload(data, k="3"), content_type="multipart/form-data")
    assert r.status_code == 200 and r.json["results"][0]["image"]["file_name"] == "triangle_blue_0.png"


def test_label_api(client):
    r = client.post("/api/label", data=_upload(png_bytes(gray_image(4, (96, 96))), threshold="0.4"),
                    content_type="multipart/form-data")
    assert r.status_code == 200
    assert len(r.json["labels"]) == 14 and r.json["report"]["disclaimer"]
    above = [x["pathology"] for x in r.json["labels"] if x["probability"] >= 0.4]
    assert len(r.json["report"]["impression"]) == max(1, len(above))


def test_label_api_accepts_dicom(client, tmp_path):
    path = write_dicom(tmp_path / "u.dcm", (np.arange(32 * 32).reshape(32, 32) * 3).astype(np.uint16))
    r = client.post("/api/label", data=_upload(path.read_bytes(), "u.dcm"), content_type="multipart/form-data")
    assert r.status_code == 200 and "DOE" not in r.get_data(as_text=True)


BAD_UPLOADS = {
    "text file": (b"hello, I am not an image", "notes.png", 415),
    "truncated png": (png_bytes(shape_image("cross", "green", size=128))[:300], "cut.png", 400),
    "empty": (b"", "empty.png", 400),
    "bomb": (png_bytes(Image.new("L", (12000, 12000))), "bomb.png", 413),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
@pytest.mark.parametrize("route", ["/api/similar", "/api/label"])
def test_bad_uploads_get_4xx_json(client, route, case):
    data, name, status = BAD_UPLOADS[case]
    r = client.post(route, data=_upload(data, name), content_type="multipart/form-data")
    assert r.status_code == status, r.json
    assert r.is_json and r.json["error"] and "Traceback" not in r.get_data(as_text=True)


def test_oversized_upload_is_413_json(client):
    big = b"\x89PNG" + b"0" * (3 * 1024 * 1024)
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + big + b"\r\n--XyZ--\r\n")  # raw, so the client spools nothing
    r = client.post("/api/similar", data=body, content_type="multipart/form-data; boundary=XyZ")
    assert r.status_code == 413 and r.is_json


def test_a_too_large_upload_on_the_page_keeps_the_form_and_says_the_limit(client):
    big = b"\x89PNG" + b"0" * (3 * 1024 * 1024)
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + big + b"\r\n--XyZ--\r\n")
    r = client.post("/upload", data=body, content_type="multipart/form-data; boundary=XyZ")
    page = r.get_data(as_text=True)
    limit = client.application.extensions["radlens_config"].max_upload_bytes / 2**20
    assert r.status_code == 413 and '<form class="upload"' in page and f"upload limit of {limit:.0f} MB" in page
    assert 'href="/upload"' in page  # navigation kept


def test_every_page_has_one_h1_a_skip_link_and_a_favicon(client, some_id):
    for url in ("/", "/?q=chest", "/upload", f"/image/{some_id}", "/no-such-page"):
        page = client.get(url).get_data(as_text=True)
        assert page.count("<h1") == 1 and 'href="#main"' in page and 'id="main"' in page, url
        assert 'rel="icon"' in page, url
    icon = client.get("/static/favicon.svg")
    assert icon.status_code == 200 and icon.get_data().startswith(b"<svg")
    icon.close()


def test_missing_file_field(client):
    r = client.post("/api/label", data={"k": "3"}, content_type="multipart/form-data")
    assert r.status_code == 400 and "image" in r.json["error"]


def test_image_routes(client, some_id):
    meta = client.get(f"/api/images/{some_id}")
    assert meta.status_code == 200 and len(meta.json["scores"]) == 14 and "path" not in meta.json
    labels = client.get(f"/api/images/{some_id}/labels")
    assert labels.status_code == 200 and len(labels.json["labels"]) == 14
    assert client.get(f"/api/images/{some_id}/thumbnail").data.startswith(b"\x89PNG")
    full = client.get(f"/api/images/{some_id}/full")
    assert full.mimetype == "image/png" and Image.open(io.BytesIO(full.data)).size == (64, 64)


def test_downloads(client, some_id):
    base = f"/api/images/{some_id}"
    assert client.get(f"{base}/report", query_string={"format": "json"}).json["technique"]
    md = client.get(f"{base}/report", query_string={"format": "md", "threshold": "0.3"})
    assert md.status_code == 200 and b"## Impression" in md.data
    assert client.get(f"{base}/report", query_string={"format": "pdf"}).data.startswith(b"%PDF")
    csv = client.get(f"{base}/findings.csv", query_string={"threshold": "0.5"}).get_data(as_text=True)
    assert csv.splitlines()[0] == "pathology,kind,value,uncertainty,threshold,positive,skill,low,high"
    assert len(csv.splitlines()) == 15
    assert len(client.get(f"{base}/findings.json").json) == 14
    assert client.get(f"{base}/chart.png").data.startswith(b"\x89PNG")
    assert b"<svg" in client.get(f"{base}/chart.svg").data
    assert client.get(f"{base}/chart.gif").status_code == 400
    assert client.get(f"{base}/report", query_string={"format": "doc"}).status_code == 400
    assert client.get(f"{base}/report", query_string={"threshold": "7"}).status_code == 400


@pytest.mark.parametrize("path", ["/api/images/999999", "/api/images/999999/thumbnail", "/api/images/999999/full",
                                  "/api/images/999999/report", "/api/images/0/labels", "/image/999999",
                                  f"/api/images/{2**63}", f"/api/images/{2**63 - 1}", f"/api/images/{2**64}/priors",
                                  f"/image/{2**63}", f"/api/images/{10**30}/report", f"/api/images/{2**31}",
                                  f"/api/images/{2**31}/labels", f"/image/{2**40}"])
def test_unknown_ids_are_404(client, path):
    r = client.get(path)
    assert r.status_code == 404


@pytest.mark.parametrize("path", ["/api/images/../../etc/passwd", "/api/images/%2e%2e%2fetc%2fpasswd/full",
                                  "/api/images/-1/full", "/api/images/1;DROP TABLE images/full",
                                  "/api/images//etc/passwd/thumbnail"])
def test_paths_never_reach_the_file_system(client, path):
    r = client.get(path)
    assert r.status_code in (404, 405) and b"root:" not in r.data


def test_openapi_lists_every_api_route(client, app):
    doc = client.get("/api/openapi.json").json
    assert doc["openapi"].startswith("3.")
    documented = {p.replace("{", "<").replace("}", ">") for p in doc["paths"]}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            normalised = rule.rule.replace("<image_id:image_id>", "<image_id>")
            assert normalised in documented, rule.rule


def test_pages_render(client, some_id, image_dir):
    home = client.get("/")
    assert home.status_code == 200 and b"images indexed" in home.data
    results = client.get("/", query_string={"q": "a red circle"})
    assert results.status_code == 200 and results.data.count(b'class="card"') == 12
    assert client.get("/", query_string={"q": "x", "filter": "bogus=1"}).status_code == 400
    page = client.get(f"/image/{some_id}")
    assert page.status_code == 200 and b"Zero-shot findings" in page.data and b"Disclaimer" in page.data
    assert b"not for clinical use" in page.data.lower() and b"the 14 labels apply" in page.data
    assert b'class="heatmap"' in page.data and b'class="summary"' in page.data and b"data-lang" in page.data
    german = client.get(f"/image/{some_id}", query_string={"lang": "de"})
    assert german.status_code == 200 and b"Beurteilung" in german.data and b"Hinweis" in german.data
    assert client.get(f"/image/{some_id}", query_string={"lang": "xx"}).status_code == 400
    assert client.get("/upload").status_code == 200
    up = client.post("/upload", data=_upload((image_dir / "gray" / "g3.png").read_bytes(), "g3.png"),
                     content_type="multipart/form-data")
    assert up.status_code == 200 and b"Similar cases" in up.data and b"g3.png" in up.data
    bad = client.post("/upload", data=_upload(b"nope", "n.png"), content_type="multipart/form-data")
    assert bad.status_code == 415 and b"not a recognised image" in bad.data


def test_an_upload_measures_its_image_statistics_once(client, image_dir, monkeypatch):
    """The page's similar cases and its labels both ask whether the upload is a radiological image; the
    model-free check (11 ms on a 2048-px film) runs once for both."""
    import cxrmodel.imaging.plausibility as plausibility

    calls = []
    measure = plausibility.measure
    monkeypatch.setattr(plausibility, "measure", lambda image: calls.append(image.size) or measure(image))
    up = client.post("/upload", data=_upload((image_dir / "gray" / "g5.png").read_bytes(), "g5.png"),
                     content_type="multipart/form-data")
    assert up.status_code == 200 and b"Similar cases" in up.data
    assert len(calls) == 1


def test_pages_use_no_external_resources(client, some_id):
    for path in ["/", f"/image/{some_id}", "/upload"]:
        html = client.get(path).get_data(as_text=True)
        assert "http://" not in html and "https://" not in html
    for asset in ("/static/app.js", "/static/style.css"):
        with client.get(asset) as r:  # file responses must be closed
            assert r.status_code == 200 and b"http" not in r.data


def test_token_enforcement(engine, some_id):
    app = create_app(ServeConfig(api_token="s3cret"), engine=engine)
    c = app.test_client()
    health = c.get("/api/health")
    assert health.status_code == 200 and set(health.json) == {"status", "version"}  # nothing about the server
    for path in ["/api/search?q=x", f"/api/images/{some_id}", "/api/openapi.json"]:
        assert c.get(path).status_code == 401, path
    for path in ["/", f"/image/{some_id}"]:  # pages answer 401 with the login form
        r = c.get(path)
        assert r.status_code == 401 and b'name="token"' in r.data, path
    assert c.get("/api/search?q=x", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/search?q=x", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert "vectors" in c.get("/api/health", headers={"Authorization": "Bearer s3cret"}).json
    # the token is accepted in the Authorization header only: never from a URL or another header
    assert c.get("/api/search?q=x&token=s3cret").status_code == 401
    assert c.get("/api/search?q=x", headers={"X-API-Token": "s3cret"}).status_code == 401
    assert c.get("/?token=s3cret").status_code == 401
    r = c.post("/api/label", data=_upload(png_bytes(shape_image("circle", "red"))), content_type="multipart/form-data")
    assert r.status_code == 401 and r.is_json


def test_browsers_log_in_once_and_keep_a_cookie_that_is_not_the_token(engine, some_id):
    app = create_app(ServeConfig(api_token="s3cret"), engine=engine)
    c = app.test_client()
    assert c.post("/login", data={"token": "wrong"}).status_code == 401
    r = c.post("/login", data={"token": "s3cret", "next": f"/image/{some_id}"})
    assert r.status_code == 303 and r.headers["Location"].endswith(f"/image/{some_id}")
    cookie = r.headers["Set-Cookie"]
    assert "s3cret" not in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert c.get(f"/image/{some_id}").status_code == 200
    assert c.get(f"/api/images/{some_id}/report?format=md").status_code == 200  # page downloads work
    assert c.post("/login", data={"token": "s3cret", "next": "https://elsewhere.example/"}).headers[
        "Location"] == "/"  # never sent to another site
    c.post("/logout")
    assert c.get(f"/image/{some_id}").status_code == 401


def test_the_label_ensemble_runs_once_per_image_for_page_charts_and_downloads(engine, app, some_id, monkeypatch):
    import search.labelling

    calls = []
    real = search.labelling.label_image
    monkeypatch.setattr(search.labelling, "label_image", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    engine._loader.current(force=True).labels._items.clear()  # start cold
    client = app.test_client()
    for path in (f"/image/{some_id}", f"/api/images/{some_id}/chart.png", f"/api/images/{some_id}/heatmap.svg",
                 f"/api/images/{some_id}/summary.png", f"/api/images/{some_id}/report?format=md&threshold=0.2",
                 f"/api/images/{some_id}/findings.csv?threshold=0.9", f"/image/{some_id}?lang=de&threshold=0.3",
                 f"/api/images/{some_id}/labels"):
        assert client.get(path).status_code == 200, path
    assert len(calls) == 1
    thresholds = {s["threshold"] for s in client.get(f"/api/images/{some_id}/labels").json["labels"]}
    assert 0.9 not in thresholds and 0.3 not in thresholds  # a request's threshold never leaks into the cache


def test_label_variants_are_made_at_the_model_input_size(engine, monkeypatch):
    import cxrmodel.labels.zeroshot

    sizes = []
    real = cxrmodel.labels.zeroshot.image_variants
    monkeypatch.setattr(cxrmodel.labels.zeroshot, "image_variants",
                        lambda image, names: sizes.append(image.size) or real(image, names))
    engine.label(Image.new("L", (3000, 2000), 128))
    assert sizes == [engine.encoder.preprocess.output_size[::-1]]


def test_heavy_requests_beyond_the_limit_get_503_with_retry_after(engine, some_id):
    from web.limits import SLOTS_KEY

    app = create_app(ServeConfig(api_token=None, heavy_requests=1, heavy_wait_seconds=0.05), engine=engine)
    client = app.test_client()
    slots = app.extensions[SLOTS_KEY]
    assert slots.acquire(timeout=1)  # another request is decoding a large image
    try:
        for r in (client.post("/api/label", data=_upload(png_bytes(shape_image("circle", "red"))),
                              content_type="multipart/form-data"),
                  client.get(f"/api/images/{some_id}/full"), client.get(f"/image/{some_id}")):
            assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
        assert client.get("/api/search", query_string={"q": "a red circle"}).status_code == 200  # not heavy
    finally:
        slots.release()
    assert client.get(f"/api/images/{some_id}/full").status_code == 200


def test_status_codes_come_from_error_types_not_messages():
    from cxrmodel.errors import DataError, ImageDecodeError, ImageTooLargeError, NotFoundError, UnsupportedImageError
    from web import status_for

    assert status_for(NotFoundError("anything at all")) == 404
    assert status_for(ImageTooLargeError("x")) == 413 and status_for(UnsupportedImageError("x")) == 415
    assert status_for(ImageDecodeError("over the limit, not a recognised format")) == 400  # words decide nothing
    assert status_for(DataError("no image with id 3")) == 400


def test_more_like_this_from_the_api_the_page_and_the_card(client, some_id):
    r = client.get(f"/api/images/{some_id}/similar", query_string={"k": 3})
    assert r.status_code == 200 and len(r.json["results"]) == 3
    assert some_id not in {h["id"] for h in r.json["results"]} and r.json["results"][0]["match"]
    assert client.get("/api/images/999999/similar").status_code == 404
    page = client.get("/", query_string={"like": some_id, "k": 3}).get_data(as_text=True)
    assert "Images like" in page and page.count('class="card"') == 3
    assert f'href="/?like={r.json["results"][0]["id"]}"' in page  # every card offers it again
    assert client.get("/", query_string={"like": "999999"}).status_code == 400
    assert f'href="/?like={some_id}"' in client.get(f"/image/{some_id}").get_data(as_text=True)


def test_result_pages_are_slices_of_one_ranking_with_counts_and_links(client):
    one = client.get("/", query_string={"q": "x", "k": 3}).get_data(as_text=True)
    two = client.get("/", query_string={"q": "x", "k": 3, "page": 2}).get_data(as_text=True)
    six = client.get("/api/search", query_string={"q": "x", "k": 6}).json["results"]
    ids = [re.findall(r'href="/image/(\d+)"', page) for page in (one, two)]
    assert [int(i) for i in ids[0] + ids[1]] == [h["id"] for h in six]  # page 2 continues page 1
    assert "Showing 1–3 of" in one and "Showing 4–6 of" in two and 'rel="next"' in one and 'rel="prev"' in two
    assert 'name="k" value="3"' in one  # k is on the form
    assert client.get("/", query_string={"q": "x", "k": 100, "page": 11}).status_code == 400


def test_several_filters_in_one_box_and_a_hint_for_a_value_no_image_has(client):
    both = client.get("/", query_string={"q": "x", "filter": "modality=CT, view=PA", "k": 50}).get_data(as_text=True)
    assert "of the" in both and "images the filters allow" in both
    api = client.get("/api/search", query_string={"q": "x", "k": 50, "filter": ["modality=CT", "view=PA"]}).json
    assert both.count('class="card"') == len(api["results"]) > 0
    spaced = client.get("/", query_string={"q": "x", "filter": "modality=CT view=PA", "k": 50}).get_data(as_text=True)
    assert spaced.count('class="card"') == len(api["results"])
    hint = client.get("/", query_string={"q": "x", "filter": "modality=c-t"}).get_data(as_text=True)
    assert "no image has modality &#39;c-t&#39;; did you mean &#39;CT&#39;?" in hint


@pytest.mark.parametrize("text, parts", [
    ("modality=CT, view=PA", ["modality=CT", "view=PA"]),
    ("modality=CT view=AP supine effusion >= 0.6", ["modality=CT", "view=AP supine", "effusion >= 0.6"]),
    ("  ", []),
])
def test_split_filter_text(text, parts):
    from search.filters import split_filter_text

    assert split_filter_text(text) == parts


def test_facets_count_under_the_filters_and_chips_remove_them(client, engine):
    page = client.get("/", query_string={"q": "x"}).get_data(as_text=True)
    everything = engine.facets()
    assert "data-facets" in page and f"CT</a> <span class=\"count\">({everything['modality']['CT']})" in page
    narrowed = client.get("/", query_string={"q": "x", "filter": "modality=CT"}).get_data(as_text=True)
    ct = engine.facets(engine.parse_filters(["modality=CT"]))
    assert set(ct["modality"]) == {"CT"} and sum(ct["view"].values()) == everything["modality"]["CT"]
    assert f"PA</a> <span class=\"count\">({ct['view']['PA']})" in narrowed  # counts under the filter
    assert 'href="/?q=x&amp;k=12"' in narrowed and "remove filter modality=CT" in narrowed  # the chip
    assert 'filter=modality%3DCT,+view%3DPA"' in narrowed  # a facet adds its filter to the active ones


def _render_first_page(pdf: bytes) -> tuple[np.ndarray, str]:
    """(grayscale pixels at 72 dpi, text) of a PDF's first page, rendered by PDFium."""
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(pdf)
    page = doc[0]
    pixels = np.asarray(page.render(scale=1).to_pil().convert("L"))
    text = page.get_textpage().get_text_range()
    doc.close()
    return pixels, text


def test_the_pdf_report_stands_alone_with_image_provenance_and_figures(client, engine, some_id):
    pdf = client.get(f"/api/images/{some_id}/report", query_string={"format": "pdf", "threshold": "0.4"}).data
    pixels, text = _render_first_page(pdf)
    meta = engine.get(some_id)
    assert meta["file_name"] in text and meta["content_hash"][:12] in text
    assert "Threshold: 0.40" in text and "Model: " in text and engine.encoder.fingerprint[:12] in text
    assert "Generated: " in text and "Language: en" in text
    width = pixels.shape[1]
    thumbnail = pixels[40:200, width - 170:width - 40]  # top right, where the thumbnail sits (55 mm wide)
    assert thumbnail.std() > 10 and (thumbnail < 250).mean() > 0.5  # an image there, not blank paper
    import pypdfium2 as pdfium

    assert len(pdfium.PdfDocument(pdf)) >= 3  # the report, then the chart and the heatmap pages


def test_the_upload_page_offers_the_same_downloads(client):
    r = client.post("/upload", data=_upload(png_bytes(gray_image(4, (96, 96))), "film.png"),
                    content_type="multipart/form-data")
    page = r.get_data(as_text=True)
    links = {name: (mime, data) for mime, data, name in
             re.findall(r'href="data:([^;]+);base64,([^"]+)" download="([^"]+)"', page)}
    assert set(links) == {"report.pdf", "report.md", "findings.csv"}
    import base64

    _, text = _render_first_page(base64.b64decode(links["report.pdf"][1]))
    assert "film.png" in text and "RadLens report" in text
    assert base64.b64decode(links["report.md"][1]).decode().startswith("# RadLens report")


def test_dicom_window_presets_and_zoom_on_the_image_page(tmp_path, tiny_encoder):
    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig
    from web import ServeConfig, create_app

    hu = np.repeat(np.array([[-1000, -700, 40, 1000]], dtype=np.int16), 16, axis=0).repeat(16, axis=1)
    src = tmp_path / "src"
    src.mkdir()
    write_dicom(src / "ct.dcm", (hu + 1024).astype(np.uint16), Modality="CT", BodyPartExamined="CHEST",
                RescaleIntercept=-1024, RescaleSlope=1, WindowCenter=40, WindowWidth=400)
    write_dicom(src / "cr.dcm", (hu + 1024).astype(np.uint16), Modality="CR", BodyPartExamined="CHEST")
    gray_image(1, (64, 64)).save(src / "film.png")
    data = tmp_path / "data"
    run_index(IndexJob(sources=[str(src)], data_dir=data, workers=0, progress=False), tiny_encoder)
    engine = Engine.open(EngineConfig(data_dir=data), encoder=tiny_encoder)
    client = create_app(ServeConfig(api_token=None), engine=engine).test_client()
    ids = {h.image["file_name"]: h.id for h in engine.text("x", k=10)}
    ct = client.get(f"/image/{ids['ct.dcm']}", query_string={"window": "lung"}).get_data(as_text=True)
    assert 'aria-label="display window"' in ct
    assert all(f">{w}</a>" in ct for w in ("file", "full", "lung", "mediastinum", "bone", "brain"))
    assert f'src="/api/images/{ids["ct.dcm"]}/full?window=lung"' in ct and "data-zoom" in ct
    lung = client.get(f"/api/images/{ids['ct.dcm']}/full", query_string={"window": "lung"})
    bone = client.get(f"/api/images/{ids['ct.dcm']}/full", query_string={"window": "bone"})
    assert lung.status_code == bone.status_code == 200 and lung.data != bone.data
    cr = client.get(f"/image/{ids['cr.dcm']}").get_data(as_text=True)
    assert ">full</a>" in cr and ">lung</a>" not in cr  # HU presets for CT only
    assert client.get(f"/api/images/{ids['cr.dcm']}/full", query_string={"window": "lung"}).status_code == 400
    assert 'aria-label="display window"' not in client.get(f"/image/{ids['film.png']}").get_data(as_text=True)
    assert client.get(f"/api/images/{ids['film.png']}/full", query_string={"window": "lung"}).status_code == 400
    engine.close()


def test_compare_view_from_more_like_this(client, engine, some_id):
    like = client.get("/", query_string={"like": some_id, "k": 2}).get_data(as_text=True)
    other = engine.similar_to(some_id, k=1)[0]
    assert f'href="/compare?a={some_id}&amp;b={other.id}"' in like
    page = client.get("/compare", query_string={"a": some_id, "b": other.id}).get_data(as_text=True)
    names = engine.get(some_id)["file_name"], other.image["file_name"]
    assert page.count("<h1") == 1 and all(n in page for n in names) and page.count("data-applicability") == 2
    assert f"{engine.similarity(some_id, other.id):.3f}" in page and f"{other.score:.3f}" in page
    assert client.get("/compare", query_string={"a": some_id}).status_code == 400
    assert client.get("/compare", query_string={"a": some_id, "b": 999999}).status_code == 404


def test_the_summary_card_and_heatmap_have_text_equivalents(client, engine, some_id):
    from cxrmodel.reporting.charts import summary_lines

    page = client.get(f"/image/{some_id}").get_data(as_text=True)
    _, scores, decision, _ = engine.report_for_id(some_id)
    assert f'alt="{". ".join(summary_lines(scores, decision))}"' in page
    assert "Heatmap as a table" in page and page.count('<th scope="row">') == 4  # the four categories


def test_a_range_control_for_assessed_pathologies_only(client, engine):
    page = client.get("/", query_string={"q": "x"}).get_data(as_text=True)
    assert '<select name="pathology">' in page and '<option value="Effusion">' in page  # all 14 forced assessed
    ranged = client.get("/", query_string={"q": "x", "pathology": "Effusion", "min": "0.5", "k": 50})
    api = client.get("/api/search", query_string={"q": "x", "k": 50, "filter": "Effusion>=0.5"}).json
    assert ranged.get_data(as_text=True).count('class="card"') == len(api["results"])
    assert "Effusion&gt;=0.5" in ranged.get_data(as_text=True)  # shown as an active, removable filter


def test_the_uploader_can_state_modality_body_part_and_view(client):
    data = png_bytes(gray_image(4, (96, 96)))
    stated = client.post("/api/label", data=_upload(data, modality="CR", body_part="chest", view="PA"),
                         content_type="multipart/form-data").json
    assert stated["applicability"]["source"] == "metadata" and stated["applicability"]["applicable"]
    assert stated["applicability"]["view"] == "PA" and "CR of the chest (PA view)" in stated["report"]["technique"]
    ct = client.post("/api/label", data=_upload(data, modality="CT", body_part="head"),
                     content_type="multipart/form-data").json
    assert not ct["applicability"]["applicable"] and ct["labels"] == []
    page = client.post("/upload", data=_upload(data, modality="CT"), content_type="multipart/form-data")
    assert "modality is CT" in page.get_data(as_text=True)
    assert 'name="body_part"' in client.get("/upload").get_data(as_text=True)


def test_facet_counts_are_counted_once_per_state_and_filter(engine, monkeypatch):
    calls = []
    real = engine.catalog.facet_counts
    monkeypatch.setattr(engine.catalog, "facet_counts", lambda *a: calls.append(a) or real(*a))
    ct = engine.parse_filters(["modality=CT"])
    first = engine.facets(ct)
    assert engine.facets(engine.parse_filters(["MODALITY=ct"])) == first and engine.facets(ct) == first
    assert len(calls) <= 1  # zero when an earlier test already counted this filter in the same state


def test_the_api_refuses_repeated_or_empty_single_parameters_and_names_allowed_methods(client, some_id):
    """What the API fuzzer found: `?threshold=&threshold=x` and `?window=` were answered 200 (the first or
    a default value silently used), and a 405 did not say which methods are allowed."""
    assert client.get("/api/search", query_string=[("q", "a"), ("q", "b")]).status_code == 400
    assert client.get(f"/api/images/{some_id}/chart.svg?threshold=&threshold=0.5").status_code == 400
    assert client.get(f"/api/images/{some_id}/full?window=").status_code == 400
    assert client.get("/api/search?q=a+red+circle&k=").status_code == 400
    refused = client.open("/api/health", method="TRACE")
    assert refused.status_code == 405 and "GET" in refused.headers["Allow"]
    assert client.get("/?q=a+red+circle&k=").status_code == 200  # a blank form field on a page stays fine
