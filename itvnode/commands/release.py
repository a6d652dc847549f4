"""``itvnode release STUDY``: process a held study on purpose (the node may be running or stopped)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", help="study key or StudyInstanceUID (see itvnode status)")


def run(args: argparse.Namespace) -> int:
    import sys

    from service.admin import release_study
    from service.settings import load_settings

    settings = load_settings()
    results = release_study(settings.data_dir, args.study)
    for r in results:
        print(r.message, file=sys.stdout if r.ok else sys.stderr)
    return 0 if all(r.ok for r in results) else 1
