"""``itvnode status [--json]``: studies, phases, states and reasons (reads data_dir only)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list (for scripts)")
    parser.add_argument("--state", action="append", default=None,
                        help="only studies in this state (repeatable)")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from service.settings import load_settings
    from service.status import collect_status, format_table

    settings = load_settings()
    rows = collect_status(settings.data_dir, quiet_period=settings.quiet_period)
    if args.state:
        rows = [r for r in rows if r["state"] in set(args.state)]
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(rows) + "\n")
    return 0
