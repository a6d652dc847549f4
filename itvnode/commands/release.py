"""``itvnode release STUDY``: process a held study on purpose (the node may be running or stopped)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", help="study key or StudyInstanceUID (see itvnode status)")


def run(args: argparse.Namespace) -> int:
    from service.ops.admin import release_study
    from service.settings import load_settings

    settings = load_settings()
    return print_results(release_study(settings.data_dir, args.study))


def print_results(results: Sequence[Any]) -> int:
    """One line per study key (errors on stderr); exit status 0 when every action applied."""
    import sys

    for r in results:
        print(r.message, file=sys.stdout if r.ok else sys.stderr)
    return 0 if all(r.ok for r in results) else 1
