"""Tiny CLIP checkpoints built in code: random weights, a tokenizer trained on the spot, no network."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cxrmodel.imaging.preprocess import PREPROCESSOR_FILE, ImagePreprocess

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

TOKENIZER_CORPUS = [
    "a chest x-ray showing cardiomegaly with an enlarged heart",
    "a frontal chest radiograph with pleural effusion and blunting of the costophrenic angle",
    "lateral lumbar spine radiograph", "axial ct of the chest", "mri of the brain with a tumour",
    "red green blue yellow circle square triangle cross stripes dots",
    "atelectasis infiltration mass nodule pneumonia pneumothorax consolidation edema emphysema",
    "fibrosis pleural thickening hernia no finding normal abnormal present absent",
    "a photo of an image with a small large bright dark shape on the left right top bottom",
]


def build_tokenizer(max_length: int = 32):
    """A byte-level BPE tokenizer with CLIP's special tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=EOS, model_max_length=max_length)


def tiny_clip_config(vocab_size: int, eos_id: int, bos_id: int, image_size: int = 32, max_text: int = 32,
                     projection_dim: int = 16):
    """A CLIPConfig with two small layers per tower."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_text, eos_token_id=eos_id,
                         bos_token_id=bos_id, pad_token_id=eos_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=projection_dim,
    )


def save_tiny_clip(directory: Path, seed: int = 0, image_size: int = 32, projection_dim: int = 16) -> Path:
    """Write a loadable tiny CLIP checkpoint (model, tokenizer, preprocessor) to `directory`."""
    from transformers import CLIPModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_clip_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id, image_size,
                              projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    pre = ImagePreprocess(shortest_edge=image_size, crop=(image_size, image_size))
    (directory / PREPROCESSOR_FILE).write_text(json.dumps(pre.to_dict(), indent=2))
    return directory


def save_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """A 2-layer BERT with a word-level vocabulary, saved like a pretrained text model."""
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = sorted({w.strip(".,:;") for line in TOKENIZER_CORPUS for w in line.split()} | {"x", "ray", "-"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w in words if w]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=32)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64,
                                 initializer_range=0.5))  # large init: a random BERT whose CLS still varies
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_forced_calibration(encoder, path: Path, assessed: tuple[str, ...] | None = None) -> Path:
    """A calibration for `encoder` that declares pathologies assessed without measuring anything (an
    identity map, threshold 0.5): tests of what RadLens does with assessed pathologies use it. `assessed`
    None: all 14; the others are written as measured without skill."""
    from cxrmodel.labels.calibration import Calibration, PathologyCalibration, SkillRule, model_identity, save
    from cxrmodel.labels.prompts import LabelConfig

    names = list(LabelConfig().pathologies)
    assessed = tuple(names) if assessed is None else assessed
    per = {p: PathologyCalibration(p, 50, 50, 0.8, 0.7, 0.9, True, "forced by a test", threshold=0.5,
                                   raw_threshold=0.5, sensitivity=0.8, specificity=0.8, knots_x=[0.0, 1.0],
                                   knots_y=[0.0, 1.0])
           if p in assessed else
           PathologyCalibration(p, 50, 50, 0.5, 0.4, 0.6, False, "AUROC 0.50 (95% CI 0.40-0.60) does not exclude 0.50")
           for p in names}
    save(Calibration(model_identity(encoder), encoder.model_name, {"description": "forced by a test"}, SkillRule(),
                     per), path)
    return path


def save_tiny_dual_encoder(directory: Path, bert_dir: Path, seed: int = 0) -> Path:
    """A `VisionTextDualEncoderModel` (tiny CLIP vision tower + the tiny BERT of `bert_dir`) saved the
    Hugging Face way, with tokenizer and preprocessor: no RadLens files."""
    from transformers import (
        AutoModel,
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    directory = Path(directory)
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=64)
    text = AutoModel.from_pretrained(bert_dir)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text.config, projection_dim=8)
    model = VisionTextDualEncoderModel(config=config, vision_model=CLIPVisionModel(vision), text_model=text)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(bert_dir).save_pretrained(directory)
    (directory / PREPROCESSOR_FILE).write_text(json.dumps(ImagePreprocess(32, crop=(32, 32)).to_dict()))
    return directory
