"""``itvnode resend STUDY [--to AE@host:port]``: deliver a study's kept RTSTRUCT again."""

from __future__ import annotations

import argparse

from itvnode.commands.release import print_results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", help="study key or StudyInstanceUID (see itvnode status)")
    parser.add_argument("--to", action="append", metavar="AE@host:port",
                        help="send there instead of the configured destinations (repeatable)")


def run(args: argparse.Namespace) -> int:
    import sys

    from service.intake.queue import Enqueuer
    from service.ops.admin import resend_study
    from service.setting_values import Destination
    from service.settings import load_settings

    settings = load_settings()
    try:
        dests = [Destination.parse(t) for t in args.to] if args.to else list(settings.destinations)
    except ValueError as exc:
        print(f"itvnode resend: {exc}", file=sys.stderr)
        return 2
    enqueuer = None
    try:
        enqueuer = Enqueuer(settings.broker_url, settings.data_dir)
    except Exception as exc:  # the export worker's outbox sweep delivers it
        print(f"itvnode resend: broker not reachable ({exc}); the node sends it from its outbox",
              file=sys.stderr)
    try:
        results = resend_study(settings.data_dir, args.study, dests,
                               enqueue_export=enqueuer.export_item if enqueuer else None)
    finally:
        if enqueuer is not None:
            enqueuer.close()
    return print_results(results)
