"""`sparsebert report OUT`: ID and OOD metric vs sparsity per method, one PNG per task, with the numbers
(summary.json, summary.csv, <task>.md) from the SRNet run JSONs under OUT."""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="plot and tabulate SRNet runs (ID and OOD metric vs sparsity)",
                              description=__doc__)
    p.add_argument("out", help="the --out folder of `sparsebert srnet`")
    p.add_argument("--report-dir", default=None, help="where to write (default: OUT/report)")
    return p


def run(args) -> int:
    from ..report import write_report
    try:
        paths = write_report(args.out, args.report_dir)
    except FileNotFoundError as exc:
        print(f"sparsebert report: error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
