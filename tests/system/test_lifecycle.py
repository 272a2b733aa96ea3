"""The whole loop through governord-ctl against a running daemon, checking the other side of
every action: the VM in vcsim, the host in the Foreman simulator, the system in the Satellite
simulator."""

from __future__ import annotations

import os
import pwd
import signal

from lab.stack import Governord, Lab

from .conftest import wait_until


def test_scale_tag_untag_retire_through_ctl(lab: Lab, governord: Governord) -> None:
    result = governord.ctl("scale", "demo", "node", "--add", "3", "--wait")
    assert "completed" in result.stdout

    hosts = {h["name"]: h for h in governord.ctl_json("hosts", "list")}
    assert sorted(hosts) == ["demo-node-01", "demo-node-02", "demo-node-03"]
    assert {h["state"] for h in hosts.values()} == {"ready"}

    vms = lab.vsphere_vms()
    assert sorted(vms) == sorted(hosts)
    for name, vm in vms.items():
        assert vm["host_id"] == hosts[name]["id"]
        assert vm["power"] == "poweredOn"
        assert vm["ip"] == hosts[name]["addresses"][0]
    foreman = lab.foreman_hosts()
    assert sorted(foreman) == sorted(h["fqdn"] for h in hosts.values())
    for host in hosts.values():
        entry = foreman[host["fqdn"]]
        assert entry["hostgroup"] == "openshift/node"
        assert entry["puppet_classes"] == ["openshift::node", "profile::base"]
        assert entry["ip"] == host["addresses"][0]
        assert f"governord:host-id={host['id']}" in entry["comment"]
    satellite = lab.satellite_systems()
    assert {name: s["groups"] for name, s in satellite.items()} == {
        h["fqdn"]: ["openshift-nodes"] for h in hosts.values()}

    # tag one host broker: re-classified and re-registered everywhere
    governord.ctl("tag", "demo-node-02", "broker", "--wait")
    fqdn = hosts["demo-node-02"]["fqdn"]
    assert lab.foreman_hosts()[fqdn]["hostgroup"] == "openshift/broker"
    assert lab.foreman_hosts()[fqdn]["puppet_classes"] == ["openshift::broker", "openshift::node", "profile::base"]
    assert lab.satellite_systems()[fqdn]["groups"] == ["openshift-brokers", "openshift-nodes"]
    governord.ctl("untag", "demo-node-02", "node", "--wait")
    assert lab.foreman_hosts()[fqdn]["puppet_classes"] == ["openshift::broker", "profile::base"]
    assert lab.satellite_systems()[fqdn]["groups"] == ["openshift-brokers"]

    # retire one: gone from Foreman, Satellite and vSphere; the others untouched
    governord.ctl("retire", "demo-node-01", "--wait")
    assert governord.ctl_json("hosts", "show", "demo-node-01")["state"] == "gone"
    assert sorted(lab.vsphere_vms()) == ["demo-node-02", "demo-node-03"]
    assert hosts["demo-node-01"]["fqdn"] not in lab.foreman_hosts()
    assert hosts["demo-node-01"]["fqdn"] not in lab.satellite_systems()
    assert len(lab.foreman_hosts()) == 2 and len(lab.satellite_systems()) == 2

    # the audit trail of the retired host names each step
    events = [e["kind"] for e in governord.ctl_json("hosts", "show", "demo-node-01")["events"]]
    assert events.index("registered") < events.index("deregistered") < events.index("gone")

    # scale down to 1 through the count form: the newest goes first
    governord.ctl("scale", "demo", "node", "--count", "1", "--wait")
    assert sorted(lab.vsphere_vms()) == ["demo-node-02"]
    assert sorted(lab.foreman_hosts()) == [fqdn] and sorted(lab.satellite_systems()) == [fqdn]


def test_cap_is_enforced_with_a_reason(lab: Lab, governord: Governord) -> None:
    result = governord.ctl("scale", "demo", "node", "--add", "11", check=False)
    assert result.returncode == 1
    assert "declined: cap reached" in result.stderr
    assert lab.vsphere_vms() == {}
    requests = governord.ctl_json("requests", "list")
    assert requests[0]["decision"] == "declined"


