"""`radlens check`: verify that DB rows and FAISS ids match one to one."""

from __future__ import annotations

from cxrmodel.errors import DataError

from .common import add_data_dir


def register(sub) -> None:
    p = sub.add_parser("check", help="verify that the DB and the FAISS index agree",
                       description="Compare DB rows with FAISS ids of the served index (and with --files, the "
                                   "indexed files on disk); exit 1 on drift.")
    add_data_dir(p)
    p.add_argument("--skipped", action="store_true",
                   help="list every file and manifest row the indexer could not use, with its reason")
    p.add_argument("--files", action="store_true",
                   help="also stat every indexed file: exit 1 when some no longer exist, changed since they were "
                        "indexed, or changed into files that do not decode")
    p.set_defaults(run=run)


def run(args) -> int:
    from indexer.check import check_data_dir
    from indexer.store import default_db_url, has_database

    if args.db_url is None and not has_database(args.data_dir):
        raise DataError(f"no RadLens index in {args.data_dir}")
    url = args.db_url or default_db_url(args.data_dir)
    if args.skipped:
        return _list_skipped(url)
    report = check_data_dir(args.data_dir, url)
    for line in report.lines():
        print(line)
    ok = report.ok
    if args.files:
        from indexer.check import check_files

        files = check_files(url)
        for line in files.lines():
            print(line)
        ok = ok and files.ok
    return 0 if ok else 1


def _list_skipped(url: str) -> int:
    """Print `path<TAB>reason` for every skipped file and manifest row."""
    from indexer.skipped import skipped_files
    from indexer.store import open_db

    db = open_db(url, create=False)
    try:
        for item in skipped_files(db):
            print(f"{item.path}\t{item.reason}")
    finally:
        db.dispose()
    return 0
