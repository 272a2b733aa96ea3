"""The real daemon on PostgreSQL (``[store] url``, the password by reference), end to end
against the lab: a scale-up and a retirement, checked at the peers and in the database."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from lab.stack import Lab


def test_scale_up_and_retire_with_the_store_on_postgresql(lab: Lab, new_postgres_database: Callable[[], str]) -> None:
    url = make_url(new_postgres_database())
    config = lab.write_config()
    bare = url._replace(username=None, password=None).render_as_string(hide_password=False)
    config.write_text(f'[store]\nurl = "{bare}"\nusername = "{url.username}"\n'
                      'password = { env = "GOVERNORD_DB_PASSWORD" }\npool_size = 4\n' + config.read_text())
    assert url.password and url.password not in config.read_text()
    daemon = lab.start_governord(config, extra_env={"GOVERNORD_DB_PASSWORD": url.password})
    try:
        result = daemon.ctl("scale", "demo", "node", "--add", "2", "--wait")
        assert "completed" in result.stdout
        hosts = {h["name"]: h for h in daemon.ctl_json("hosts", "list")}
        assert sorted(hosts) == ["demo-node-01", "demo-node-02"]
        assert {h["state"] for h in hosts.values()} == {"ready"}
        assert sorted(lab.vsphere_vms()) == sorted(hosts)
        assert sorted(lab.foreman_hosts()) == sorted(h["fqdn"] for h in hosts.values())

        daemon.ctl("retire", "demo-node-01", "--wait")
        assert daemon.ctl_json("hosts", "show", "demo-node-01")["state"] == "gone"
        assert sorted(lab.vsphere_vms()) == ["demo-node-02"]
        assert hosts["demo-node-01"]["fqdn"] not in lab.foreman_hosts()
        assert hosts["demo-node-01"]["fqdn"] not in lab.satellite_systems()
    finally:
        daemon.stop()
    # the state is in PostgreSQL, counts and all; no SQLite file was made
    engine = create_engine(url)
    with engine.connect() as conn:
        assert dict(conn.execute(text("SELECT name, state FROM hosts")).all()) == {
            "demo-node-01": "gone", "demo-node-02": "ready"}
        assert dict(conn.execute(text("SELECT state, sum(hosts) FROM state_counts GROUP BY state HAVING sum(hosts) <> 0")).all()) == {
            "gone": 1, "ready": 1}
        assert conn.execute(text("SELECT sum(hosts) FROM live_counts WHERE app = 'demo'")).scalar() == 1
        kinds = conn.execute(text("SELECT kind FROM events")).scalars().all()
        assert kinds.count("gone") == 1 and "registered" in kinds
    engine.dispose()
    assert not (daemon.state_dir / "governord.db").exists()


def test_a_store_that_cannot_be_reached_at_start_is_one_line_and_exit_1(lab: Lab, tmp_path: Path) -> None:
    """PostgreSQL down when the daemon starts: one line naming the failure, exit 1 (the unit's
    Restart= starts it again), no traceback, no SQLite file made instead."""
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = lab.write_config()
    config.write_text(f'[store]\nurl = "postgresql+psycopg://127.0.0.1:{port}/governord"\nusername = "g"\n'
                      + config.read_text())
    governord = shutil.which("governord", path=str(Path(sys.executable).parent)) or "governord"
    result = subprocess.run([governord, "--config", str(config)], capture_output=True, text=True, timeout=120,
                            check=False, env={**os.environ, **lab.passwords})
    assert result.returncode == 1, result.stderr
    assert "cannot open the store: OperationalError" in result.stderr and "Traceback" not in result.stderr
    state_dir = Path(tomllib.loads(config.read_text())["daemon"]["state_dir"])
    assert not (state_dir / "governord.db").exists()
