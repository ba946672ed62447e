"""Every checkpoint format RadLens loads -- transformers 5 CLIP (processor_config.json), a legacy CLIP
(preprocessor_config.json), a VisionTextDualEncoder, open_clip's CLIP and open_clip's timm-ViT + BERT
(BiomedCLIP) layout -- indexes, searches, labels and trains a LoRA step; open_clip's layouts convert
exactly (written here with open_clip's key names, from models built in code: no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrmodel.errors import ModelLoadError
from cxrmodel.model.encoder import EncoderConfig, load_encoder, load_pretrained_parts
from cxrmodel.model.openclip import CLIP_KEYS, CONFIG_FILE, TIMM_HF_KEYS, invert_keys
from tests.imagegen import gray_folder, gray_image, shape_image

FORMATS = ("transformers CLIP (processor_config.json)", "transformers CLIP (preprocessor_config.json)",
           "transformers dual encoder", "open_clip (CLIP)", "open_clip (timm ViT + Hugging Face text)")


def save_open_clip_clip(directory: Path, source: Path, weights: str = "safetensors") -> Path:
    """The tiny CLIP of `source` written in open_clip's hub layout (its key names and config)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(source)
    cfg = model.config
    state = {k: v.contiguous() for k, v in invert_keys(model.state_dict(), CLIP_KEYS).items()}
    directory.mkdir(parents=True)
    if weights == "safetensors":
        save_file(state, str(directory / "open_clip_model.safetensors"))
    else:
        torch.save(state, directory / "open_clip_pytorch_model.bin")
    v, t = cfg.vision_config, cfg.text_config
    model_cfg = {"embed_dim": cfg.projection_dim, "quick_gelu": v.hidden_act == "quick_gelu",
                 "vision_cfg": {"layers": v.num_hidden_layers, "width": v.hidden_size, "patch_size": v.patch_size,
                                "image_size": v.image_size, "head_width": v.hidden_size // v.num_attention_heads,
                                "mlp_ratio": v.intermediate_size / v.hidden_size},
                 "text_cfg": {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size,
                              "width": t.hidden_size, "heads": t.num_attention_heads, "layers": t.num_hidden_layers,
                              "mlp_ratio": t.intermediate_size / t.hidden_size}}
    (directory / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


def save_open_clip_biomed(directory: Path, bert_dir: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A BiomedCLIP-layout checkpoint: a tiny timm-style ViT (64 wide, one head per 64) + the tiny BERT of
    `bert_dir` with an MLP projection; the text model's files in `text_model/`. Returns (dir, source model)."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer, ViTConfig, ViTModel

    from cxrmodel.model.openclip_dual import OpenClipDualEncoder

    torch.manual_seed(seed)
    vit = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128,
                             image_size=32, patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu"),
                   add_pooling_layer=False)
    source = OpenClipDualEncoder.build(vit, AutoModel.from_pretrained(bert_dir, add_pooling_layer=False),
                                       projection_dim=8, text_proj="mlp").eval()
    directory.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in invert_keys(source.state_dict(), TIMM_HF_KEYS).items()
             if not k.endswith("position_ids")}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    (directory / CONFIG_FILE).write_text(json.dumps({"model_cfg": {
        "embed_dim": 8,
        "vision_cfg": {"timm_model_name": "vit_tiny_patch8_32", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 32},
        "text_cfg": {"hf_model_name": "microsoft/tiny-test-bert", "hf_tokenizer_name": "microsoft/tiny-test-bert",
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 32}}}))
    (directory / "text_model").mkdir()
    AutoModel.from_pretrained(bert_dir).config.save_pretrained(directory / "text_model")
    AutoTokenizer.from_pretrained(bert_dir).save_pretrained(directory / "text_model")
    return directory, source


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    from tests.tinymodel import save_tiny_bert, save_tiny_dual_encoder

    root = tmp_path_factory.mktemp("formats")
    bert = save_tiny_bert(root / "bert")
    t5 = root / "t5"
    CLIPModel.from_pretrained(tiny_model_dir).save_pretrained(t5)
    CLIPProcessor(image_processor=CLIPImageProcessor(**json.loads((tiny_model_dir / "preprocessor_config.json")
                                                                  .read_text())),
                  tokenizer=CLIPTokenizerFast.from_pretrained(tiny_model_dir)).save_pretrained(t5)
    return {FORMATS[0]: t5, FORMATS[1]: tiny_model_dir,
            FORMATS[2]: save_tiny_dual_encoder(root / "vtde", bert),
            FORMATS[3]: save_open_clip_clip(root / "open_clip", tiny_model_dir),
            FORMATS[4]: save_open_clip_biomed(root / "biomed", bert)[0]}


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_an_open_clip_clip_converts_exactly(tiny_model_dir, tmp_path, weights):
    from transformers import CLIPModel

    directory = save_open_clip_clip(tmp_path / "oc", tiny_model_dir, weights)
    converted, tokenizer, preprocess = load_pretrained_parts(str(directory))
    original = CLIPModel.from_pretrained(tiny_model_dir).eval()
    theirs = original.state_dict()
    for key, value in converted.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    pixels = torch.rand(2, 3, 32, 32)
    ids = tokenizer(["a red circle", "x"], padding=True, return_tensors="pt")
    with torch.no_grad():
        for ours, ref in ((converted.get_image_features(pixel_values=pixels),
                           original.get_image_features(pixel_values=pixels)),
                          (converted.get_text_features(**ids), original.get_text_features(**ids))):
            torch.testing.assert_close(ours.pooler_output, ref.pooler_output, rtol=0, atol=1e-6)
    assert preprocess.mean == (0.5, 0.5, 0.5) and preprocess.crop_rounding == "round"


