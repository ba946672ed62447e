"""Dual encoders beyond CLIP: VisionTextDualEncoder checkpoints, `--init scratch`, RadLens model dirs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrmodel.hashing import file_sha256
from cxrmodel.model.dualencoder import MANIFEST, WEIGHTS, ScratchSpec, is_model_dir
from cxrmodel.model.encoder import EncoderConfig, load_encoder
from cxrmodel.training.pairs import compose_caption, load_pairs
from cxrmodel.training.train import TrainConfig, train
from tests.imagegen import COLOURS, SHAPES, shape_image
from tests.tinymodel import save_tiny_bert

TINY_VIT = dict(image_size=32, patch_size=8, hidden_size=32, layers=2, heads=2, mlp_size=64, projection_dim=16,
                text_max_tokens=16)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def shapes_manifest(tmp_path_factory):
    """Structured columns only (no caption column): captions must be composed by a template."""
    root = tmp_path_factory.mktemp("shapes-manifest")
    rows, i = ["file,colour,shape,patient_id"], 0
    for _ in range(10):
        for shape in SHAPES:
            for colour in COLOURS:
                shape_image(shape, colour, seed=500 + i, jitter=6).save(root / f"{i}.png")
                rows.append(f"{i}.png,{colour},{shape},p{i % 40}")
                i += 1
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def scratch_model(shapes_manifest, tiny_bert_dir, tmp_path_factory):
    cfg = TrainConfig(pairs=str(shapes_manifest / "manifest.csv"), out=tmp_path_factory.mktemp("scratch") / "m",
                      init="scratch", scratch=ScratchSpec(text_model=str(tiny_bert_dir), **TINY_VIT),
                      caption_template="a {colour} {shape}", encoder=EncoderConfig(precision="fp32", batch_size=32),
                      epochs=10, lr=3e-3, val_fraction=0.25, seed=0, workers=0, progress=False, augment=False)
    return train(cfg, log=lambda _: None)


def test_compose_caption_tidies_missing_fields():
    row = {"view": "", "modality": "MRI", "anatomy": "brain", "labels": ""}
    assert compose_caption("{view} {modality} of the {anatomy}: {labels}", row) == "MRI of the brain"
    row = {"view": "PA", "modality": "X-ray", "anatomy": "chest", "labels": "Effusion|Pleural_Thickening"}
    assert compose_caption("{view} {modality} of the {anatomy}: {labels}", row) == \
        "PA X-ray of the chest: effusion, pleural thickening"


@pytest.mark.parametrize("view, caption", [
    ("PA", "frontal PA X-ray of the chest: effusion"), ("AP supine", "frontal AP supine X-ray of the chest: effusion"),
    ("LL", "lateral LL X-ray of the chest: effusion"), ("lateral", "lateral X-ray of the chest: effusion"),
    ("", "X-ray of the chest: effusion"), ("oblique", "oblique X-ray of the chest: effusion")])
def test_compose_caption_names_the_view_class(view, caption):
    row = {"view": view, "modality": "X-ray", "anatomy": "chest", "labels": "Effusion"}
    assert compose_caption("{view_class} {view} {modality} of the {anatomy}: {labels}", row) == caption


def test_a_rows_own_view_class_column_wins():
    row = {"view": "PA", "view_class": "posteroanterior", "modality": "X-ray"}
    assert compose_caption("{view_class} {modality}", row) == "posteroanterior X-ray"


def test_template_pairs_are_kept_apart_from_written_ones(tmp_path):
    shape_image("circle", "red").save(tmp_path / "a.png")
    shape_image("cross", "blue").save(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text("file,caption,modality\na.png,a written note,CT\nb.png,,MRI\n")
    pairs = load_pairs(tmp_path / "m.csv", caption_template="{modality} image").rows
    assert [(p.caption, p.composed) for p in pairs] == [("CT image", True), ("a written note", False),
                                                        ("MRI image", True)]


def test_scratch_training_learns_and_writes_a_model_dir(scratch_model):
    m = scratch_model.metrics
    assert m["init"] == "scratch" and m["loss_per_epoch"][-1] < m["loss_per_epoch"][0]
    assert m["after"]["text_to_image"]["R@1"] >= m["before"]["text_to_image"]["R@1"] + 0.15
    out = scratch_model.out
    assert is_model_dir(out) and (out / "adapter" / "adapter_config.json").exists()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["weights_sha256"] == file_sha256(out / WEIGHTS)
    assert "text_model" not in json.dumps(list(__import__("safetensors.torch").torch.load_file(
        str(out / WEIGHTS)).keys()))  # the pretrained text tower is never copied


def test_model_dir_loads_through_the_same_encoder_interface(scratch_model):
    enc = load_encoder(EncoderConfig(model=str(scratch_model.out), precision="fp32"))
    images = [shape_image(s, "green", seed=3) for s in SHAPES]
    texts = ["a green circle", "a yellow cross"]
    for a, b in ((enc.encode_images(images), scratch_model.encoder.encode_images(images)),
                 (enc.encode_texts(texts), scratch_model.encoder.encode_texts(texts))):
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
        assert np.sum(a * b, axis=1).min() > 0.999  # fp16 storage of the trained weights
    assert enc.adapter_hash is not None and enc.identity["dim"] == 16


def test_index_and_search_with_a_scratch_model(scratch_model, shapes_manifest, tmp_path):
    from indexer.pipeline import IndexJob, run_index
    from search.engine import Engine, EngineConfig

    data = tmp_path / "data"
    enc = load_encoder(EncoderConfig(model=str(scratch_model.out), precision="fp32"))
    run_index(IndexJob(sources=[str(shapes_manifest)], data_dir=data, workers=0, progress=False), enc)
    engine = Engine.open(EngineConfig(data_dir=data, precision="fp32"))  # loads the model the index names
    hits = engine.text("a red square", k=5)
    assert len(hits) == 5 and engine.encoder.model_name == str(scratch_model.out.resolve())
    assert len(engine.label(shape_image("circle", "red"))) == 14
    engine.close()


def test_plain_vision_text_dual_encoder_checkpoint_loads(tiny_bert_dir, tmp_path):
    """A VisionTextDualEncoderModel saved the Hugging Face way (no RadLens files) works too."""
    from tests.tinymodel import save_tiny_dual_encoder

    save_tiny_dual_encoder(tmp_path / "vtde", tiny_bert_dir)
    enc = load_encoder(EncoderConfig(model=str(tmp_path / "vtde"), precision="fp32"))
    assert enc.encode_images([shape_image("circle", "red")]).shape == (1, 8)
    assert enc.encode_texts(["a red circle"]).shape == (1, 8)


def test_the_label_loss_lifts_the_zero_shot_auroc_of_labelled_findings(tiny_bert_dir, tmp_path):
    """Same data, seed and steps: with --label-loss the held-out zero-shot AUROC of the labelled findings
    (circles are 'Mass', squares 'Nodule', the rest 'No Finding') is clearly higher than with InfoNCE alone."""
    from cxrmodel.labels.prompts import LabelConfig
    from cxrmodel.training.evaluate import evaluate_pairs
    from cxrmodel.training.pairs import split_pairs

    rows, i = ["file,colour,shape,labels"], 0
    for _ in range(10):
        for shape in SHAPES:
            for colour in COLOURS:
                shape_image(shape, colour, seed=500 + i, jitter=6).save(tmp_path / f"{i}.png")
                label = "Mass" if shape == "circle" else "Nodule" if shape == "square" else "No Finding"
                rows.append(f"{i}.png,{colour},{shape},{label}")
                i += 1
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    _, val = split_pairs(load_pairs(tmp_path / "m.csv", caption_template="a {colour} {shape}").rows, 0.25, 0)
    aurocs = {}
    for weight in (0.0, 5.0):
        cfg = TrainConfig(pairs=str(tmp_path / "m.csv"), out=tmp_path / f"m{weight}", init="scratch",
                          scratch=ScratchSpec(text_model=str(tiny_bert_dir), **TINY_VIT),
                          caption_template="a {colour} {shape}", encoder=EncoderConfig(precision="fp32", batch_size=32),
                          epochs=15, lr=3e-3, val_fraction=0.25, seed=0, workers=0, progress=False, augment=False,
                          label_loss=weight)
        result = train(cfg, log=lambda _: None)
        table = evaluate_pairs(result.encoder, val, LabelConfig())["zero_shot_auroc"]["per_pathology"]
        aurocs[weight] = np.mean([table[p]["auroc"] for p in ("Mass", "Nodule")])
        assert result.metrics["label_loss"] == weight
    assert aurocs[5.0] > 0.6 and aurocs[5.0] > aurocs[0.0] + 0.1, aurocs


def test_class_balanced_training_runs_and_records_its_threshold(shapes_manifest, tiny_bert_dir, tmp_path):
    """`--balance`: the loader draws by repeat factors (with replacement), training still learns, and
    metrics.json says how it sampled."""
    import json

    rows = (shapes_manifest / "manifest.csv").read_text().splitlines()
    labelled = [rows[0] + ",labels"] + [r + (",Hernia" if ",circle," in r else ",Mass") for r in rows[1:]]
    (tmp_path / "m.csv").write_text("\n".join(labelled) + "\n")
    cfg = TrainConfig(pairs=str(tmp_path / "m.csv"), images=str(shapes_manifest), out=tmp_path / "m",
                      init="scratch", scratch=ScratchSpec(text_model=str(tiny_bert_dir), **TINY_VIT),
                      caption_template="a {colour} {shape}", encoder=EncoderConfig(precision="fp32", batch_size=32),
                      epochs=3, lr=3e-3, val_fraction=0.25, seed=0, workers=0, progress=False, augment=False,
                      balance=0.5)
    result = train(cfg, log=lambda _: None)
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["balance"] == 0.5 and result.metrics["loss_per_epoch"][-1] < result.metrics["loss_per_epoch"][0]


@pytest.mark.parametrize("value", ["-0.1", "2"])
def test_radlens_train_refuses_a_balance_outside_0_to_1(value, tmp_path, capsys):
    from radlens.cli import main

    assert main(["train", "--pairs", str(tmp_path / "p.csv"), "--out", str(tmp_path / "m"), "--init", "scratch",
                 "--balance", value]) == 1
    err = capsys.readouterr().err
    assert "--balance must be between 0 (off) and 1" in err and "Traceback" not in err


def test_radlens_train_passes_the_new_vits_patch_size(monkeypatch, tmp_path):
    """`radlens train --init scratch --image-size 64 --patch-size 8`: a low-resolution ViT for small films."""
    import cxrmodel.training.train as training
    from radlens.cli import main

    seen = {}

    class Result:
        def summary_line(self):
            return "trained"

    def fake_train(cfg, log):
        seen["scratch"] = cfg.scratch
        return Result()

    monkeypatch.setattr(training, "train", fake_train)
    assert main(["train", "--pairs", str(tmp_path / "p.csv"), "--out", str(tmp_path / "m"), "--init", "scratch",
                 "--image-size", "64", "--patch-size", "8"]) == 0
    assert (seen["scratch"].image_size, seen["scratch"].patch_size) == (64, 8)


@pytest.mark.parametrize("flags,message", [(["--patch-size", "0"], "patch size 0 must be between 1"),
                                           (["--patch-size", "100"], "patch size 100 must be between 1"),
                                           (["--vit-width", "0"], "hidden size must be at least 1")])
def test_radlens_train_refuses_an_impossible_vit_in_words(flags, message, tmp_path, capsys):
    """Before any data is read or model built: one line, exit 1, no traceback."""
    from radlens.cli import main

    assert main(["train", "--pairs", str(tmp_path / "p.csv"), "--out", str(tmp_path / "m"), "--init", "scratch",
                 "--image-size", "64", *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
