"""`sparsebert info`: versions, GPU, built backends, compiled architectures."""
import json

from ..info import collect, format_info


def add_parser(subparsers):
    p = subparsers.add_parser("info", help="show versions, GPU and the backends this install has")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def run(args) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
