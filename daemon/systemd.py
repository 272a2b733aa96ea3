"""The bit of the systemd notify protocol governord speaks: READY, RELOADING, STOPPING, STATUS
and WATCHDOG datagrams to ``$NOTIFY_SOCKET`` (sd_notify(3)). Without the variable every call is
a no-op, so the daemon runs the same outside systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. ``"READY=1"``) to systemd; True if there was a socket to send to."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)
            return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd set for this process, or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000 / 2
    except ValueError:
        return None


async def keep_watchdog_alive(interval: float) -> None:
    """Ping from the event loop itself: if the loop is blocked, the pings stop and systemd
    restarts the daemon, which is the point."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
