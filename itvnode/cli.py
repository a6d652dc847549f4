"""The ``itvnode`` command.

Each subcommand lives in ``itvnode.commands.<name>`` and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Command modules keep heavy imports (torch, celery worker) inside ``run`` so
that ``itvnode serve`` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# numpy asks the kernel for transparent huge pages on every large array (MADV_HUGEPAGE). With THP defrag at
# "madvise" (the kernel's default) the first touch of such memory may compact memory synchronously: a
# study's 4D volume, masks and scratch arrays then stall for about a second (bench/e2e.py: the per-phase
# section 2.2-2.4 s -> 1.3 s, docs/deploy.md). Set before anything imports numpy; an admin's value wins.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

from itvnode import __version__

COMMANDS: dict[str, str] = {
    "serve": "DICOM Storage SCP (C-ECHO, C-STORE) and the study assembler",
    "worker": "Celery worker (queues: inference, export)",
    "run": "the whole node on one machine: SCP + assembler + worker, embedded broker",
    "status": "studies, phases, states and reasons",
    "segment": "the whole pipeline on a DICOM folder, no network, no queue",
    "itv": "temporal filter, connectivity and ITV on per-phase RTSTRUCT contours a site already has",
    "send": "C-STORE files to a destination (manual resend)",
    "phantom": "write a synthetic breathing-thorax 4DCT with ground truth",
    "train": "fine-tune the LoRA adapter on annotated volumes",
    "evaluate": "Dice / HD95 / MSD report on annotated 4DCTs (the node's model or --predicted RTSTRUCTs)",
    "testmodel": "write a tiny RANDOM-INIT SAM 3 to try train / evaluate without the weights",
    "health": "check the running node (exit 0 when healthy)",
    "release": "admin: process a held study anyway (STUDY = study key or StudyInstanceUID)",
    "retry": "admin: process a failed study again",
    "resend": "admin: deliver a study's kept RTSTRUCT again [--to AE@host:port]",
    "delete": "admin: remove a study and everything held of it",
    "purge": "admin: purge finished studies now [--older-than DAYS] [--dry-run]",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="itvnode", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"itvnode {__version__}")
    parser.add_argument("--config", help="YAML settings file (also ITVNODE_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"itvnode.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"itvnode.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


#: Commands whose output carries no patient data and is meant for other accounts too (the worker image reads
#: a trained adapter as its own user); every other command handles patient data and creates owner-only files.
SHARED_OUTPUT = frozenset({"phantom", "train"})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in SHARED_OUTPUT:
        from service.store.durable import use_private_umask

        use_private_umask()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.config:
        os.environ["ITVNODE_CONFIG"] = args.config
    from service.settings import SettingsError

    try:
        return int(args._module.run(args) or 0)
    except SettingsError as exc:
        print(f"itvnode: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
