"""``itvnode send FILES... --to AE@host:port``: C-STORE files as stored (manual resend, dead-letter replay).

Prints one line per file and destination; exits 0 when every file was stored everywhere, 1 when any file
failed, 3 when a destination could not be reached or refused the association.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="DICOM Part 10 files or folders (searched recursively)")
    parser.add_argument("--to", dest="to", action="append", required=True, metavar="AE@host:port",
                        help="destination (repeat for several)")
    parser.add_argument("--calling-ae", help="our AE title (default: the node's ae_title setting)")
    parser.add_argument("--tls-ca", type=Path, help="CA bundle to verify the destination (enables TLS)")
    parser.add_argument("--tls-cert", type=Path, help="our client certificate (enables TLS)")
    parser.add_argument("--tls-key", type=Path, help="key of --tls-cert")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds for connect / association / each C-STORE response (default 30)")


def _expand(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        else:
            out.append(p)
    return out


def run(args: argparse.Namespace) -> int:
    from service.net.scu import send_files
    from service.setting_values import Destination, TLSSettings
    from service.settings import load_settings

    if not getattr(args, "verbose", False):  # our own lines say what happened; -v shows pynetdicom's log
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

    calling_ae = args.calling_ae
    if not calling_ae:
        calling_ae = load_settings().ae_title
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        if bool(args.tls_cert) != bool(args.tls_key):
            print("itvnode send: --tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        tls = TLSSettings(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    try:
        destinations = [Destination.parse(t) for t in args.to]
    except ValueError as exc:
        print(f"itvnode send: {exc}", file=sys.stderr)
        return 2
    files = _expand(args.files)
    if not files:
        print("itvnode send: no files to send", file=sys.stderr)
        return 2

    rc = 0
    for dest in destinations:
        if tls is not None:
            dest = dest.model_copy(update={"tls": tls})
        outcome = send_files(files, dest, calling_ae, connect_timeout=args.timeout, acse_timeout=args.timeout,
                             dimse_timeout=args.timeout, network_timeout=max(args.timeout, 60.0))
        for r in outcome.results:
            status = f"0x{r.status:04X}" if r.status is not None else "------"
            word = "OK    " if r.delivered else "FAILED"
            line = f"{word} {status} {dest} {r.path}"
            if not r.delivered or r.message not in ("success", ""):
                line += f"  ({r.message})"
            print(line)
        delivered = len(outcome.delivered)
        print(f"{dest}: {delivered} of {len(outcome.results)} file(s) stored", file=sys.stderr)
        if outcome.error is not None and not outcome.connected:
            print(f"itvnode send: {outcome.error}", file=sys.stderr)
            rc = max(rc, EXIT_UNREACHABLE)
        elif outcome.error is not None and outcome.error.startswith("association rejected"):
            print(f"itvnode send: {outcome.error}", file=sys.stderr)
            rc = max(rc, EXIT_UNREACHABLE)
        elif not outcome.ok:
            rc = max(rc, EXIT_FAILED)
    return rc
