"""Writer throughput: images committed per second by the indexer's one writer, SQLite vs a server DB.

    python -m bench.writer [--db-url postgresql+psycopg://user@host/empty_db] [--images 5120]

The writer (rows, vector, 14 pathology scores and the applicability decision per image, one
transaction per chunk) runs in the driver of `--engine ray` too, so its rate caps a cluster's
throughput however many embedding actors there are. Vectors here are random unit vectors of the
bundled radlens-mini's width (its prompts score them), so only the writing is timed.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import cpu_kind, table


def measure(url: str | None, images: int, chunk: int, data_dir: Path, encoder) -> float:
    """Images per second written through ChunkWriter on `url` (None: SQLite in data_dir)."""
    from sqlalchemy.orm import Session

    from cxrmodel.labels.prompts import LabelConfig
    from cxrmodel.labels.zeroshot import prompt_bank
    from indexer.pipeline import ChunkWriter, IndexSummary, target_generation
    from indexer.prepare import Prepared
    from indexer.store import default_db_url, open_db

    db = open_db(url or default_db_url(data_dir))
    with Session(db) as session, session.begin():
        gen = target_generation(session, encoder.identity, rebuild=False).id
    labels = LabelConfig()
    prompt_bank(encoder, labels)  # computed once, as in a real run, outside the timing
    writer = ChunkWriter(db, gen, encoder, labels)
    rng = np.random.default_rng(0)
    summary = IndexSummary()
    started = time.perf_counter()
    for lo in range(0, images, chunk):
        items = [Prepared(path=f"/archive/{i:08d}.png", size_bytes=1000, mtime_ns=i, content_hash=f"{i:064x}",
                          width=1024, height=1024, format="PNG", metadata={"modality": "CR", "view": "PA"})
                 for i in range(lo, min(images, lo + chunk))]
        vectors = rng.standard_normal((len(items), encoder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        writer.write_embedded(items, vectors, summary)
    seconds = time.perf_counter() - started
    db.dispose()
    return images / seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db-url", default=None, help="an empty server database to compare with SQLite")
    p.add_argument("--images", type=int, default=5120)
    p.add_argument("--chunk", type=int, default=256)
    args = p.parse_args(argv)
    print(f"CPU: {cpu_kind()}")  # every speed figure names the machine kind it was measured on
    from cxrmodel.model.encoder import EncoderConfig, load_encoder

    encoder = load_encoder(EncoderConfig(model="radlens-mini"))
    rows = []
    for name, url in (("SQLite (embedded default)", None), ("server", args.db_url)):
        if name == "server" and not url:
            continue
        work = Path(tempfile.mkdtemp(prefix="radlens-writer-"))
        try:
            rows.append([name, measure(url, args.images, args.chunk, work, encoder)])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(table(["database", "images/s written"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