def test_a_biomedclip_layout_converts_exactly(tmp_path):
    from tests.tinymodel import save_tiny_bert

    directory, source = save_open_clip_biomed(tmp_path / "biomed", save_tiny_bert(tmp_path / "bert"))
    converted, tokenizer, _ = load_pretrained_parts(str(directory))
    theirs = source.state_dict()
    assert set(converted.state_dict()) == set(theirs)
    for key, value in converted.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    pixels = torch.rand(2, 3, 32, 32)
    batch = tokenizer(["pleural effusion", "a chest x-ray showing cardiomegaly"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(converted.get_image_features(pixel_values=pixels),
                                   source.get_image_features(pixel_values=pixels), rtol=0, atol=0)
        torch.testing.assert_close(converted.get_text_features(**batch), source.get_text_features(**batch),
                                   rtol=0, atol=0)
        # the text side is open_clip's: the first token of the last hidden state, through the MLP
        hidden = source.text_model(**batch).last_hidden_state[:, 0]
        expected = source.text_projection[2](torch.nn.functional.gelu(source.text_projection[0](hidden)))
        torch.testing.assert_close(converted.get_text_features(**batch), expected, rtol=0, atol=1e-6)


def test_open_clip_checkpoints_the_conversion_cannot_reproduce_are_refused_by_name(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = save_open_clip_clip(tmp_path / "oc", tiny_model_dir)
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["model_cfg"]["vision_cfg"]["ls_init_value"] = 0.1
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="vision_cfg.ls_init_value"):
        load_pretrained_parts(str(directory))
    config["model_cfg"]["vision_cfg"].pop("ls_init_value")
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    state = load_file(str(directory / "open_clip_model.safetensors"))
    state["visual.extra_head.weight"] = torch.zeros(2)
    save_file(state, str(directory / "open_clip_model.safetensors"))
    with pytest.raises(ModelLoadError, match="visual.extra_head.weight"):
        load_pretrained_parts(str(directory))
    state.pop("visual.extra_head.weight")
    state.pop("visual.proj")
    save_file(state, str(directory / "open_clip_model.safetensors"))
    with pytest.raises(ModelLoadError, match="1 parameters missing \\(visual_projection.weight"):
        load_pretrained_parts(str(directory))
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (directory / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_pretrained_parts(str(directory))


def test_a_biomedclip_layout_without_its_text_model_files_says_what_to_copy(tmp_path):
    import shutil

    from tests.tinymodel import save_tiny_bert

    directory, _ = save_open_clip_biomed(tmp_path / "biomed", save_tiny_bert(tmp_path / "bert"))
    shutil.rmtree(directory / "text_model")
    with pytest.raises(ModelLoadError, match="microsoft/tiny-test-bert.*text_model"):
        load_pretrained_parts(str(directory))


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_indexes_searches_labels_and_trains_a_lora_step(fmt, checkpoints, tmp_path):
    from cxrmodel.model.lora import LoraSettings
    from cxrmodel.training.train import TrainConfig, train
    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig

    model = str(checkpoints[fmt])
    encoder = load_encoder(EncoderConfig(model=model))
    expected = fmt.split(" (")[0] if fmt.startswith("transformers CLIP") else fmt
    assert encoder.checkpoint_format == expected
    images = gray_folder(tmp_path / "images", 6)
    summary = run_index(IndexJob(sources=[str(images)], data_dir=tmp_path / "data", workers=0, progress=False),
                        encoder)
    assert "ONNX query tower exported" in summary.query_tower  # text queries without torch, for every format
    engine = Engine.open(EngineConfig(data_dir=tmp_path / "data"))
    try:
        assert engine.stats()["format"] == expected  # the index remembers the format
        assert len(engine.text("a chest x-ray", k=3)) == 3
        assert len(engine.image(gray_image(50), k=2)) == 2
        assert len(engine.label(gray_image(51))) == 14
    finally:
        engine.close()

    pairs = tmp_path / "pairs.csv"
    rows = ["id,name,caption"] + [f"{i},s{i}.png,a {c} {s}" for i, (s, c) in enumerate(
        [(s, c) for s in ("circle", "square") for c in ("red", "green", "blue")] * 2)]
    (tmp_path / "pairs").mkdir()
    for i, row in enumerate(rows[1:]):
        shape, colour = row.split(" ")[-1], row.split(" ")[-2]
        shape_image(shape, colour, seed=i).save(tmp_path / "pairs" / f"s{i}.png")
    pairs.write_text("\n".join(rows) + "\n")
    result = train(TrainConfig(pairs=str(pairs), images=str(tmp_path / "pairs"), out=tmp_path / "adapter",
                               encoder=EncoderConfig(model=model, precision="fp32", batch_size=6),
                               lora=LoraSettings(targets=("q_proj", "v_proj")), epochs=1, lr=1e-3,
                               val_fraction=0.25, seed=0, workers=0, progress=False), log=lambda _: None)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and result is not None
    adapted = load_encoder(EncoderConfig(model=model, adapter=str(tmp_path / "adapter"), precision="fp32"))
    assert np.isfinite(adapted.encode_texts(["a red circle"])).all()


@pytest.mark.parametrize("fmt", FORMATS[:3])
def test_hugging_face_layouts_embed_as_transformers_own_forward(fmt, checkpoints):
    """The encoder (fast paths on) against transformers' own forward of the same checkpoint, fp32, to 1e-5."""
    from transformers import AutoModel, AutoTokenizer

    model_dir = checkpoints[fmt]
    encoder = load_encoder(EncoderConfig(model=str(model_dir), precision="fp32"))
    reference = AutoModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    images = [gray_image(3, (60, 50)), shape_image("square", "blue")]
    texts = ["a red circle", "pleural effusion with blunting of the costophrenic angle"]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=encoder.max_text_tokens, return_tensors="pt")
    keep = {"input_ids", "attention_mask"} | ({"token_type_ids"} if reference.config.model_type != "clip" else set())
    with torch.no_grad():
        image = reference.get_image_features(pixel_values=encoder.preprocess.to_tensor(images))
        text = reference.get_text_features(**{k: v for k, v in batch.items() if k in keep})
    expected_image = torch.nn.functional.normalize(getattr(image, "pooler_output", image), dim=-1).numpy()
    expected_text = torch.nn.functional.normalize(getattr(text, "pooler_output", text), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode_images(images), expected_image, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts(texts), expected_text, atol=1e-5)
