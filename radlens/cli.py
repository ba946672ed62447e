"""`radlens` command line: parse flags, call the library, print. `main(argv) -> exit code`."""

from __future__ import annotations

import argparse
import logging
import sys

from cxrmodel.errors import RadLensError

from . import __version__
from .commands import calibrate, check, demo, index, query, serve, train

COMMANDS = (index, calibrate, query, train, serve, check, demo)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line, `radlens: error: ...`, exit 1, like every other error."""

    def error(self, message: str):
        where = self.prog.removeprefix("radlens").strip()
        self.exit(1, f"radlens: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand."""
    parser = ArgumentParser(prog="radlens", description="Semantic search for medical images.")
    parser.add_argument("--version", action="version", version=f"radlens {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbosity < 2:
        import warnings

        # peft calls an API transformers 5 deprecated; nothing a RadLens user can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        quiet_transformers()


def quiet_transformers() -> None:
    """transformers' warnings and progress bars off, without importing it (a text search never does):
    through the environment it reads when imported, or directly when something imported it already."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run one radlens command; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.run(args) or 0)
    except RadLensError as exc:
        print(f"radlens: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("radlens: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