def test_adopting_a_host_registers_it_and_retire_never_touches_vsphere(lab: Lab, governord: Governord) -> None:
    # a name governord does not know is an error, not a new host, unless --adopt says so; adopting
    # takes the fully qualified name and the address
    for args, refusal in [
        (["legacy1.lab.example", "broker"], "no host named 'legacy1.lab.example'"),
        (["--adopt", "legacy1", "broker", "--address", "198.51.100.250"], "fully qualified name"),
        (["--adopt", "legacy1.lab.example", "broker"], "takes its address"),
    ]:
        refused = governord.ctl("tag", *args, check=False)
        assert refused.returncode == 1 and refusal in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert governord.ctl_json("hosts", "list", "--all") == [] and "legacy1.lab.example" not in lab.foreman_hosts()
    governord.ctl("tag", "--adopt", "legacy1.lab.example", "broker", "--address", "198.51.100.250", "--wait")
    # a typo of a known name says which was meant
    typo = governord.ctl("tag", "legacy2.lab.example", "broker", check=False)
    assert typo.returncode == 1 and "did you mean legacy1.lab.example" in typo.stderr, typo.stderr
    assert [h["name"] for h in governord.ctl_json("hosts", "list", "--all")] == ["legacy1"]
    host = governord.ctl_json("hosts", "show", "legacy1")
    assert host["origin"] == "adopted" and host["state"] == "ready"
    assert lab.foreman_hosts()["legacy1.lab.example"]["hostgroup"] == "openshift/broker"
    assert lab.foreman_hosts()["legacy1.lab.example"]["ip"] == "198.51.100.250"
    assert lab.satellite_systems()["legacy1.lab.example"]["groups"] == ["openshift-brokers"]
    assert lab.vsphere_vms() == {}
    governord.ctl("retire", "legacy1", "--wait")
    assert "legacy1.lab.example" not in lab.foreman_hosts()
    assert "legacy1.lab.example" not in lab.satellite_systems()


def test_failed_step_is_shown_and_retry_resumes_after_reload(lab: Lab) -> None:
    # kept as it failed (not rolled back) so that it can be inspected and retried
    config = lab.write_config(on_permanent_failure="keep")
    config.write_text(config.read_text().replace('hostgroup = "openshift/node"', 'hostgroup = "openshift/nodes"'))
    daemon = lab.start_governord(config)
    try:
        result = daemon.ctl("scale", "demo", "node", "--add", "1", "--wait", check=False)
        assert result.returncode == 1
        host = daemon.ctl_json("hosts", "show", "demo-node-01")
        assert host["state"] == "failed" and host["failed_step"] == "register"
        assert "openshift/nodes" in host["error"] and "registrar:foreman" in host["error"]
        shown = daemon.ctl("hosts", "show", "demo-node-01").stdout
        assert "failed_step:  register" in shown
        # the machine exists; Foreman has nothing
        assert list(lab.vsphere_vms()) == ["demo-node-01"]
        assert lab.foreman_hosts() == {}

        # fix the config, reload with SIGHUP, retry the host
        config.write_text(config.read_text().replace('"openshift/nodes"', '"openshift/node"'))
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in daemon.log.read_text(), 20, what="reload")
        daemon.ctl("retry", "demo-node-01", "--wait")
        assert lab.foreman_hosts()["demo-node-01.lab.example"]["hostgroup"] == "openshift/node"
        assert list(lab.vsphere_vms()) == ["demo-node-01"]  # found again, not cloned twice
    finally:
        daemon.stop()


def test_ctl_errors_are_one_line_and_non_zero(lab: Lab, governord: Governord) -> None:
    unknown = governord.ctl("hosts", "show", "nope", check=False)
    assert unknown.returncode == 1 and unknown.stderr.strip() == "governord-ctl: no host named 'nope'"
    bad_tag = governord.ctl("tag", "demo-node-01", "nonesuch", check=False)
    assert bad_tag.returncode == 1 and "unknown tag 'nonesuch'" in bad_tag.stderr
    usage = governord.ctl("scale", "demo", "node", check=False)
    assert usage.returncode == 2
    governord.stop()
    down = governord.ctl("status", check=False)
    assert down.returncode == 3 and "cannot reach governord" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1


