"""The `sparsebert` command: one subcommand per module in this package (info, demo, srnet, kprune, bench)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

SUBCOMMANDS = ("info", "demo", "srnet", "report", "kprune", "bench")


class StderrHandler(logging.StreamHandler):
    """A logging handler that writes to whatever sys.stderr is when a record is emitted (so redirected or
    captured stderr receives the lines)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class _Formatter(logging.Formatter):
    def format(self, record):
        t = self.formatTime(record, "%H:%M:%S")
        if record.levelno >= logging.WARNING:
            return f"[{t}] {record.levelname.lower()}: {record.name}: {record.getMessage()}"
        return f"[{t}] {record.getMessage()}"


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Log lines of the `sparsebert` loggers to stderr: progress (INFO) by default, DEBUG with -v,
    warnings only with -q. Results go to stdout, never through logging."""
    logger = logging.getLogger("sparsebert")
    for h in [h for h in logger.handlers if isinstance(h, StderrHandler)]:
        logger.removeHandler(h)
    handler = StderrHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(prog="sparsebert", description="Sparse and pruned BERT-family encoders.")
    parser.add_argument("--version", action="version", version=f"sparsebert {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="debug log lines (backend choice) on stderr; progress lines are shown by default")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        _plain_help(mod.add_parser(sub)).set_defaults(_run=mod.run)
    return parser


def _plain_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Drop the docstrings' code markup (`x`, ``x``) from a subcommand's --help text; a multi-line
    description (a module docstring) keeps its line breaks, so its usage examples stay whole."""
    parser.description = parser.description and parser.description.replace("`", "").strip()
    if parser.description and "\n" in parser.description and parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = action.help.replace("`", "")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
