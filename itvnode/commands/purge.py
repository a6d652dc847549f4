"""``itvnode purge [--older-than DAYS] [--dry-run]``: the retention rule on demand (finished studies only)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--older-than", type=float, metavar="DAYS",
                        help="finished at least this many days ago (default: retention_days)")
    parser.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")


def run(args: argparse.Namespace) -> int:
    from itvnode.commands.release import print_results
    from service.ops.admin import purge_studies
    from service.ops.retention import RetentionPolicy
    from service.settings import load_settings

    settings = load_settings()
    if args.older_than is not None and args.older_than < 0:
        raise SystemExit("itvnode purge: --older-than must be >= 0")
    return print_results(purge_studies(settings.data_dir, RetentionPolicy.from_settings(settings),
                                       older_than_days=args.older_than, dry_run=args.dry_run))
