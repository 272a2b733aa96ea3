"""``python -m lab.satellite_sim``: run the simulated Satellite API until SIGTERM/SIGINT.

Prints exactly one line, ``LISTENING http://HOST:PORT/rpc/api`` (``https`` with ``--tls-cert``), on stdout once it accepts
connections; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from .model import FLAVORS, SESSION_PURGE_INTERVAL
from .server import SatelliteSimulator, configure_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m lab.satellite_sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: pick a free one)")
    parser.add_argument("--username", required=True, help="login of the org admin API user")
    parser.add_argument("--password", required=True, help="its password")
    parser.add_argument("--seed", default=None, help="seed JSON (default: lab/satellite_sim/seed.json)")
    parser.add_argument(
        "--session-lifetime", type=float, default=3600.0,
        help="seconds a session lives without use (web.session_database_lifetime)",
    )
    parser.add_argument(
        "--session-purge-interval", type=float, default=SESSION_PURGE_INTERVAL,
        help="seconds between session cleanups, which delete sessions expired for two lifetimes "
        "(Taskomatic session-cleanup-default: every 15 minutes)",
    )
    parser.add_argument(
        "--flavor", choices=FLAVORS, default="uyuni",
        help="the server to play: uyuni (has system.createSystemProfile) or spacewalk (Spacewalk / Satellite 5)",
    )
    parser.add_argument(
        "--delete-delay", type=float, default=1.0,
        help="seconds before system.deleteSystems actually removes the systems",
    )
    parser.add_argument("--tls-cert", default=None, help="PEM certificate (chain): serve https")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--verbose", action="store_true", help="log every HTTP request")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator in the foreground."""
    args = parse_args(argv)
    configure_logging(args.verbose)
    sim = SatelliteSimulator(
        username=args.username, password=args.password, host=args.host, port=args.port,
        seed=args.seed, session_lifetime=args.session_lifetime,
        session_purge_interval=args.session_purge_interval, delete_delay=args.delete_delay, flavor=args.flavor,
        tls_cert=args.tls_cert, tls_key=args.tls_key,
    )
    url = sim.bind()

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() blocks until serve_forever returns, so it cannot run in the serving thread.
        threading.Thread(target=sim.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"LISTENING {url}", flush=True)
    sim.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
