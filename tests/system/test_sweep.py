"""The sweep through governord-ctl against vcsim and the Foreman and Satellite simulators.

What a crash or an operator leaves behind is made directly on the other side: a VM cloned with
governord's marker through pyvmomi (as an interrupted provision would leave it), a ready host's
VM deleted out of band, Foreman hosts and a Satellite profile marked for a gone host and for one
governord never had. A dry run lists all of it and changes nothing; the real run cleans up as the
policy says, checked on the other side and in the audit log; a second sweep finds nothing.
"""

from __future__ import annotations

import os
import pwd
import uuid
import xmlrpc.client
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from pyVmomi import vim

from lab import vcsim
from lab.stack import Governord, Lab

from .conftest import wait_until

MARKER_KEY = "guestinfo.governord.host-id"

SWEEP = """
[sweep]
interval = 0
grace = 0

[sweep.policy]
leaked = "clean"
vanished = "retire"
orphaned = "clean"
"""


@pytest.fixture
def daemon(lab: Lab) -> Iterator[Governord]:
    config = lab.write_config()
    config.write_text(config.read_text() + SWEEP)
    started = lab.start_governord(config)
    yield started
    started.stop()


def _vcenter(lab: Lab) -> Any:
    assert lab.vcsim
    return vcsim.connect(lab.vcsim.url, "governord", lab.passwords["LAB_VCSIM_PASSWORD"])


def clone_like_a_crash(lab: Lab, name: str, host_id: str) -> None:
    """Clone the template carrying the marker, powered off, never recorded: what a provision
    interrupted right after vSphere accepted the clone leaves."""
    si = _vcenter(lab)
    try:
        index = si.RetrieveContent().searchIndex
        folder = index.FindByInventoryPath(f"{vcsim.DATACENTER}/vm/{vcsim.FOLDER}")
        pool = index.FindByInventoryPath(f"{vcsim.DATACENTER}/host/{vcsim.CLUSTER}/Resources/{vcsim.RESOURCE_POOL}")
        template = index.FindByInventoryPath(f"{vcsim.DATACENTER}/vm/{vcsim.TEMPLATE}")
        spec = vim.vm.CloneSpec(
            location=vim.vm.RelocateSpec(pool=pool),
            config=vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key=MARKER_KEY, value=host_id)]),
            powerOn=False, template=False,
        )
        vcsim.wait_for_task(template.CloneVM_Task(folder=folder, name=name, spec=spec))
    finally:
        vcsim.disconnect(si)


def delete_vm(lab: Lab, moid: str) -> None:
    """Power off and delete a VM behind governord's back."""
    si = _vcenter(lab)
    try:
        vm = vim.VirtualMachine(moid, si._stub)
        if vm.runtime.powerState == "poweredOn":
            vcsim.wait_for_task(vm.PowerOffVM_Task())
        vcsim.wait_for_task(vm.Destroy_Task())
    finally:
        vcsim.disconnect(si)


def foreman_host(lab: Lab, fqdn: str, comment: str) -> int:
    assert lab.foreman
    body = {"host": {"name": fqdn, "location_id": 1, "organization_id": 1, "managed": False, "comment": comment}}
    response = requests.post(f"{lab.foreman.url}/api/hosts", json=body, timeout=10,
                             auth=("admin", lab.passwords["LAB_FOREMAN_PASSWORD"]))
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def satellite_profile(lab: Lab, fqdn: str, description: str) -> int:
    assert lab.satellite
    proxy = xmlrpc.client.ServerProxy(lab.satellite.url)
    key = proxy.auth.login("admin", lab.passwords["LAB_SATELLITE_PASSWORD"])
    try:
        sid = int(proxy.system.createSystemProfile(key, fqdn, {"hostname": fqdn}))
        proxy.system.setDetails(key, sid, {"description": description})
        return sid
    finally:
        proxy.auth.logout(key)


