"""LoRA training and evaluation: <1% trained, learning on a synthetic task, reload/merge parity, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxrmodel.errors import DataError
from cxrmodel.model.encoder import EncoderConfig, load_encoder
from cxrmodel.model.lora import LoraSettings, apply_lora, count_parameters
from cxrmodel.training.pairs import load_pairs, split_pairs
from cxrmodel.training.train import TrainConfig, train
from radlens.cli import main
from tests.imagegen import COLOURS, SHAPES, shape_image


@pytest.fixture(scope="session")
def shapes_pairs(tmp_path_factory) -> Path:
    """192 images of 16 shape/colour classes with ROCO-style id,name,caption rows (+ labels)."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "images").mkdir()
    rows, i = ["id,name,caption,labels"], 0
    for rep in range(12):
        for shape in SHAPES:
            for colour in COLOURS:
                name = f"{shape}_{colour}_{rep}.png"
                shape_image(shape, colour, seed=i, jitter=6).save(root / "images" / name)
                label = "Mass" if shape == "circle" else "Nodule" if shape == "square" else ""
                rows.append(f"{i},{name},a {colour} {shape},{label}")
                i += 1
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root


def _config(shapes_pairs, model_dir, out, **kw):
    return TrainConfig(pairs=str(shapes_pairs / "pairs.csv"), images=str(shapes_pairs / "images"), out=out,
                       encoder=EncoderConfig(model=str(model_dir), precision="fp32", batch_size=32),
                       lora=LoraSettings(), epochs=kw.pop("epochs", 8), lr=3e-3, val_fraction=0.25, seed=0,
                       workers=0, progress=False, **kw)


@pytest.fixture(scope="session")
def trained(shapes_pairs, tiny_model_dir, tmp_path_factory):
    return train(_config(shapes_pairs, tiny_model_dir, tmp_path_factory.mktemp("adapter")), log=lambda _: None)


def test_default_lora_trains_under_one_percent_of_vit_b32():
    from transformers import CLIPConfig, CLIPModel

    model = apply_lora(CLIPModel(CLIPConfig()), LoraSettings())  # CLIPConfig() is the ViT-B/32 architecture
    counts = count_parameters(model)
    assert 0 < counts["trainable_percent"] < 1.0, counts
    assert counts["total"] > 100_000_000


def test_training_lowers_loss_and_lifts_held_out_recall(trained):
    m = trained.metrics
    assert m["loss_per_epoch"][-1] < m["loss_per_epoch"][0] - 0.3
    before, after = m["before"]["text_to_image"]["R@1"], m["after"]["text_to_image"]["R@1"]
    chance = 1 / 16
    assert after >= before + 0.15 and after >= 2 * chance, (before, after)
    assert m["val_pairs"] == 48 and m["train_pairs"] == 144


def test_outputs_are_peft_adapter_metrics_and_curve(trained):
    out = trained.out
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["parameters"]["trainable"] > 0 and "R@10" in metrics["after"]["image_to_text"]
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")


def test_reloaded_adapter_gives_the_training_embeddings(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import CLIPModel

    images = [shape_image(s, "red", seed=99) for s in SHAPES]
    texts = ["a red circle", "a blue square"]
    reloaded = load_encoder(EncoderConfig(model=str(tiny_model_dir), adapter=str(trained.out), precision="fp32"))
    np.testing.assert_allclose(reloaded.encode_images(images), trained.encoder.encode_images(images), atol=1e-5)
    np.testing.assert_allclose(reloaded.encode_texts(texts), trained.encoder.encode_texts(texts), atol=1e-5)
    base = load_encoder(EncoderConfig(model=str(tiny_model_dir), precision="fp32"))
    assert np.abs(base.encode_texts(texts) - reloaded.encode_texts(texts)).max() > 1e-3  # adapter is not a no-op
    assert isinstance(PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_model_dir), str(trained.out)),
                      PeftModel)


def test_merged_adapter_equals_unmerged(trained, tiny_model_dir):
    images = [shape_image(s, c, seed=7) for s in SHAPES for c in ("red", "blue")]
    texts = [f"a {c} {s}" for s in SHAPES for c in COLOURS]
    cfg = dict(model=str(tiny_model_dir), adapter=str(trained.out), precision="fp32")
    merged, plain = load_encoder(EncoderConfig(merge=True, **cfg)), load_encoder(EncoderConfig(**cfg))
    for a, b in ((merged.encode_images(images), plain.encode_images(images)),
                 (merged.encode_texts(texts), plain.encode_texts(texts))):
        assert np.sum(a * b, axis=1).min() >= 0.999


