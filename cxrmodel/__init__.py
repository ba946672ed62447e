"""Everything about the model and one image, in layers that import only downwards:

- `imaging` -- decoding (raster, DICOM) and the model's input preprocessing;
- `model` -- loading checkpoints, dual encoders, LoRA, the exact fast paths, `Encoder`;
- `labels` -- prompts, zero-shot scoring, where the 14 labels apply;
- `reporting` -- report composition and templates, charts;
- `training` -- pairs files, training, retrieval evaluation;
- shared by every layer of RadLens: `errors`, `constants`, `tables` (CSV/JSONL rows).

Importing this package loads no model and imports no torch; see `cxrmodel.model.encoder.load_encoder`.
"""
