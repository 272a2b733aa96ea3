"""systemd integration: READY only once both APIs listen, the watchdog kept alive, SIGHUP
reload (an invalid config refused, the old one kept), and the unit file itself."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
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


def test_a_refused_reload_fails_the_reload_command_and_shows_in_status(lab: Lab) -> None:
    """What `systemctl reload governord` runs (ExecReload): governord-ctl reload exits 1 naming
    every error of the refused config; status shows the refusal; a good config is taken."""
    config = lab.write_config()
    daemon = lab.start_governord(config)
    try:
        original = config.read_text()
        config.write_text(original.replace("max_hosts = 10", "max_hosts = 'lots'")
                          .replace("workers = 8", "workers = 0"))
        refused = daemon.ctl("reload", check=False)
        assert refused.returncode == 1
        [line] = refused.stderr.strip().splitlines()
        assert "reload refused" in line and "applications.demo.max_hosts" in line and "engine.workers" in line
        status = daemon.ctl("status").stdout
        assert "REFUSED" in status and "engine.workers" in status
        assert daemon.ctl_json("status")["last_reload"]["refused"]
        config.write_text(original.replace("max_hosts = 10", "max_hosts = 1"))
        assert daemon.ctl("reload").returncode == 0
        assert daemon.ctl_json("status")["last_reload"]["refused"] is None
        declined = daemon.ctl("scale", "demo", "node", "--add", "2", check=False)
        assert declined.returncode == 1 and "may have 1 hosts" in declined.stderr
    finally:
        assert daemon.stop() == 0


def test_check_reports_every_error_and_can_leave_secrets_unread(lab: Lab, tmp_path: Path) -> None:
    config = lab.write_config()
    text = config.read_text()
    broken = tmp_path / "broken.toml"
    broken.write_text(text.replace("max_hosts = 10", "max_hosts = 'lots'").replace("workers = 8", "workers = 0")
                      .replace('name_pattern = "demo-node-{seq:02d}"', 'name_pattern = "demo node {seq}"'))
    check = subprocess.run([sys.executable, "-m", "governord", "--check", "--config", str(broken)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 2 and "Traceback" not in check.stderr
    lines = check.stderr.strip().splitlines()
    assert all(x.startswith(f"governord: configuration error: {broken}: ") for x in lines)
    keys = {x.split(": ")[3] for x in lines}
    assert {"engine.workers", "applications.demo.max_hosts"} <= keys, lines

    # the secrets the daemon reads from its environment: not here; --no-secrets checks the rest
    env = {k: v for k, v in os.environ.items() if k not in lab.passwords}
    without = subprocess.run([sys.executable, "-m", "governord", "--check", "--config", str(config)],
                             capture_output=True, text=True, timeout=120, env=env)
    assert without.returncode == 2 and "is not set" in without.stderr
    unread = subprocess.run([sys.executable, "-m", "governord", "--check", "--no-secrets", "--config", str(config)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert unread.returncode == 0 and "valid (secrets not read)" in unread.stdout, unread.stderr
    # ... but a reference of the wrong shape is still an error
    bad = tmp_path / "bad-secret.toml"
    bad.write_text(re.sub(r"password = \{ env = \"[A-Z_]+\" \}", 'password = "hunter2"', text, count=1))
    refused = subprocess.run([sys.executable, "-m", "governord", "--check", "--no-secrets", "--config", str(bad)],
                             capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2 and "a secret is given by reference" in refused.stderr
    assert "hunter2" not in refused.stderr


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
    # systemctl reload waits for the outcome, and fails with the reason when the config is refused
    assert unit["WatchdogSec"] and unit["ExecReload"] == ["/usr/bin/governord-ctl --socket /run/governord/admin.sock "
                                                          "reload"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["RestartPreventExitStatus"] == ["2"]
    # the daemon's shutdown grace must end before systemd's stop timeout
    assert int(unit["TimeoutStopSec"][0].rstrip("s")) > 20
    # every connection is a descriptor: the default caps fit under the unit's limit
    assert int(unit["LimitNOFILE"][0]) >= ApiSection().max_connections + RESERVED_DESCRIPTORS
    assert (ROOT / "systemd" / "governord.sysusers.conf").read_text().strip()
    assert (ROOT / "systemd" / "governord.tmpfiles.conf").read_text().strip()
