"""The audit answers "who did what to which host": an operator's actions carry their Unix user
(the admin socket's peer credentials), every event its host, and governord-ctl audit filters by
host, application, kind, actor and time."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.stack import Governord, Lab


def _ctl_as(daemon: Governord, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    """governord-ctl run by another Unix user (root only can switch)."""
    return subprocess.run(["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", sys.executable, "-m",
                           "governord.ctl", "--socket", str(daemon.socket), *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})


def test_who_did_what_to_which_host(lab: Lab) -> None:
    # the admin socket where another user can reach it (the test's own directories are 0700)
    public = Path(tempfile.mkdtemp(prefix="governord-audit-"))
    public.chmod(0o755)
    config = lab.write_config()
    config.write_text(config.read_text().replace(f'admin_socket = "{config.parent / "admin.sock"}"',
                                                 f'admin_socket = "{public / "admin.sock"}"'))
    governord = lab.start_governord(config)
    governord.socket = public / "admin.sock"
    try:
        _who_did_what(governord)
    finally:
        governord.stop()
        shutil.rmtree(public, ignore_errors=True)


def _who_did_what(governord: Governord) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    started = time.time()
    governord.ctl("scale", "demo", "node", "--add", "2", "--wait")
    first, second = governord.ctl_json("hosts", "list")
    if os.getuid() == 0:
        # another user, let in by the socket's mode, is recorded as that user
        os.chmod(governord.socket, 0o666)
        retired = _ctl_as(governord, "nobody", "retire", first["name"], "--wait")
        assert retired.returncode == 0, retired.stderr
        other = "operator:nobody"
    else:
        governord.ctl("retire", first["name"], "--wait")
        other = f"operator:{me}"

    # every event of that host, and only those, with its host shown
    mine = governord.ctl_json("audit", "--host", first["name"])
    assert mine and {e["host"] for e in mine} == {first["fqdn"]}
    assert {e["host_id"] for e in mine} == {first["id"]}
    assert [e["actor"] for e in mine if e["kind"] == "retire-requested"] == [other]
    assert "gone" in [e["kind"] for e in mine]
    # the scale request: its operator
    [asked] = governord.ctl_json("audit", "--kind", "request-accepted", "--app", "demo")
    assert asked["actor"] == f"operator:{me}"
    # by actor: the prefix `operator` is every operator; one user's alone
    by_operators = governord.ctl_json("audit", "--actor", "operator")
    assert {e["actor"] for e in by_operators} == {f"operator:{me}", other}
    assert {e["kind"] for e in governord.ctl_json("audit", "--actor", other)} == {"retire-requested"}
    # by time: all of it since the test began, nothing before it, nothing in the future
    assert len(governord.ctl_json("audit", "--since", time.strftime("%Y-%m-%dT%H:%M:%S",
                                                                     time.localtime(started - 1)))) \
        == len(governord.ctl_json("audit"))
    assert governord.ctl_json("audit", "--until", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started - 60))) == []
    assert governord.ctl_json("audit", "--since", "1h", "--host", second["name"])
    # the table names the host in its own column
    table = governord.ctl("audit", "--host", first["name"]).stdout
    header = table.splitlines()[0].split()
    assert header[:4] == ["TIME", "KIND", "ACTOR", "HOST"] and first["fqdn"] in table
    bad = governord.ctl("audit", "--since", "yesterday-ish", check=False)
    assert bad.returncode == 2 and "30m, 2h, 7d" in bad.stderr