def test_resume_after_interruption_equals_uninterrupted(shapes_pairs, tiny_model_dir, tmp_path, monkeypatch):
    import cxrmodel.training.train as train_module

    straight = train(_config(shapes_pairs, tiny_model_dir, tmp_path / "a", epochs=3), log=lambda _: None)
    real_save = train_module._save_checkpoint

    def save_then_crash(model, ckpt, state):
        real_save(model, ckpt, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt("simulated crash after epoch 1")

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(_config(shapes_pairs, tiny_model_dir, tmp_path / "b", epochs=3), log=lambda _: None)
    monkeypatch.setattr(train_module, "_save_checkpoint", real_save)
    resumed = train(_config(shapes_pairs, tiny_model_dir, tmp_path / "b", epochs=3, resume=True), log=lambda _: None)
    assert len(resumed.metrics["loss_per_epoch"]) == 3
    np.testing.assert_allclose(resumed.metrics["loss_per_epoch"], straight.metrics["loss_per_epoch"], rtol=1e-4)
    texts = ["a red circle", "a green cross"]
    np.testing.assert_allclose(resumed.encoder.encode_texts(texts), straight.encoder.encode_texts(texts), atol=1e-4)


def test_malformed_pairs_rows_are_reported_with_line_numbers(tmp_path):
    shape_image("circle", "red").save(tmp_path / "ok.png")
    (tmp_path / "pairs.jsonl").write_text(
        '{"image": "ok.png", "caption": "a red circle"}\n'
        '{"image": "missing.png", "caption": "gone"}\n'
        '{"image": "ok.png", "caption": "  "}\n'
        '{broken json\n'
        '{"image": "", "caption": "no path"}\n')
    messages = []
    pairs = load_pairs(tmp_path / "pairs.jsonl", log=messages.append)
    assert len(pairs.rows) == 1
    assert [s["line"] for s in pairs.skipped] == [2, 3, 4, 5]
    assert any("pairs.jsonl:2" in m and "missing.png" in m for m in messages)


def test_pairs_file_without_usable_rows_or_columns_is_fatal(tmp_path):
    (tmp_path / "none.csv").write_text("name,caption\nmissing.png,a caption\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_pairs(tmp_path / "none.csv")
    (tmp_path / "cols.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(DataError, match="caption"):
        load_pairs(tmp_path / "cols.csv")


def test_split_keeps_groups_apart(tmp_path):
    from cxrmodel.training.pairs import Pair

    pairs = [Pair(tmp_path / f"{i}.png", f"c{i}", group=f"patient{i // 3}", line=i) for i in range(30)]
    train_part, val_part = split_pairs(pairs, 0.3, seed=1)
    assert len(train_part) + len(val_part) == 30 and val_part
    assert not {p.group for p in train_part} & {p.group for p in val_part}


def test_eval_cli_prints_recall_and_auroc(shapes_pairs, tiny_model_dir, trained, capsys):
    code = main(["eval", "--pairs", str(shapes_pairs / "pairs.csv"), "--images", str(shapes_pairs / "images"),
                 "--model", str(tiny_model_dir), "--adapter", str(trained.out), "--precision", "fp32", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == 192 and set(result["text_to_image"]) == {"R@1", "R@5", "R@10"}
    table = result["zero_shot_auroc"]["per_pathology"]
    assert table["Mass"]["positives"] == 48 and 0.0 <= table["Mass"]["auroc"] <= 1.0
    assert table["Hernia"]["auroc"] is None  # no positives: reported as n/a, not invented


@pytest.mark.slow
def test_sigkill_during_training_then_resume(shapes_pairs, tiny_model_dir, tmp_path):
    """A real `radlens train` process killed twice (after its first and second checkpoints) resumes to
    the same losses as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def cmd(out, resume=False):
        return [sys.executable, "-m", "radlens", "train", "--pairs", str(shapes_pairs / "pairs.csv"), "--images",
                str(shapes_pairs / "images"), "--out", str(out), "--model", str(tiny_model_dir), "--precision",
                "fp32", "--epochs", "5", "--lr", "3e-3", "--val-fraction", "0.25", "--workers", "0",
                "--no-progress", "--batch-size", "16"] + (["--resume"] if resume else [])

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run(cmd(tmp_path / "straight"), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    kills = 0
    for target_epoch in (1, 2):
        with subprocess.Popen(cmd(out, resume=kills > 0), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) as proc:
            for line in proc.stdout:
                if line.startswith(f"epoch {target_epoch}:"):
                    time.sleep(0.05)  # land somewhere in the checkpoint write or the next epoch
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                    break
            proc.wait()
    assert kills == 2
    subprocess.run(cmd(out, resume=True), check=True, env=env, capture_output=True)
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((out / "metrics.json").read_text())
    assert len(resumed["loss_per_epoch"]) == 5
    np.testing.assert_allclose(resumed["loss_per_epoch"], straight["loss_per_epoch"], rtol=1e-4)
    np.testing.assert_allclose(resumed["after"]["text_to_image"]["R@1"], straight["after"]["text_to_image"]["R@1"])


def test_gradient_accumulation_trains_with_fewer_optimiser_steps(shapes_pairs, tiny_model_dir, tmp_path):
    accumulated = train(_config(shapes_pairs, tiny_model_dir, tmp_path / "acc", epochs=4, accumulate=3),
                        log=lambda _: None)
    m = accumulated.metrics
    assert m["accumulate"] == 3 and m["loss_per_epoch"][-1] < m["loss_per_epoch"][0]
    state = __import__("torch").load(tmp_path / "acc" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 4 * 2  # 144 pairs = 4 full batches of 32: ceil(4 / 3) = 2 steps


def test_each_training_step_is_a_function_a_test_can_call(shapes_pairs, tiny_model_dir, tmp_path):
    """build_data, build_model, build_loop, train_one_epoch, evaluate and save_outputs, one by one."""
    import torch

    from cxrmodel.model.encoder import Encoder
    from cxrmodel.training.train import build_data, build_loop, build_model, evaluate, save_outputs, train_one_epoch

    cfg = _config(shapes_pairs, tiny_model_dir, tmp_path / "out", epochs=1)
    data = build_data(cfg)
    assert len(data.train) > len(data.val) > 0
    built = build_model(cfg, torch.device("cpu"))
    assert not built.scratch and built.state is None
    encoder = Encoder(built.model, built.tokenizer, built.preprocess, model_name=str(tiny_model_dir))
    loop = build_loop(cfg, built, data, encoder)
    lora_before = [p.detach().clone() for p in loop.trainable]
    losses, seen, seconds = train_one_epoch(cfg, built, loop, 0, torch.device("cpu"), torch.float32)
    assert losses and all(np.isfinite(losses)) and seen > 0 and seconds > 0
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, loop.trainable, strict=True))  # it learned
    built.model.eval()
    metrics = evaluate(encoder, data.val)
    assert 0.0 <= metrics["text_to_image"]["R@1"] <= 1.0
    save_outputs(cfg, built, {"after": metrics}, {"loss_per_epoch": [float(np.mean(losses))], "step_losses": losses,
                                                  "images_per_second": [seen / seconds]})
    assert (tmp_path / "out" / "adapter_config.json").exists() and (tmp_path / "out" / "metrics.json").exists()


def test_the_label_loss_scores_exactly_as_the_index_does(tiny_encoder):
    """The training-time zero-shot probability equals `score_vectors` (the index's) for the same model."""
    import math

    import torch

    from cxrmodel.labels.prompts import LabelConfig
    from cxrmodel.labels.zeroshot import prompt_bank, score_vectors
    from cxrmodel.training.label_loss import PromptTokens, zero_shot_probabilities

    config = LabelConfig()
    prompts = PromptTokens.build(config, tiny_encoder.tokenize)
    images = np.random.default_rng(0).standard_normal((5, tiny_encoder.dim)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    expected, _ = score_vectors(images, prompt_bank(tiny_encoder, config), config)
    got = zero_shot_probabilities(torch.from_numpy(images), torch.from_numpy(tiny_encoder.encode_texts(prompts.texts)),
                                  prompts, torch.tensor(math.log(tiny_encoder.logit_scale)))
    assert np.allclose(got.numpy(), expected, atol=1e-5)


def test_label_vectors_and_positive_weights():
    import torch

    from cxrmodel.training.label_loss import label_vector, positive_weights

    names = ["Mass", "Nodule", "Hernia"]
    assert label_vector(("mass", " Hernia"), names) == ([1.0, 0.0, 1.0], True)
    assert label_vector(("No Finding",), names) == ([0.0, 0.0, 0.0], True)  # labelled: all absent
    assert label_vector((), names) == ([0.0, 0.0, 0.0], False)  # unlabelled: masked out
    targets = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 0], [1.0, 1.0, 0]])
    weights = positive_weights(targets, torch.tensor([True, True, True, False]))
    assert weights.tolist() == [2.0, 1.0, 1.0]  # Mass: 2 negatives / 1 positive; no positives: 1



def test_query_retrieval_reports_average_precision_over_the_whole_ranking():
    """AP rests on every relevant image: ranks 1 and 3 of 4 give (1/1 + 2/3) / 2, whatever P@10 says."""
    from cxrmodel.training.evaluate import average_precision, query_retrieval

    assert average_precision(np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([0, 0])) is None
    images = np.eye(4, dtype=np.float32)
    query = np.array([[0.9, 0.5, 0.7, 0.1]], dtype=np.float32)  # ranks images 0, 2, 1, 3
    relevant = np.array([[True, True, False, False]])
    (row,) = query_retrieval(query, images, relevant)["per_query"]
    assert row["AP"] == pytest.approx((1 + 2 / 3) / 2) and row["chance_AP"] == 0.5 and row["P@10"] == 0.5
