"""systemd integration: READY only once both APIs listen, the watchdog kept alive, SIGHUP
reload (an invalid config refused, the old one kept), and the unit file itself."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from governord.config import ApiSection
from governord.descriptors import RESERVED_DESCRIPTORS
from lab.stack import Lab

from .conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_ready_only_when_listening_and_watchdog_pings(lab: Lab) -> None:
    daemon = lab.start_governord(extra_env={"WATCHDOG_USEC": "400000"}, wait_ready=False)
    try:
        daemon.wait_notification("READY=1", timeout=60)
        # at the moment READY arrives both listeners accept connections
        with socket.create_connection(("127.0.0.1", daemon.api_port), timeout=2):
            pass
        with socket.socket(socket.AF_UNIX) as admin:
            admin.connect(str(daemon.socket))
        assert oct(os.stat(daemon.socket).st_mode & 0o777) == "0o600"
        assert any(n.startswith("MAINPID=") for n in daemon.notifications)
        time.sleep(1.0)
        daemon.read_notifications(0.2)
        assert daemon.notifications.count("WATCHDOG=1") >= 3
    finally:
        daemon.stop()


def test_sighup_reloads_and_refuses_an_invalid_config(lab: Lab) -> None:
    config = lab.write_config()
    daemon = lab.start_governord(config)
    try:
        original = config.read_text()
        config.write_text(original.replace("max_hosts = 10", "max_hosts = 'lots'"))
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in daemon.log.read_text(), 20, what="refusal")
        assert "applications.demo.max_hosts" in daemon.log.read_text()
        daemon.read_notifications(0.2)
        assert any(n.startswith("STATUS=reload refused") for n in daemon.notifications)
        # the old config is in force: a request within the old cap is accepted
        assert "accepted" in daemon.ctl("scale", "demo", "node", "--add", "1").stdout
        config.write_text(original.replace("max_hosts = 10", "max_hosts = 1"))
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in daemon.log.read_text(), 20, what="reload")
        declined = daemon.ctl("scale", "demo", "node", "--add", "1", check=False)
        assert declined.returncode == 1 and "may have 1 hosts" in declined.stderr
        assert daemon.process.poll() is None
    finally:
        assert daemon.stop() == 0


def test_secrets_never_reach_the_log(lab: Lab) -> None:
    daemon = lab.start_governord()
    daemon.ctl("scale", "demo", "node", "--add", "1", "--wait")
    daemon.stop()
    log = daemon.log.read_text()
    for secret in lab.passwords.values():
        assert secret not in log


def _unit(path: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    return values


def test_unit_file() -> None:
    unit = _unit(ROOT / "systemd" / "governord.service")
    assert unit["Type"] == ["notify"]
    assert unit["WatchdogSec"] and unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["RestartPreventExitStatus"] == ["2"]
    # the daemon's shutdown grace must end before systemd's stop timeout
    assert int(unit["TimeoutStopSec"][0].rstrip("s")) > 20
    # every connection is a descriptor: the default caps fit under the unit's limit
    assert int(unit["LimitNOFILE"][0]) >= ApiSection().max_connections + RESERVED_DESCRIPTORS
    assert (ROOT / "systemd" / "governord.sysusers.conf").read_text().strip()
    assert (ROOT / "systemd" / "governord.tmpfiles.conf").read_text().strip()
