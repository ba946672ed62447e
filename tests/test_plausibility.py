"""Out-of-distribution uploads: noise, flat colours, gradients, text and photographs are not radiological
images, and get no labels -- never a confident CT or MRI."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cxrmodel.imaging.plausibility import assess
from tests.imagegen import gray_image, png_bytes


def _text_page() -> Image.Image:
    page = Image.new("L", (400, 200), 255)
    draw = ImageDraw.Draw(page)
    for i in range(8):
        draw.text((10, 10 + 22 * i), "The quick brown fox jumps over the lazy dog 0123", fill=0)
    return page


RNG = np.random.default_rng(0)
SYNTHETIC = {
    "colour noise": Image.fromarray(RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)),
    "gray noise": Image.fromarray(RNG.integers(0, 256, (256, 256), dtype=np.uint8)),
    "flat red": Image.new("RGB", (64, 64), (255, 0, 0)),
    "one red pixel": Image.new("RGB", (1, 1), (255, 0, 0)),
    "flat gray": Image.new("L", (128, 128), 128),
    "linear gradient": Image.fromarray(np.tile(np.linspace(0, 255, 256), (256, 1)).astype(np.uint8)),
    "radial gradient": Image.fromarray((np.hypot(*np.mgrid[-128:128, -128:128]) / 181 * 255).astype(np.uint8)),
    "text": _text_page(),
}
PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket")  # scikit-image's bundled colour photographs


def _photo(name: str) -> Image.Image:
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(getattr(data, name)())


@pytest.mark.parametrize("name", [*SYNTHETIC, *PHOTOGRAPHS])
def test_non_radiological_images_are_recognised(name):
    image = SYNTHETIC[name] if name in SYNTHETIC else _photo(name)
    verdict = assess(image)
    assert not verdict.radiological, verdict


@pytest.mark.parametrize("seed", range(5))
def test_radiograph_like_images_pass(seed):
    assert assess(gray_image(seed, (128, 96))).radiological


@pytest.mark.parametrize("name", ["colour noise", "one red pixel", "astronaut"])
def test_an_out_of_distribution_upload_gets_no_labels_and_no_modality_guess(client, name):
    image = SYNTHETIC[name] if name in SYNTHETIC else _photo(name)
    r = client.post("/api/label", data={"image": (io.BytesIO(png_bytes(image)), "upload.png")},
                    content_type="multipart/form-data")
    assert r.status_code == 200
    applicability = r.json["applicability"]
    assert not applicability["applicable"] and applicability["kind"] == "not a radiological image"
    assert applicability["source"] == "image statistics" and r.json["labels"] == []
    text = r.get_data(as_text=True)
    assert "looks like CT" not in text and "looks like MRI" not in text
    assert "not a radiological image" in r.json["report"]["impression"][0]
