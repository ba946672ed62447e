"""Everything about the model and one image: decoding, loading, encoding, prompts, zero-shot, reports, training.

Importing this package loads no model and imports no torch; see `cxrmodel.encoder.load_encoder`.
"""
