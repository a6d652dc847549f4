"""``itvnode retry STUDY``: process a failed study again (the node may be running or stopped)."""

from __future__ import annotations

import argparse

from itvnode.commands.release import print_results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", help="study key or StudyInstanceUID (see itvnode status)")


def run(args: argparse.Namespace) -> int:
    from service.ops.admin import retry_study
    from service.settings import load_settings

    return print_results(retry_study(load_settings().data_dir, args.study))
