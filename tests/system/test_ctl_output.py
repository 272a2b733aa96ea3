"""governord-ctl's output fits pipes and people: nothing cut or wrapped when it is not a terminal,
text from peers and operators shown as it is (no markup, no emoji codes), list commands in
-o wide/json/yaml, ids by a unique prefix, --wait on requests show and approve, unknown states
refused, a declined plan a non-zero exit, certificates' expiry shown. The real daemon and CLI
against the lab."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from lab.stack import Governord, Lab

#: what an operator may write, and what a peer may answer: rich would have made an emoji and a style of it
LITERAL = ":satellite: [bold]capacity[/bold] for the release"


def _piped(daemon: Governord, *args: str, columns: int = 30) -> subprocess.CompletedProcess[str]:
    """governord-ctl with its output into a pipe, the environment saying the terminal is narrow."""
    return subprocess.run([sys.executable, "-m", "governord.ctl", "--socket", str(daemon.socket), *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": str(columns)})


def test_ctl_output_for_pipes_and_people(lab: Lab) -> None:
    config = lab.write_config()
    config.write_text(config.read_text().replace("max_hosts = 10\n", "max_hosts = 10\napproval = 1\n"))
    daemon = lab.start_governord(config)
    try:
        # a plan the rules decline says why and exits 1, as the scale would; a held one exits 0
        declined = daemon.ctl("plan", "demo", "node", "--add", "50", check=False)
        assert declined.returncode == 1 and declined.stdout.startswith("declined (rule: max_hosts)")
        assert daemon.ctl("plan", "demo", "node", "--add", "2").stdout.startswith("pending (rule: approval)")

        held = daemon.ctl("scale", "demo", "node", "--add", "2", check=False)
        assert held.returncode == 1 and "pending approval" in held.stderr
        [pending] = daemon.ctl_json("requests", "list")
        prefix = pending["id"][:8]
        # by a unique prefix of its id, --wait showing a held request at once
        assert daemon.ctl_json("requests", "show", prefix, "--wait")["id"] == pending["id"]
        approved = daemon.ctl("requests", "approve", prefix, "-m", LITERAL, "--wait", timeout=600)
        assert approved.returncode == 0, approved.stderr
        assert "demo-node-01.lab.example: ready" in approved.stderr and "demo-node-02.lab.example: ready" in approved.stderr
        assert daemon.ctl_json("requests", "show", prefix)["status"] == "completed"

        # the operator's words come back as written, in a table and in a pipe
        audit = _piped(daemon, "audit", "--kind", "request-approved")
        assert audit.returncode == 0 and LITERAL in audit.stdout, audit.stdout

        # nothing cut at 30 columns in a pipe: every name and id whole, on one line each
        hosts = daemon.ctl_json("hosts", "list")
        wide = _piped(daemon, "hosts", "list", "-o", "wide")
        assert "…" not in wide.stdout
        lines = wide.stdout.splitlines()
        for host in hosts:
            [line] = [x for x in lines if x.split()[:1] == [host["fqdn"]]]
            assert host["id"] in line and "ready" in line
        # yaml and json are the same rows
        assert yaml.safe_load(_piped(daemon, "hosts", "list", "-o", "yaml").stdout) == hosts
        assert yaml.safe_load(_piped(daemon, "requests", "list", "-o", "yaml").stdout) == \
            daemon.ctl_json("requests", "list")
        # a host by a unique prefix of its id
        assert daemon.ctl_json("hosts", "show", hosts[0]["id"][:8])["fqdn"] == hosts[0]["fqdn"]

        # an unknown state is a usage error naming the states there are
        unknown = daemon.ctl("hosts", "list", "--state", "readdy", check=False)
        assert unknown.returncode == 2 and "'ready'" in unknown.stderr and "'failed'" in unknown.stderr

        # a certificate's expiry
        daemon.ctl_json("apps", "register", "demo")
        assert "valid, expires " in daemon.ctl("apps", "show", "demo").stdout
    finally:
        daemon.stop()


def test_ctl_ca_hands_out_the_ca_the_server_certificate_verifies_with(governord: Governord, tmp_path: Path) -> None:
    """An operator in the governord group cannot read STATE_DIR/pki (0700): `governord-ctl ca`
    gives the public CA certificate, which verifies the application API's server."""
    printed = governord.ctl("ca").stdout
    assert printed == (governord.state_dir / "pki" / "ca.pem").read_text()
    out = tmp_path / "governord-ca.pem"
    written = governord.ctl("ca", "--out", str(out))
    assert out.read_text() == printed and stat.S_IMODE(out.stat().st_mode) == 0o644
    assert "expires" in written.stdout
    context = ssl.create_default_context(cafile=str(out))
    context.check_hostname = False
    with urllib.request.urlopen(f"https://127.0.0.1:{governord.api_port}/healthz", context=context,
                                timeout=10) as response:
        assert response.status == 200
