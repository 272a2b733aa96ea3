"""The daemon scales a role on a real Prometheus' answer: the load an exporter reports goes up and
VMs come in vcsim, registered in Foreman; it goes down and the newest goes, from vcsim and from
Foreman; in between nothing moves. Read on each side through its own interface, and through
``governord-ctl autoscale`` and ``governord-ctl audit`` as an operator would."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from lab.prometheus import Exporter, static_job
from lab.stack import Lab

pytestmark = pytest.mark.timeout(900)

QUERY = 'max(lab_load{app="demo"})'


def until(what: str, check: Any, timeout: float = 240.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.5)


def test_the_load_brings_vms_and_takes_them_back(tmp_path: Path, prometheus_factory: Any,
                                                   exporter: Exporter) -> None:
    exporter.set("lab_load", 0.5, app="demo")
    prometheus = prometheus_factory([static_job("lab", exporter.target)])
    prometheus.wait_for(f"{QUERY} == 0.5")
    with Lab(tmp_path / "lab") as lab:
        lab.start_vcsim()
        lab.start_peers("vsphere")
        config = lab.write_config(max_hosts=4, extra=f"""
[prometheus]
url = "{prometheus.url}"

[applications.demo.roles.node.autoscale]
query = '{QUERY}'
scale_up_above = 0.8
scale_down_below = 0.3
scale_up_for = 2.0
scale_down_for = 2.0
scale_up_step = 2
scale_down_step = 1
cooldown = 5.0
interval = 0.5
""")
        daemon = lab.start_governord(config)

        def hosts() -> dict[str, dict[str, Any]]:
            return {h["name"]: h for h in daemon.ctl_json("hosts", "list", "--all")}

        time.sleep(3.0)  # within the band for longer than the holds
        [seen] = daemon.ctl_json("autoscale")["rules"]
        assert seen["outcome"] == "within" and seen["value"] == 0.5 and seen["evaluating"]
        assert hosts() == {}

        exporter.set("lab_load", 0.95, app="demo")
        up = until("two ready hosts", lambda: (h := hosts()) and len(h) == 2
                   and {x["state"] for x in h.values()} == {"ready"} and h)
        vms, foreman = lab.vsphere_vms(), lab.foreman_hosts()
        for name, host in up.items():
            assert vms[name]["host_id"] == host["id"]
            assert host["fqdn"] in foreman
        # the load drops below the lower threshold: one host (the newest) goes, everywhere
        exporter.set("lab_load", 0.1, app="demo")
        newest = max(up.values(), key=lambda h: h["name"])["name"]
        until(f"{newest} gone", lambda: hosts()[newest]["state"] == "gone")
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
