"""``governord``: the daemon's entry point. ``python -m governord`` does the same."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .daemon import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="governord", description="The Governor daemon.")
    parser.add_argument("--config", "-c", default="/etc/governord/governord.toml", help="config file (TOML)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, report every error, and exit (0 valid, 2 not)")
    parser.add_argument("--no-secrets", action="store_true",
                        help="with --check: check secret references' shape without reading them "
                             "(a shell without the daemon's environment or its secret files)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    if args.no_secrets and not args.check:
        parser.error("--no-secrets goes with --check: the daemon needs its secrets")
    return run(args.config, check_only=args.check, resolve_secrets=not args.no_secrets)


if __name__ == "__main__":
    sys.exit(main())
