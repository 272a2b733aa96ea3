"""The daemon scales a role on a real Prometheus' answer: the load an exporter reports goes up and
VMs come in vcsim, registered in Foreman; it goes down and the newest goes, from vcsim and from
Foreman; in between nothing moves. Read on each side through its own interface, and through
``governord-ctl autoscale`` and ``governord-ctl audit`` as an operator would."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lab.fleet import GovernordFleet
from lab.prometheus import Exporter, Prometheus, static_job
from lab.stack import Lab

from .conftest import wait_until

pytestmark = pytest.mark.timeout(900)

QUERY = 'max(lab_load{app="demo"})'


def autoscale_config(prometheus: Prometheus, **rule: Any) -> str:
    """The [prometheus] section and demo/node's autoscale rule (``rule`` over the defaults here)."""
    settings = {"scale_up_above": 0.8, "scale_down_below": 0.3, "interval": 0.25, **rule}
    lines = "\n".join(f"{key} = {value!r}" for key, value in settings.items())
    return (f'\n[prometheus]\nurl = "{prometheus.url}"\n\n[applications.demo.roles.node.autoscale]\n'
            f"query = '{QUERY}'\n{lines}\n")


def test_the_load_brings_vms_and_takes_them_back(tmp_path: Path, prometheus_factory: Any,
                                                   exporter: Exporter) -> None:
    exporter.set("lab_load", 0.5, app="demo")
    prometheus = prometheus_factory([static_job("lab", exporter.target)])
    prometheus.wait_for(f"{QUERY} == 0.5")
    with Lab(tmp_path / "lab") as lab:
        lab.start_vcsim()
        lab.start_peers("vsphere")
        config = lab.write_config(max_hosts=4, extra=autoscale_config(
            prometheus, scale_up_for=2.0, scale_down_for=2.0, scale_up_step=2, scale_down_step=1, cooldown=5.0,
            interval=0.5))
        daemon = lab.start_governord(config)

        def hosts() -> dict[str, dict[str, Any]]:
            return {h["name"]: h for h in daemon.ctl_json("hosts", "list", "--all")}

        time.sleep(3.0)  # within the band for longer than the holds
        [seen] = daemon.ctl_json("autoscale")["rules"]
        assert seen["outcome"] == "within" and seen["value"] == 0.5 and seen["evaluating"]
        assert hosts() == {}

        exporter.set("lab_load", 0.95, app="demo")
        up = wait_until(lambda: (h := hosts()) and len(h) == 2 and {x["state"] for x in h.values()} == {"ready"} and h,
                        timeout=240, interval=0.5, what="two ready hosts")
        vms, foreman = lab.vsphere_vms(), lab.foreman_hosts()
        for name, host in up.items():
            assert vms[name]["host_id"] == host["id"]
            assert host["fqdn"] in foreman
        # the load drops below the lower threshold: one host (the newest) goes, everywhere
        exporter.set("lab_load", 0.1, app="demo")
        newest = max(up.values(), key=lambda h: h["name"])["name"]
        wait_until(lambda: hosts()[newest]["state"] == "gone", timeout=240, interval=0.5, what=f"{newest} gone")
        [kept] = [n for n in up if n != newest]
        assert set(lab.vsphere_vms()) == {kept}
        assert up[kept]["fqdn"] in lab.foreman_hosts() and up[newest]["fqdn"] not in lab.foreman_hosts()
        # back in the band: nothing more goes
        exporter.set("lab_load", 0.5, app="demo")
        prometheus.wait_for(f"{QUERY} == 0.5")
        time.sleep(6.0)
        assert [n for n, h in hosts().items() if h["state"] != "gone"] == [kept]

        # the audit says what asked, on which value, by which rule
        asked = [e for e in daemon.ctl_json("audit", "--kind", "request-") if e["actor"] == "autoscale"]
        assert [(e["kind"], e["detail"]["add"]) for e in asked] == [("request-accepted", 2), ("request-accepted", -1)]
        assert [e["detail"]["trigger"]["autoscale"]["value"] for e in asked] == [0.95, 0.1]
        assert all(e["detail"]["trigger"]["autoscale"]["query"] == QUERY for e in asked)


def test_in_a_fleet_a_paused_leader_neither_stops_the_asking_nor_asks_twice(
        tmp_path: Path, prometheus_factory: Any, exporter: Exporter,
        new_postgres_database: Callable[[], str]) -> None:
    """Three daemons on one PostgreSQL; the load stays high, so the rule asks every cooldown.
    The leader is SIGSTOPped past its leader lease: another instance takes the lead and goes on
    asking, no sooner than the cooldown the paused one started (read from the store); once the
    paused one resumes it asks nothing (it no longer leads). Every ask is at least a cooldown
    after the one before, whoever made it."""
    cooldown = 8.0
    exporter.set("lab_load", 0.95, app="demo")
    prometheus = prometheus_factory([static_job("lab", exporter.target)])
    prometheus.wait_for(f"{QUERY} == 0.95")
    with Lab(tmp_path / "lab") as lab:
        lab.start_foreman()
        lab.start_satellite()
        lab.start_vcsim()
        lab.start_platform("vsphere")
        fleet = GovernordFleet(lab, new_postgres_database(), instances=3, heartbeat=1.0, leader_lease=4.0,
                               max_hosts=10, extra=autoscale_config(prometheus, scale_up_for=0.0, cooldown=cooldown))
        try:
            daemons = fleet.start_all()

            def asks() -> list[dict[str, Any]]:
                return fleet.store.query("SELECT id, created_at FROM requests WHERE actor = 'autoscale' "
                                         "ORDER BY created_at")

            [first] = wait_until(asks, timeout=60, what="the first ask")
            leader = fleet.leader()
            assert leader is not None
            fleet.pause(leader)
            paused = time.time()
            try:
                new_leader = wait_until(lambda: (fleet.leader() or leader) != leader and fleet.leader(),
                                        timeout=30, interval=0.1, what="a new leader")
                second = wait_until(lambda: asks()[1:2], timeout=60, what="an ask by the new leader")[0]
            finally:
                fleet.resume(leader)
            resumed = time.time()
            assert second["created_at"] < resumed and second["created_at"] > paused
            assert second["created_at"] - first["created_at"] >= cooldown
            # after the resume: the old leader asks nothing, the new one goes on at the same pace
            wait_until(lambda: len(asks()) >= 4, timeout=60, what="two more asks")
            made = asks()
            gaps = [b["created_at"] - a["created_at"] for a, b in zip(made, made[1:], strict=False)]
            assert all(gap >= cooldown for gap in gaps), gaps
            assert second["id"] not in daemons[leader].log.read_text()
            assert second["id"] in daemons[new_leader].log.read_text()
            shown = daemons[leader].ctl_json("autoscale")["rules"][0]
            assert not shown["evaluating"]
        finally:
            exporter.set("lab_load", 0.5, app="demo")
            fleet.stop()