def by_kind(report: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    return {(f["kind"], f["where"], f["host_id"], f["name"]) for f in report["findings"]}


def test_sweep_dry_run_then_clean_then_nothing(lab: Lab, daemon: Governord) -> None:
    daemon.ctl("scale", "demo", "node", "--add", "3", "--wait")
    hosts = {h["name"]: h for h in daemon.ctl_json("hosts", "list")}
    gone, vanished, kept = hosts["demo-node-01"], hosts["demo-node-02"], hosts["demo-node-03"]
    daemon.ctl("retire", gone["name"], "--wait")
    assert daemon.ctl_json("hosts", "show", gone["name"])["state"] == "gone"

    # what a crash and an operator leave behind, made on the other side
    unknown = str(uuid.uuid4())
    clone_like_a_crash(lab, "demo-node-77", unknown)
    clone_like_a_crash(lab, gone["name"], gone["id"])
    delete_vm(lab, lab.vsphere_vms()[vanished["name"]]["moid"])
    foreman_host(lab, gone["fqdn"], f"governord:host-id={gone['id']}")
    foreman_host(lab, "stranger.lab.example", f"left over\ngovernord:host-id={unknown}")
    foreman_host(lab, "ops-box.lab.example", "made by hand, not governord's")
    satellite_profile(lab, gone["fqdn"], f"governord:host-id={gone['id']}")
    vms_before, foreman_before, satellite_before = lab.vsphere_vms(), lab.foreman_hosts(), lab.satellite_systems()
    assert sorted(vms_before) == ["demo-node-01", "demo-node-03", "demo-node-77"]

    expected = {
        ("leaked", "vsphere", unknown, "demo-node-77"),
        ("leaked", "vsphere", gone["id"], "demo-node-01"),
        ("vanished", "vsphere", vanished["id"], "demo-node-02"),
        ("orphaned", "foreman", gone["id"], gone["fqdn"]),
        ("orphaned", "foreman", unknown, "stranger.lab.example"),
        ("orphaned", "satellite", gone["id"], gone["fqdn"]),
    }

    # the dry run lists everything and changes nothing, on either side
    dry = daemon.ctl_json("sweep", "--dry-run")
    assert dry["dry_run"] is True and dry["errors"] == []
    assert by_kind(dry) == expected
    assert {f["action"] for f in dry["findings"]} == {"would destroy", "would retire", "would deregister"}
    assert dry["checked"] == {"providers": {"vsphere": 3}, "registrars": {"foreman": 4, "satellite": 3}}
    shown = daemon.ctl("sweep", "--dry-run").stdout
    assert "dry run: nothing changed" in shown and "demo-node-77" in shown and "would destroy" in shown
    assert lab.vsphere_vms() == vms_before
    assert lab.foreman_hosts() == foreman_before and lab.satellite_systems() == satellite_before
    assert daemon.ctl_json("hosts", "show", vanished["name"])["state"] == "ready"
    assert daemon.ctl_json("audit", "--kind", "sweep") == []

    # the real run acts as the policy says
    real = daemon.ctl_json("sweep")
    assert real["dry_run"] is False and real["errors"] == []
    assert by_kind(real) == expected
    actions = {(f["kind"], f["name"]): f["action"] for f in real["findings"]}
    assert actions == {
        ("leaked", "demo-node-77"): "destroyed", ("leaked", "demo-node-01"): "destroyed",
        ("vanished", "demo-node-02"): "retiring",
        ("orphaned", gone["fqdn"]): "deregistered", ("orphaned", "stranger.lab.example"): "deregistered",
    }
    wait_until(lambda: daemon.ctl_json("hosts", "show", vanished["name"])["state"] == "gone", 120,
               what="the vanished host retired")

    # checked on the other side: only the kept host's VM, Foreman host and Satellite profile remain
    # (and the operator's own Foreman host, which carries no marker)
    assert sorted(lab.vsphere_vms()) == [kept["name"]]
    assert sorted(lab.foreman_hosts()) == sorted([kept["fqdn"], "ops-box.lab.example"])
    assert sorted(lab.satellite_systems()) == [kept["fqdn"]]
    assert daemon.ctl_json("hosts", "show", kept["name"])["state"] == "ready"

    audit = daemon.ctl_json("audit", "--kind", "sweep")
    assert sorted(e["kind"] for e in audit) == sorted(
        ["sweep-destroyed"] * 2 + ["sweep-retired"] + ["sweep-deregistered"] * 3 + ["sweep"])
    assert {e["actor"] for e in audit} == {f"operator:{pwd.getpwuid(os.getuid()).pw_name}"}
    destroyed = {e["detail"]["name"]: e["host_id"] for e in audit if e["kind"] == "sweep-destroyed"}
    assert destroyed == {"demo-node-77": unknown, "demo-node-01": gone["id"]}
    trail = [e["kind"] for e in daemon.ctl_json("hosts", "show", vanished["name"])["events"]]
    assert "sweep-retired" in trail and trail[-1] == "gone"

    # nothing left to find
    again = daemon.ctl_json("sweep")
    assert again["findings"] == [] and again["errors"] == []
    assert daemon.ctl("sweep").returncode == 0
