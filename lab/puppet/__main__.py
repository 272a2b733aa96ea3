"""``python -m lab.puppet WORKDIR``: run a lab Puppet stack until SIGTERM or SIGINT (for the demo).

Prints ``LISTENING <puppetserver url>`` once puppetserver and PuppetDB answer (the line
:func:`lab.process.start_peer` waits for) and writes everything else a client needs to
``WORKDIR/stack.json``. With ``--foreman-url``, Foreman classifies nodes through
lab/puppet/enc.py; the credentials come from ``$FOREMAN_USER`` and ``$FOREMAN_PASSWORD``, never
from the command line. With ``--token-autosign``, a CSR is signed when its challengePassword
equals ``WORKDIR/tokens/<certname>``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from . import start_puppet_stack, write_enc_config, write_token_autosign


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m lab.puppet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="state directory (new or empty; searchable by user postgres)")
    parser.add_argument("--foreman-url", help="classify nodes with this Foreman (simulator) as ENC")
    parser.add_argument("--token-autosign", action="store_true", help="sign CSRs carrying the token in WORKDIR/tokens")
    parser.add_argument("--autosign", help="the autosign setting itself (a policy executable or autosign.conf)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Start the stack, announce it, and stop it on SIGTERM/SIGINT."""
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    enc_command = None
    if args.foreman_url:
        enc_command = write_enc_config(workdir / "enc.json", args.foreman_url, os.environ.get("FOREMAN_USER", "admin"),
                                       os.environ.get("FOREMAN_PASSWORD", ""))
    autosign = args.autosign or (str(write_token_autosign(workdir)) if args.token_autosign else None)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stack = start_puppet_stack(workdir / "stack", autosign_command=autosign, enc_command=enc_command)
    try:
        (workdir / "stack.json").write_text(json.dumps(stack.describe(), indent=2), encoding="utf-8")
        print(f"LISTENING {stack.server_url}", flush=True)
        stop.wait()
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
