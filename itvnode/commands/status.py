"""``itvnode status [--json]``: studies, phases, states and reasons (reads data_dir only)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", nargs="?", metavar="STUDY",
                        help="one study (key or StudyInstanceUID): history, timings, QA warnings, delivery")
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    parser.add_argument("--state", action="append", default=None,
                        help="only studies in this state (repeatable)")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from service.ops.status import collect_status, format_table
    from service.settings import load_settings

    settings = load_settings()
    where = f"data directory: {settings.data_dir.resolve()}"
    # last line for people; on stderr with --json (its stdout stays the JSON scripts parse)
    if args.json:
        print(where, file=sys.stderr)
    if args.study:
        from service.ops.status import format_detail, study_detail

        detail = study_detail(settings.data_dir, args.study, settings.quiet_period)
        if not detail:
            print(f"no study {args.study!r} under {settings.data_dir}", file=sys.stderr)
            return 1
        if args.json:
            json.dump(detail, sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(format_detail(detail) + "\n" + where + "\n")
        return 0
    rows = collect_status(settings.data_dir, quiet_period=settings.quiet_period)
    if args.state:
        rows = [r for r in rows if r["state"] in set(args.state)]
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(rows) + "\n" + where + "\n")
    return 0
