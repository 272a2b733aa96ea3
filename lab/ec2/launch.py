"""Run ``moto_server`` on a free loopback port and say ``LISTENING <url>`` once it accepts.

moto_server announces itself only through werkzeug's log on stderr, and needs its port up front,
so this small supervisor (run with any Python 3; it imports nothing of moto or governord) picks
a free port, starts the given moto_server on it, waits until the port accepts connections and
prints the line :func:`lab.process.start_peer` waits for. moto_server's own output goes to this
process's stderr (the peer's log), never to stdout: nobody reads stdout after the banner, and a
full pipe would stall the server.

Usage: ``launch.py MOTO_SERVER [HOST]``. SIGTERM (to the process group) stops both.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from types import FrameType

#: how often a port that another process grabbed first is given up for a new one
ATTEMPTS = 5
#: seconds moto_server may take to accept connections
START_TIMEOUT = 30.0


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _start(server: str, host: str) -> tuple[subprocess.Popen[bytes], int] | None:
    port = _free_port(host)
    child = subprocess.Popen([server, "-H", host, "-p", str(port)], stdout=sys.stderr, stderr=sys.stderr)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return None  # most likely the port was taken between choosing and binding it
        if _accepts(host, port):
            return child, port
        time.sleep(0.05)
    child.kill()
    child.wait()
    return None


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    server, host = argv[1], (argv[2] if len(argv) == 3 else "127.0.0.1")
    for _ in range(ATTEMPTS):
        started = _start(server, host)
        if started is not None:
            break
    else:
        print(f"launch.py: {server} did not start on {host}", file=sys.stderr)
        return 1
    child, port = started

    def forward(signum: int, frame: FrameType | None) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print(f"LISTENING http://{host}:{port}", flush=True)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
