"""The whole daemon on each platform the lab runs: a role on that provider scales up, its
machines exist on the platform (read through the platform's own API) and in Foreman and
Satellite, and a retired one is gone from all three."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.platforms import PLATFORMS
from lab.stack import Lab


@pytest.mark.parametrize("kind", sorted(PLATFORMS))
def test_scale_and_retire_on_each_platform(tmp_path: Path, kind: str) -> None:
    with Lab(tmp_path / "lab") as lab:
        lab.start_peers(kind)
        assert lab.platform is not None
        daemon = lab.start_governord()
        try:
            daemon.ctl("scale", "demo", "node", "--add", "2", "--wait", timeout=300)
            hosts = {h["name"]: h for h in daemon.ctl_json("hosts", "list")}
            assert {h["provider"] for h in hosts.values()} == {kind}
            # the platform's own view: one machine per host, the one governord recorded
            machine_ids = sorted(m["id"] for m in lab.platform.machines().values())
            assert machine_ids == sorted(h["machine_id"] for h in hosts.values())
            assert all(h["addresses"] for h in hosts.values()), hosts
            assert sorted(lab.foreman_hosts()) == sorted(h["fqdn"] for h in hosts.values())
            assert sorted(lab.satellite_systems()) == sorted(h["fqdn"] for h in hosts.values())

            daemon.ctl("retire", "demo-node-01", "--wait", timeout=300)
            assert [m["id"] for m in lab.platform.machines().values()] == [hosts["demo-node-02"]["machine_id"]]
            assert "demo-node-01.lab.example" not in lab.foreman_hosts()
            assert "demo-node-01.lab.example" not in lab.satellite_systems()
        finally:
            assert daemon.stop() == 0
