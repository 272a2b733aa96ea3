"""``governord``: the daemon's entry point. ``python -m governord`` does the same."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .daemon import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="governord", description="The Governor daemon.")
    parser.add_argument("--config", "-c", default="/etc/governord/governord.toml", help="config file (TOML)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit (0 valid, 2 not)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    return run(args.config, check_only=args.check)


if __name__ == "__main__":
    sys.exit(main())
