"""``itvnode delete STUDY``: remove a study and everything the node holds of it (not while processing)."""

from __future__ import annotations

import argparse

from itvnode.commands.release import print_results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", help="study key or StudyInstanceUID (see itvnode status)")


def run(args: argparse.Namespace) -> int:
    from service.ops.admin import delete_study
    from service.settings import load_settings

    return print_results(delete_study(load_settings().data_dir, args.study))