def test_ctl_plugins_reports_a_plugin_that_did_not_load(lab: Lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    site = tmp_path / "site"
    info = site / "broken_cloud-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-cloud\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[governord]\nbrokencloud = no_such_cloud_sdk\n")
    daemon = lab.start_governord(extra_env={"PYTHONPATH": str(site)})
    try:
        shown = daemon.ctl("plugins").stdout
        line = next(row for row in shown.splitlines() if row.strip().startswith("brokencloud"))
        assert "NOT LOADED: ModuleNotFoundError" in line and "no_such_cloud_sdk" in line
        plugins = {p["name"]: p for p in daemon.ctl_json("plugins")}
        assert plugins["vsphere"]["loaded"] and plugins["foreman"]["loaded"] and plugins["satellite"]["loaded"]
        # the daemon works on: the broken plugin is not used by the config
        daemon.ctl("scale", "demo", "node", "--add", "1", "--wait")
    finally:
        daemon.stop()


def test_two_instances_of_one_provider_type_side_by_side(lab: Lab) -> None:
    second = lab.start_vcsim("vcsim-east")
    config = lab.write_config()
    text = config.read_text()
    provider = text[text.index("[providers.vsphere]"):text.index("[registrars.foreman]")]
    text = text.replace("[registrars.foreman]", provider.replace("[providers.vsphere]", "[providers.east]")
                        .replace(lab.vcsim.url, second.url) + "[registrars.foreman]")  # type: ignore[union-attr]
    text += ('\n[applications.demo.roles.edge]\ntags = ["node"]\nprovider = "east"\nnetwork = "lab"\n'
             'name_pattern = "demo-edge-{seq:02d}"\nprofile = { template = "rhel9-template", cpus = 1 }\n')
    config.write_text(text)
    daemon = lab.start_governord(config)
    try:
        daemon.ctl("scale", "demo", "node", "--add", "2", "--wait")
        daemon.ctl("scale", "demo", "edge", "--add", "1", "--wait")
        assert sorted(lab.vsphere_vms()) == ["demo-node-01", "demo-node-02"]
        assert sorted(lab.vsphere_vms(second)) == ["demo-edge-01"]
        assert {h["name"]: h["provider"] for h in daemon.ctl_json("hosts", "list")} == {
            "demo-node-01": "vsphere", "demo-node-02": "vsphere", "demo-edge-01": "east"}
        daemon.ctl("retire", "demo-edge-01", "--wait")
        assert lab.vsphere_vms(second) == {} and len(lab.vsphere_vms()) == 2
    finally:
        daemon.stop()


def test_approval_plan_and_audit_through_ctl(lab: Lab) -> None:
    config = lab.write_config()
    config.write_text(config.read_text().replace("max_hosts = 10\n", "max_hosts = 10\napproval = 2\n"))
    daemon = lab.start_governord(config)
    try:
        planned = daemon.ctl_json("plan", "demo", "node", "--add", "3")
        assert planned["decision"] == "pending" and planned["rule"] == "approval"
        assert [h["name"] for h in planned["hosts"]] == ["demo-node-01", "demo-node-02", "demo-node-03"]
        assert planned["hosts"][0]["classification"]["foreman"]["hostgroup"] == "openshift/node"
        assert "on vsphere" in daemon.ctl("plan", "demo", "node", "--add", "3").stdout
        assert lab.vsphere_vms() == {}

        held = daemon.ctl("scale", "demo", "node", "--add", "3", check=False)
        assert held.returncode == 1 and "pending approval" in held.stderr
        [pending] = [r for r in daemon.ctl_json("requests", "list") if r["decision"] == "pending"]
        assert lab.vsphere_vms() == {}
        approved = daemon.ctl_json("requests", "approve", pending["id"], "-m", "capacity for the release")
        assert approved["decision"] == "accepted" and len(approved["hosts"]) == 3
        wait_until(lambda: len(lab.vsphere_vms()) == 3, 120, what="three VMs after approval")

        audit = daemon.ctl_json("audit", "--kind", "request-")
        assert [e["kind"] for e in audit] == ["request-pending", "request-approved", "request-accepted"]
        assert audit[0]["detail"]["rule"] == "approval" and audit[1]["actor"] == f"operator:{pwd.getpwuid(os.getuid()).pw_name}"
        assert audit[1]["detail"]["comment"] == "capacity for the release"
    finally:
        daemon.stop()
