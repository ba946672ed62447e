"""Model loading and encoding: local dirs, clear errors, unit norm, bf16 agreement, preprocessing parity."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cxrmodel.errors import ModelLoadError
from cxrmodel.model.config import resolve_model_name
from cxrmodel.model.encoder import EncoderConfig, load_encoder
from tests.imagegen import gray_image, shape_image


def test_encodings_are_unit_norm_and_deterministic(tiny_encoder):
    images = [shape_image("circle", "red", seed=1), gray_image(3)]
    a = tiny_encoder.encode_images(images)
    b = tiny_encoder.encode_images(images)
    assert a.dtype == np.float32 and a.shape == (2, tiny_encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, b)
    t = tiny_encoder.encode_texts(["a chest x-ray", "mri of the brain " * 40])  # second one is truncated
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert tiny_encoder.encode_texts([]).shape == (0, tiny_encoder.dim)


def test_batching_does_not_change_results(tiny_model_dir):
    images = [shape_image(s, "blue", seed=i) for i, s in enumerate(["circle", "square", "cross"] * 3)]
    one = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32", batch_size=1))
    many = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32", batch_size=4))
    np.testing.assert_allclose(one.encode_images(images), many.encode_images(images), atol=1e-5)


def test_bf16_agrees_with_fp32(tiny_model_dir):
    images = [shape_image(s, c, seed=i) for i, (s, c) in enumerate([("circle", "red"), ("square", "green"),
                                                                     ("triangle", "blue"), ("cross", "yellow")])]
    fp32 = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32"))
    bf16 = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="bf16"))
    assert str(bf16.dtype) == "torch.bfloat16"
    cos = np.sum(fp32.encode_images(images) * bf16.encode_images(images), axis=1)
    assert cos.min() >= 0.99, cos


def test_missing_local_model_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_encoder(EncoderConfig(model=str(tmp_path / "nowhere")))
    assert "nowhere" in str(err.value) and "--model DIR" in str(err.value)


def test_unreachable_hub_id_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_encoder(EncoderConfig(model="openai/clip-vit-base-patch32"))
    msg = str(err.value)
    assert "openai/clip-vit-base-patch32" in msg and "RADLENS_MODEL" in msg and "\n" not in msg


def test_model_resolution_order(monkeypatch):
    monkeypatch.delenv("RADLENS_MODEL", raising=False)
    assert resolve_model_name(None) == "openai/clip-vit-base-patch32"
    monkeypatch.setenv("RADLENS_MODEL", "/models/mine")
    assert resolve_model_name(None) == "/models/mine"
    assert resolve_model_name("/cli/choice") == "/cli/choice"


def test_preprocessing_matches_transformers_clip_processor(tiny_model_dir):
    """Our single copy of preprocessing equals CLIPImageProcessor on the real ViT-B/32 settings: under 6 x the
    model's input as it is, over it with the block averaging first turned off (`reducing_gap=None`)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from cxrmodel.imaging.preprocess import ImagePreprocess

    reference = CLIPImageProcessorPil()
    ours = ImagePreprocess.from_dict(reference.to_dict())
    full = dataclasses.replace(ours, reducing_gap=None)
    for im, preprocess in [(shape_image("circle", "red", size=300, seed=1), ours), (gray_image(2, (500, 333)), ours),
                           (gray_image(3, (200, 640)), ours), (gray_image(4, (1400, 1300)), ours),
                           (gray_image(5, (1500, 1400)), full)]:
        expected = reference(images=im.convert("RGB"), return_tensors="np")["pixel_values"][0]
        got = preprocess.to_tensor([im]).numpy()[0]
        assert got.shape == expected.shape == (3, 224, 224)
        assert np.abs(got - expected).max() < 0.02  # one 8-bit step after normalisation


TEXTS = ["a chest x-ray showing cardiomegaly", "lateral lumbar spine radiograph", "mri of the brain"]


def _auto_and_fp32(model_dir, monkeypatch, int8_bar: float):
    """An `auto` and an fp32 encoder of one model, with the int8 text tower's bar set to `int8_bar`."""
    import cxrmodel.model.encoder as encoder_module
    from cxrmodel.model.encoder import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("auto precision is fp32 on this CPU")
    monkeypatch.setattr(encoder_module, "INT8_TEXT_MIN_COSINE", int8_bar)
    return (load_encoder(EncoderConfig(model=str(model_dir), precision="auto")),
            load_encoder(EncoderConfig(model=str(model_dir), precision="fp32")))


