"""The fp32 image tower on ONNX Runtime: chosen from the CPU's features, checked equal to torch, and an
index built with it holds the vectors a torch run makes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cxrmodel.model.encoder as encoder_module
from cxrmodel.model.encoder import EncoderConfig, choose_dtype, load_encoder
from cxrmodel.model.image_onnx import build_image_tower, choose_image_backend, use_onnx_image_tower
from tests.imagegen import gray_folder, gray_image, shape_image


@pytest.mark.parametrize(("bf16_cpu", "precision", "device", "expected"), [
    (True, "auto", "cpu", "torch"),  # AVX-512 BF16 or AMX: bf16 on torch (measured faster than ORT int8 at 0.98)
    (False, "auto", "cpu", "onnx"),  # neither: auto is fp32, and ORT's fp32 is 1.9x torch's (bench.int8_image)
    (True, "fp32", "cpu", "onnx"),
    (False, "bf16", "cpu", "torch"),
    (True, "fp32", "cuda", "torch"),
])
def test_the_backend_follows_the_cpus_measured_features(monkeypatch, bf16_cpu, precision, device, expected):
    monkeypatch.setattr(encoder_module, "cpu_supports_bf16", lambda: bf16_cpu)
    numerics = encoder_module.NUMERICS[choose_dtype(precision, torch.device("cpu"))]
    assert choose_image_backend(numerics, device, onnx_available=True) == expected
    assert choose_image_backend(numerics, device, onnx_available=False) == "torch"


def test_the_onnx_tower_embeds_as_the_torch_tower(tiny_model_dir):
    encoder = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32"))
    images = [gray_image(5, (70, 60)), shape_image("circle", "green"), gray_image(6)]
    expected = encoder.encode_images(images)
    encoder.image_tower = build_image_tower(encoder)
    assert encoder.image_tower.min_cosine >= 0.9999
    np.testing.assert_allclose(encoder.encode_images(images), expected, atol=1e-5)


def test_a_bf16_encoder_keeps_torch(tiny_model_dir):
    encoder = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="bf16"))
    assert use_onnx_image_tower(encoder) == "image tower: torch (bf16 on cpu)" and encoder.image_tower is None


def test_an_index_run_on_onnx_holds_the_vectors_a_torch_run_makes(tiny_model_dir, tmp_path):
    from indexer.pipeline import IndexJob, run_index
    from tests.databases import fetch

    images = gray_folder(tmp_path / "images", 10)
    vectors = {}
    for name, threshold in (("onnx", 1), ("torch", 10**9)):
        encoder = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32"))
        summary = run_index(IndexJob(sources=[str(images)], data_dir=tmp_path / name, workers=0, progress=False,
                                     onnx_image_from=threshold, query_tower=False), encoder)
        assert summary.image_backend.startswith("image tower: ONNX Runtime") == (name == "onnx")
        assert encoder.image_tower is None  # the caller's encoder is left as it was
        from indexer.store import default_db_url

        rows = fetch(default_db_url(tmp_path / name), "select i.path, e.vector from embeddings e join images i "
                                                       "on i.id = e.image_id")
        vectors[name] = {p: np.frombuffer(v, "<f4") for p, v in rows}
    assert vectors["onnx"].keys() == vectors["torch"].keys()
    for path, vector in vectors["torch"].items():
        np.testing.assert_allclose(vectors["onnx"][path], vector, atol=1e-5)
