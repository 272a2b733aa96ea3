"""Run sushy-emulator's Flask app with the fake systems driver, as governord's Redfish lab peer.

Runs in the lab's own virtualenv (``lab/.build/baremetal-venv``, made by ``install.sh``), never
in governord's. It differs from the ``sushy-emulator`` command in three ways:

- the fake driver applies a power change after ``random.randint(1, 11)`` seconds, hard-coded;
  here the delay is ``--power-delay`` seconds (default 0: visible on the next read), because
  tests that wait up to 11 s per transition would take minutes;
- it binds port 0 when asked and prints ``LISTENING http://127.0.0.1:PORT`` once the socket
  accepts connections (what :func:`lab.process.start_peer` waits for);
- basic authentication is set up from ``--username`` and the environment variable
  ``SUSHY_LAB_PASSWORD`` (an htpasswd file with a bcrypt hash is written into ``--state-dir``).

Everything else (routes, templates, status codes, the fake driver's state in SQLite under
``SUSHY_EMULATOR_STATE_DIR``) is sushy-tools' own code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


class _FixedDelay:
    """Stands in for the ``random`` module inside the fake driver: its only use is the delay."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def randint(self, low: int, high: int) -> int:
        return self.seconds


def _write_config(state_dir: Path, systems: list[dict[str, Any]], username: str, password: str) -> Path:
    import bcrypt

    htpasswd = state_dir / "htpasswd"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"{username}:{hashed}\n", encoding="utf-8")
    config = state_dir / "emulator.conf"
    # Flask reads this file with from_pyfile: it is Python, and repr() keeps the values exact.
    config.write_text(
        "\n".join(
            [
                "SUSHY_EMULATOR_FAKE_DRIVER = True",
                f"SUSHY_EMULATOR_STATE_DIR = {str(state_dir / 'state')!r}",
                f"SUSHY_EMULATOR_AUTH_FILE = {str(htpasswd)!r}",
                f"SUSHY_EMULATOR_FAKE_SYSTEMS = {systems!r}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="per-instance directory")
    parser.add_argument("--systems", type=Path, required=True, help="JSON list of fake systems")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--username", default="admin")
    parser.add_argument("--power-delay", type=int, default=0, help="seconds until a power change shows")
    args = parser.parse_args(argv)

    password = os.environ.get("SUSHY_LAB_PASSWORD")
    if not password:
        parser.error("SUSHY_LAB_PASSWORD is not set")
    args.state_dir.mkdir(parents=True, exist_ok=True)
    systems = json.loads(args.systems.read_text(encoding="utf-8"))
    config = _write_config(args.state_dir, systems, args.username, password)

    from sushy_tools.emulator import main as emulator
    from sushy_tools.emulator.resources.systems import fakedriver
    from werkzeug.serving import make_server

    fakedriver.random = _FixedDelay(args.power_delay)  # type: ignore[assignment]
    emulator.app.configure(config_file=str(config))
    server = make_server(args.host, args.port, emulator.app, threaded=True)
    host, port = server.socket.getsockname()[:2]
    print(f"LISTENING http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
