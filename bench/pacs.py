"""Indexing over DICOMweb from a local Orthanc vs the same DICOM files from a folder, side by side.

    python -m bench.pacs [--images 200] [--model radlens-mini] [--out bench-out/pacs]

The dev corpus's NIH chest films (the first `--images` of them, real pixels) are written as 16-bit CR
DICOMs, uploaded to a throwaway Orthanc (Debian's orthanc + orthanc-dicomweb, on a free loopback port,
HTTP basic auth) and indexed twice into fresh data dirs with the same model: from the folder, and from
`dicomweb+http://127.0.0.1:PORT/dicom-web` (QIDO-RS listing, one WADO-RS request per instance). Then
once more over DICOMweb with nothing new (only the listing). Printed: instances per second of each.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import CORPUS, cpu_kind, require, table


def write_dicoms(out: Path, count: int) -> list[Path]:
    """The first `count` NIH films of the corpus as CR chest PA DICOMs (one study per film)."""
    from PIL import Image
    from pydicom.uid import generate_uid

    from tests.imagegen import write_dicom

    require(CORPUS / "manifest.csv", "dev corpus")
    out.mkdir(parents=True, exist_ok=True)
    with open(CORPUS / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["id"].startswith("nih_")][:count]
    files = []
    for i, row in enumerate(rows):
        pixels = np.asarray(Image.open(CORPUS / row["file"]).convert("L"), dtype=np.uint16) * 16
        files.append(write_dicom(out / f"{i:05d}.dcm", pixels, Modality="CR", BodyPartExamined="CHEST",
                                 ViewPosition="PA", StudyInstanceUID=generate_uid(),
                                 SeriesInstanceUID=generate_uid(), StudyDate="20240101"))
    return files


def index_seconds(source: str, data: Path, model: str) -> tuple[float, int]:
    """Wall seconds of `radlens index SOURCE` (in this process, model loaded outside the timing) and the
    instances it added."""
    from cxrmodel.model.encoder import EncoderConfig, load_encoder
    from indexer.pipeline import IndexJob, run_index

    encoder = load_encoder(EncoderConfig(model=model))
    started = time.perf_counter()
    summary = run_index(IndexJob(sources=[source], data_dir=data, progress=False, query_tower=False), encoder)
    return time.perf_counter() - started, summary.added + summary.unchanged


def main(argv: list[str] | None = None) -> int:
    from indexer import dicomweb
    from tests.servers import ORTHANC_PASSWORD, ORTHANC_USER, orthanc_server

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--model", default="radlens-mini")
    parser.add_argument("--out", type=Path, default=Path("bench-out/pacs"))
    args = parser.parse_args(argv)
    binary = shutil.which("Orthanc")
    if binary is None:
        raise SystemExit("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb")
    shutil.rmtree(args.out, ignore_errors=True)
    files = write_dicoms(args.out / "dicoms", args.images)
    os.environ["RADLENS_DICOMWEB_USER"], os.environ["RADLENS_DICOMWEB_PASSWORD"] = ORTHANC_USER, ORTHANC_PASSWORD
    (args.out / "orthanc").mkdir()
    with orthanc_server(args.out / "orthanc", binary) as orthanc:
        for path in files:
            orthanc.upload(path)
        dicomweb.reset_clients()
        rows = []
        for name, source, data in (("folder", str(args.out / "dicoms"), args.out / "folder"),
                                   ("DICOMweb (Orthanc, loopback)", orthanc.source,
                                    args.out / "dicomweb"),
                                   ("DICOMweb again, nothing new", orthanc.source,
                                    args.out / "dicomweb")):
            seconds, count = index_seconds(source, data, args.model)
            rows.append([name, count, seconds, count / seconds])
    print(f"CPU: {cpu_kind()}")
    print(f"{args.images} CR chest DICOMs (NIH films, 16-bit), model {args.model}, default workers\n")
    print(table(["source", "instances", "seconds", "instances/s"], rows))
    print(f"\nDICOMweb / folder: {rows[1][3] / rows[0][3]:.2f}x the folder's rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
