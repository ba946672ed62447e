"""`radlens check`: verify that DB rows and FAISS ids match one to one."""

from __future__ import annotations

from cxrmodel.errors import DataError

from .common import add_data_dir


def register(sub) -> None:
    p = sub.add_parser("check", help="verify that the DB and the FAISS index agree",
                       description="Compare DB rows with FAISS ids of the served index; exit 1 on drift.")
    add_data_dir(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from indexer.check import check_data_dir
    from indexer.store import default_db_url, has_database

    if args.db_url is None and not has_database(args.data_dir):
        raise DataError(f"no RadLens index in {args.data_dir}")
    report = check_data_dir(args.data_dir, args.db_url or default_db_url(args.data_dir))
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1
