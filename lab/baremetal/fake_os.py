"""A simulated operating system for one lab machine: what makes "wait until it is up" real.

The process watches its machine's BMC the way the machine itself experiences it (the power rail
and the boot device chosen at power-on): for an ipmi_sim machine it reads the state files that
the simulator's chassis-control script writes, for a Redfish machine it GETs the System
resource from sushy-emulator over HTTP. It behaves like a server being provisioned:

- power goes on with a network (PXE) boot requested: after ``--install-delay`` seconds the
  "installer" has finished, the disk holds an OS, and the machine's sshd opens: a TCP listener
  on its own loopback address ``--address:--port`` that answers with an SSH banner;
- power goes on without network boot: the OS on disk boots after ``--boot-delay`` seconds, or,
  if nothing was ever installed, nothing happens (no bootable device);
- power goes off: the listener closes at once.

A BMC that cannot be read changes nothing (a real machine keeps running when its BMC is
unreachable). ``--state-dir`` holds ``installed`` (the disk has an OS) and ``status.json``
(``{"power": ..., "os": "off|installing|booting|up|no-os"}``, for tests and the demo).

Standard library only, so any Python 3.11 runs it. Prints ``LISTENING tcp://ADDRESS:PORT``
once it watches (the address its sshd will use; nothing listens there until the OS is up).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

BANNER = b"SSH-2.0-governord-lab-fake-os\r\n"

#: (powered on, boot device chosen is the network, count of power-ons if the BMC keeps one)
Reading = tuple[bool, bool, int | None]


def ipmi_reader(chassis_dir: Path) -> Callable[[], Reading]:
    """Read ipmi_sim's chassis state as the hardware sees it (files the chassis script writes)."""

    def read() -> Reading:
        try:
            power = (chassis_dir / "state.power").read_text().strip()
        except FileNotFoundError:
            power = "0"
        try:
            boot = (chassis_dir / "state.boot").read_text().strip()
        except FileNotFoundError:
            boot = "default"
        try:
            boots: int | None = int((chassis_dir / "state.boots").read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            boots = 0
        return power == "1", boot == "pxe", boots

    return read


def redfish_reader(url: str, system_id: str, username: str, password: str) -> Callable[[], Reading]:
    """Read the System resource from a Redfish service (sushy-emulator) over plain HTTP."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"{url.rstrip('/')}/redfish/v1/Systems/{system_id}",
        headers={"Authorization": f"Basic {token}", "Accept": "application/json"},
    )

    def read() -> Reading:
        with urllib.request.urlopen(request, timeout=2) as response:
            system = json.load(response)
        boot = (system.get("Boot") or {}).get("BootSourceOverrideTarget")
        return system.get("PowerState") == "On", boot == "Pxe", None

    return read


class FakeOs:
    """The machine's OS: a state machine driven by power and boot readings."""

    def __init__(self, address: str, port: int, state_dir: Path, install_delay: float, boot_delay: float) -> None:
        self.address = address
        self.port = port
        self.state_dir = state_dir
        self.install_delay = install_delay
        self.boot_delay = boot_delay
        self.powered = False
        self.up_at: float | None = None
        self.installing = False
        self.listener: socket.socket | None = None
        self.power_ons: int | None = None
        self._status: dict[str, str] = {}

    @property
    def installed(self) -> bool:
        return (self.state_dir / "installed").exists()

    def observe(self, powered: bool, network_boot: bool, power_ons: int | None, now: float) -> None:
        if power_ons is not None:
            if self.power_ons is not None and power_ons != self.power_ons and self.powered:
                self.observe(False, False, None, now)  # it went off and on again since the last look
            self.power_ons = power_ons
        if powered and not self.powered:
            self.powered = True
            if network_boot:
                self.installing = True
                self.up_at = now + self.install_delay
            elif self.installed:
                self.installing = False
                self.up_at = now + self.boot_delay
            else:
                self.up_at = None
        elif not powered and self.powered:
            self.powered = False
            self.up_at = None
            self.installing = False
            self._close()
        if self.powered and self.up_at is not None and now >= self.up_at and self.listener is None:
            if self.installing:
                (self.state_dir / "installed").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
                self.installing = False
            self._open()
        self._write_status()

    def _open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.address, self.port))
        sock.listen(16)
        sock.setblocking(False)
        self.listener = sock

    def _close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def serve(self, timeout: float) -> None:
        """Answer connections to sshd (banner, close) for up to ``timeout`` seconds."""
        if self.listener is None:
            time.sleep(timeout)
            return
        ready, _, _ = select.select([self.listener], [], [], timeout)
        if not ready:
            return
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            with conn:
                conn.sendall(BANNER)

    def _write_status(self) -> None:
        if self.listener is not None:
            os_state = "up"
        elif not self.powered:
            os_state = "off"
        elif self.up_at is None:
            os_state = "no-os"
        else:
            os_state = "installing" if self.installing else "booting"
        status = {"power": "on" if self.powered else "off", "os": os_state}
        if status == self._status:
            return
        self._status = status
        path = self.state_dir / "status.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="simulated OS of one lab machine")
    parser.add_argument("--address", required=True, help="the machine's own loopback address")
    parser.add_argument("--port", type=int, required=True, help="its sshd port")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--install-delay", type=float, default=0.3)
    parser.add_argument("--boot-delay", type=float, default=0.2)
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between BMC readings")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ipmi-chassis-dir", type=Path, help="ipmi_sim instance dir (chassis state files)")
    source.add_argument("--redfish-url", help="Redfish service root URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--system-id", help="Redfish System id")
    parser.add_argument("--username", default="admin", help="Redfish user (password: FAKE_OS_BMC_PASSWORD)")
    args = parser.parse_args(argv)

    if args.ipmi_chassis_dir is not None:
        read = ipmi_reader(args.ipmi_chassis_dir)
    else:
        if not args.system_id:
            parser.error("--redfish-url needs --system-id")
        read = redfish_reader(args.redfish_url, args.system_id, args.username, os.environ["FAKE_OS_BMC_PASSWORD"])

    args.state_dir.mkdir(parents=True, exist_ok=True)
    machine = FakeOs(args.address, args.port, args.state_dir, args.install_delay, args.boot_delay)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"LISTENING tcp://{args.address}:{args.port}", flush=True)
    while True:
        try:
            powered, network_boot, power_ons = read()
        except (OSError, ValueError):
            powered, network_boot, power_ons = machine.powered, False, None
        machine.observe(powered, network_boot, power_ons, time.monotonic())
        machine.serve(args.poll)


if __name__ == "__main__":
    sys.exit(main())
