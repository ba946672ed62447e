"""Corpus -> index: sources, decode workers, the SQLAlchemy store, FAISS files, `check`."""
