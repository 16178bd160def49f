"""`sparsebert report OUT`: ID and OOD metric vs sparsity per method, one PNG per task, with the numbers
(summary.json, summary.csv, <task>.md) from the SRNet run JSONs under OUT."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="plot and tabulate SRNet runs (ID and OOD metric vs sparsity)",
                              description=__doc__)
    p.add_argument("out", help="the --out folder of `sparsebert srnet`")
    p.add_argument("--report-dir", default=None, help="where to write (default: OUT/report)")
    return p


def check_args(args) -> None:
    """Refuse a --report-dir that is a file and run JSONs that do not parse, naming them (ValueError)."""
    if args.report_dir is not None and Path(args.report_dir).exists() and not Path(args.report_dir).is_dir():
        raise ValueError(f"--report-dir: {args.report_dir!r} exists and is not a folder")
    for path in sorted(Path(args.out).glob("*/*/run.json")):
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable run JSON ({exc}); delete the run folder to rerun it") from None
        missing = [k for k in ("task", "run") if not isinstance(run, dict) or k not in run]
        if missing:
            raise ValueError(f"{path}: not an SRNet run JSON (no {', '.join(missing)}); delete the run folder to rerun it")


def run(args) -> int:
    from ..report import write_report
    try:
        check_args(args)
        paths = write_report(args.out, args.report_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"sparsebert report: error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
