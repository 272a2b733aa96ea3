"""``python -m lab.ovirt_sim``: run the oVirt engine simulator until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from .app import create_app
from .seed import load_seed
from .server import ssl_context, start_site
from .state import EngineState, Timing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m lab.ovirt_sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    parser.add_argument("--username", default="admin@internal", help="the API user, with its profile")
    parser.add_argument("--password", required=True, help="the API user's password")
    parser.add_argument("--seed", default=None, help="seed JSON file (default: the lab inventory)")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate: serve HTTPS")
    parser.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
    parser.add_argument("--time-unit", type=float, default=1.0,
                        help="seconds one step of a status transition takes (tests use ~0.05)")
    parser.add_argument("--token-idle-timeout", type=float, default=None,
                        help="seconds after which an unused SSO token expires (default: never)")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    return args


async def serve(args: argparse.Namespace) -> None:
    """Listen, announce the URL on stdout, and serve until told to stop."""
    seed = load_seed(args.seed)
    state = EngineState(seed, Timing.scaled(args.time_unit))
    app = create_app(seed, args.username, args.password, state=state, token_idle_timeout=args.token_idle_timeout)
    runner, url = await start_site(app, args.host, args.port, ssl_context(args.tls_cert, args.tls_key))
    print(f"LISTENING {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
