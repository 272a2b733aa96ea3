"""governord-ctl backup while the daemon works, governord-ctl restore with it stopped: the
restored installation has the hosts and requests of the moment of the backup and the same CA
(so the certificates it issued before still identify their applications), on SQLite and on
PostgreSQL. A restore refuses while governord runs and, without --force, over a store or CA."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.stack import Governord, Lab


def _ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "governord.ctl", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_backup_while_working_and_restore_elsewhere(lab: Lab, tmp_path: Path, kind: str,
                                                    new_postgres_database: Callable[[], str]) -> None:
    url = new_postgres_database() if kind == "postgresql" else None
    config = lab.write_config("original", store_url=url)
    daemon = lab.start_governord(config)
    try:
        daemon.ctl("scale", "demo", "node", "--add", "2", "--wait")
        issued = daemon.ctl_json("apps", "register", "demo")
        daemon.ctl("scale", "demo", "node", "--add", "1")  # at work while the backup is made
        archive = tmp_path / "backup.tar.gz"
        made = daemon.ctl("backup", "-o", str(archive))
        assert f"{kind} store at revision" in made.stdout
        assert stat.S_IMODE(archive.stat().st_mode) == 0o600  # it holds the CA's key
        taken = {h["id"]: h for h in daemon.ctl_json("hosts", "list", "--all")}
        again = daemon.ctl("backup", "-o", str(archive), check=False)
        assert again.returncode == 1 and "cannot write" in again.stderr  # never over a file
        assert [e["kind"] for e in daemon.ctl_json("audit", "--kind", "backup")] == ["backup"]
    finally:
        daemon.stop()
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"MANIFEST.json", f"database.{'sqlite' if kind == 'sqlite' else 'pgdump'}", "pki/ca.pem", "pki/ca.key",
            "governord.toml"} <= names

    # another installation, empty: its own state directory (and, on PostgreSQL, its own database)
    other_url = new_postgres_database() if kind == "postgresql" else None
    target = lab.write_config("restored", store_url=other_url)
    env = lab._stores[target][1] if kind == "postgresql" else {}
    restored = _ctl("restore", str(archive), "--config", str(target), env=env)
    assert restored.returncode == 0, restored.stderr
    assert (target.parent / "state" / "pki" / "ca.pem").read_bytes() == \
        (config.parent / "state" / "pki" / "ca.pem").read_bytes()
    if kind == "sqlite":  # a second restore over what is there now: refused without --force
        refused = _ctl("restore", str(archive), "--config", str(target))
        assert refused.returncode == 2 and "give --force" in refused.stderr
    daemon = lab.start_governord(target)
    try:
        hosts = {h["id"]: h for h in daemon.ctl_json("hosts", "list", "--all")}
        assert set(hosts) == set(taken)  # every host of the backup's moment, the one in flight too
        assert {h["name"] for h in hosts.values()} == {"demo-node-01", "demo-node-02", "demo-node-03"}
        shown = daemon.ctl_json("apps", "show", "demo")
        assert [c["serial"] for c in shown["certificates"]] == [issued["serial"]]
        busy = _ctl("restore", str(archive), "--config", str(target), "--force", env=env)
        assert busy.returncode == 2 and "governord is running" in busy.stderr
        # the host that was being made when the backup was taken is finished by the restored one
        daemon.ctl("requests", "list")
        assert _settle(daemon)
    finally:
        daemon.stop()


def _settle(daemon: Governord) -> bool:
    from .conftest import wait_until

    return bool(wait_until(lambda: all(h["state"] == "ready" for h in daemon.ctl_json("hosts", "list")),
                           timeout=180, interval=1.0, what="every host ready"))