def test_auto_precision_runs_an_int8_text_tower_where_it_measures_close(tiny_model_dir, monkeypatch):
    """Where int8 stays within the bar (the tiny random tower: ~0.99, so the bar is lowered here), the
    text tower runs quantised; its vectors stay unit length and close to fp32."""
    auto, exact = _auto_and_fp32(tiny_model_dir, monkeypatch, 0.95)
    assert "quantized" in type(auto.model.text_projection).__module__
    cos = np.sum(auto.encode_texts(TEXTS) * exact.encode_texts(TEXTS), axis=1)
    assert cos.min() >= 0.95, cos
    np.testing.assert_allclose(np.linalg.norm(auto.encode_texts(TEXTS), axis=1), 1.0, atol=1e-5)
    assert auto.int8_text_cosine >= 0.95 and exact.int8_text_cosine is None


def test_auto_precision_keeps_the_unquantised_text_tower_where_int8_strays(tiny_model_dir, monkeypatch):
    """The int8 text tower is a measured choice, not a rule: where it is not close enough to the bf16 one
    (here: a bar no tower can meet), the encoder keeps bf16 text, within 0.9999 of fp32."""
    auto, exact = _auto_and_fp32(tiny_model_dir, monkeypatch, 1.01)
    assert "quantized" not in type(auto.model.text_projection).__module__ and auto.int8_text_cosine < 1.01
    assert np.sum(auto.encode_texts(TEXTS) * exact.encode_texts(TEXTS), axis=1).min() >= 0.9999


def test_the_bundled_models_text_vectors_under_auto_precision_match_fp32():
    """radlens-mini's MiniLM + LoRA text tower strays in int8 (min cosine 0.87 to fp32 on the check prompts):
    under `auto` it must run unquantised, so its prompt bank and queries are the model's own."""
    from cxrmodel.model.encoder import cpu_supports_bf16
    from cxrmodel.model.query_tower import CHECK_PROMPTS

    if not cpu_supports_bf16():
        pytest.skip("auto precision is fp32 on this CPU")
    auto = load_encoder(EncoderConfig(model="radlens-mini", precision="auto"))
    exact = load_encoder(EncoderConfig(model="radlens-mini", precision="fp32"))
    cos = np.sum(auto.encode_texts(CHECK_PROMPTS) * exact.encode_texts(CHECK_PROMPTS), axis=1)
    assert cos.min() >= 0.998, cos


def test_a_checkpoint_saved_by_transformers_5_loads_with_its_processor_config(tiny_model_dir, tmp_path):
    """`CLIPModel.save_pretrained` + `CLIPProcessor.save_pretrained` (transformers 5) write the image
    processor inside processor_config.json, not preprocessor_config.json: both layouts load alike."""
    import json
    import shutil

    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    saved = tmp_path / "t5"
    CLIPModel.from_pretrained(tiny_model_dir).save_pretrained(saved)
    settings = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    CLIPProcessor(image_processor=CLIPImageProcessor(**settings),
                  tokenizer=CLIPTokenizerFast.from_pretrained(tiny_model_dir)).save_pretrained(saved)
    assert (saved / "processor_config.json").exists() and not (saved / "preprocessor_config.json").exists()
    old, new = (load_encoder(EncoderConfig(model=str(d), precision="fp32")) for d in (tiny_model_dir, saved))
    images = [gray_image(1, (90, 70)), shape_image("circle", "red")]
    assert new.preprocess == old.preprocess
    np.testing.assert_allclose(new.encode_images(images), old.encode_images(images), atol=1e-6)

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "processor_config.json").write_text('{"processor_class": "CLIPProcessor"}')
    with pytest.raises(ModelLoadError, match="no image_processor section"):
        load_encoder(EncoderConfig(model=str(broken), precision="fp32"))
    (broken / "processor_config.json").unlink()
    with pytest.raises(ModelLoadError, match="no preprocessor_config.json or processor_config.json"):
        load_encoder(EncoderConfig(model=str(broken), precision="fp32"))


def test_an_unreachable_hub_reads_the_cache_only_and_says_so(monkeypatch, tmp_path):
    """No half-minute of retries: with the hub unreachable, a hub id loads from the local cache or fails at
    once with the reason and how to point at a local copy."""
    import socket
    import time

    from cxrmodel.errors import ModelLoadError
    from cxrmodel.model import encoder as enc

    with socket.socket() as closed:  # a free loopback port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    assert enc.hub_reachable(timeout=1.0) is False
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as caught:
        enc.load_pretrained_parts("someone/some-clip")
    assert time.monotonic() - started < 10
    assert "not reachable from this machine" in str(caught.value) and "--model DIR" in str(caught.value)
