"""``python -m lab.foreman_sim``: run the Foreman simulator until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web

from .app import create_app
from .seed import load_seed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m lab.foreman_sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    parser.add_argument("--username", default="admin", help="the API user's login")
    parser.add_argument("--password", required=True, help="the API user's password")
    parser.add_argument("--seed", default=None, help="seed JSON file (default: the lab seed)")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    """Listen, announce the URL on stdout, and serve until told to stop."""
    app = create_app(load_seed(args.seed), args.username, args.password)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"LISTENING http://{host}:{port}", flush=True)
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
