"""The exact shortcuts of cxrmodel.model.fastpath and the mixed-precision encoder equal the plain model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cxrmodel.model.encoder import EncoderConfig, load_encoder
from cxrmodel.model.fastpath import apply_fastpaths, choose_attention, fold_quick_gelu, pool_only_last_layer
from cxrmodel.model.lora import LoraSettings, apply_lora
from tests.imagegen import shape_image
from tests.tinymodel import tiny_clip_config


@pytest.fixture()
def tiny_clip():
    from transformers import CLIPModel

    torch.manual_seed(3)
    return CLIPModel(tiny_clip_config(vocab_size=60, eos_id=1, bos_id=0)).eval()


def _pixels(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    return model.get_image_features(pixel_values=pixels).pooler_output


def test_class_token_only_last_layer_gives_the_same_embeddings(tiny_clip):
    pixels = _pixels()
    expected = _image_features(tiny_clip, pixels)
    fast = copy.deepcopy(tiny_clip)
    assert pool_only_last_layer(fast)
    # the last layer really runs on one token now (the shortcut is taken, not silently ignored)
    assert fast.vision_model(pixel_values=pixels).last_hidden_state.shape[1] == 1
    assert tiny_clip.vision_model(pixel_values=pixels).last_hidden_state.shape[1] > 1
    torch.testing.assert_close(_image_features(fast, pixels), expected, atol=1e-5, rtol=1e-5)


def test_shortcuts_give_the_same_lora_gradients(tiny_clip):
    """Training through the shortcuts updates the adapters exactly as the plain model would."""
    settings = LoraSettings(dropout=0.0, init_weights=False)  # B != 0 so that every adapter gets a gradient
    plain = apply_lora(copy.deepcopy(tiny_clip), settings)
    fast = copy.deepcopy(plain)
    apply_fastpaths(fast, torch.device("cpu"))
    pixels, ids = _pixels(4), torch.randint(2, 60, (4, 7), generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (plain, fast):
        model.train()
        img = _image_features(model, pixels)
        txt = model.get_text_features(input_ids=ids).pooler_output
        (img @ txt.T).logsumexp(dim=1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, grad in grads[0].items():
        assert grad is not None and grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_eager_attention_on_cpu_matches_sdpa(tiny_clip):
    pixels = _pixels()
    tiny_clip.set_attn_implementation("sdpa")
    expected = _image_features(tiny_clip, pixels)
    assert choose_attention(tiny_clip, torch.device("cpu")) == "eager"
    assert tiny_clip.config._attn_implementation == "eager"
    torch.testing.assert_close(_image_features(tiny_clip, pixels), expected, atol=1e-5, rtol=1e-5)


def test_a_vision_tower_that_is_not_clips_is_left_alone():
    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model = torch.nn.Linear(2, 2)

    model = Other()
    forward = model.vision_model.forward
    assert not pool_only_last_layer(model)
    assert model.vision_model.forward == forward


def test_bf16_keeps_norms_and_residuals_in_fp32(tiny_model_dir):
    """Only matmul weights are lowered; norms and embeddings stay fp32, so the residual stream does."""
    images = [shape_image(s, c, seed=i) for i, (s, c) in enumerate([("circle", "red"), ("square", "green"),
                                                                     ("triangle", "blue"), ("cross", "yellow")])]
    bf16 = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="bf16"))
    vision = bf16.model.vision_model
    assert vision.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert vision.encoder.layers[0].layer_norm1.weight.dtype == torch.float32
    assert vision.embeddings.position_embedding.weight.dtype == torch.float32
    exact = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32"))
    cos = np.sum(bf16.encode_images(images) * exact.encode_images(images), axis=1)
    assert cos.min() >= 0.999, cos


def test_folded_quick_gelu_gives_the_same_embeddings(tiny_clip):
    pixels, ids = _pixels(), torch.randint(2, 60, (3, 6), generator=torch.Generator().manual_seed(4))
    image, text = _image_features(tiny_clip, pixels), tiny_clip.get_text_features(input_ids=ids).pooler_output
    folded = copy.deepcopy(tiny_clip)
    assert fold_quick_gelu(folded) == 0  # trainable weights are never touched
    folded.requires_grad_(False)
    assert fold_quick_gelu(folded) == 4  # two layers per tower
    assert isinstance(folded.vision_model.encoder.layers[0].mlp.activation_fn, torch.nn.SiLU)
    torch.testing.assert_close(_image_features(folded, pixels), image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded.get_text_features(input_ids=ids).pooler_output, text, atol=1e-5, rtol=1e-5)


def test_an_mlp_with_an_unmerged_adapter_is_not_folded(tiny_clip):
    wrapped = apply_lora(tiny_clip, LoraSettings(targets=("fc1",), init_weights=False))  # freezes the rest
    pixels = _pixels()
    wrapped.eval()
    expected = _image_features(wrapped, pixels)
    assert fold_quick_gelu(wrapped) == 0
    torch.testing.assert_close(_image_features(wrapped, pixels), expected)


def test_the_class_token_patch_applies_only_to_checked_transformers_releases(tiny_clip, monkeypatch, caplog):
    import transformers

    from cxrmodel.model.fastpath import pool_only_last_layer, transformers_checked

    assert transformers_checked()  # the installed release is one the equality tests above pin
    assert transformers_checked("5.24.0") and not transformers_checked("6.0.0") and not transformers_checked("4.57.1")
    monkeypatch.setattr(transformers, "__version__", "6.1.0")
    last = tiny_clip.vision_model.encoder.layers[-1]
    before = last.forward
    with caplog.at_level("WARNING", logger="cxrmodel.model.fastpath"):
        assert pool_only_last_layer(tiny_clip) is False
    assert last.forward == before and "outside the releases" in caplog.text
