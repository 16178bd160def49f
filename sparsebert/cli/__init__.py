"""The `sparsebert` command: one subcommand per module in this package (info, demo, srnet, kprune, bench)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

SUBCOMMANDS = ("info", "demo", "srnet", "report", "kprune", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsebert", description="Sparse and pruned BERT-family encoders.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info logs, -vv debug (backend choice)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        mod.add_parser(sub).set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
