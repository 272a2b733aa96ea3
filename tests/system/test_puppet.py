"""Real Puppet end to end: a `puppet agent` with its own certname and ssldir plays the new
machine. Tag `node` -> Foreman hostgroup and classes -> the agent's certificate autosigned by
governord's one-time token -> catalog (Foreman as the ENC) with the node classes applied ->
report in PuppetDB -> the host is ready. Retire -> the CA no longer knows the certificate,
PuppetDB shows the node deactivated, and a further agent run is refused."""

from __future__ import annotations

import json
import shutil
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.puppet import PuppetStack
from lab.stack import Governord, Lab

from .conftest import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def puppet_lab() -> Iterator[tuple[Lab, PuppetStack]]:
    # the PostgreSQL user must be able to enter the stack's directory: not pytest's 0700 tmp
    workdir = Path(tempfile.mkdtemp(prefix="governord-puppet-e2e-"))
    workdir.chmod(0o711)
    with Lab(workdir / "lab") as lab:
        lab.start_foreman()
        lab.start_satellite()
        lab.start_platform("vsphere")
        yield lab, lab.start_puppet()
    shutil.rmtree(workdir, ignore_errors=True)


def _get(stack: PuppetStack, url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, context=stack.ssl_context(), timeout=20) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _pdb(stack: PuppetStack, endpoint: str, query: list[Any]) -> Any:
    url = f"{stack.puppetdb_https_url}/pdb/query/v4/{endpoint}?" + urllib.parse.urlencode({"query": json.dumps(query)})
    status, body = _get(stack, url)
    assert status == 200, (url, status)
    return body


def _delete(stack: PuppetStack, url: str) -> None:
    request = urllib.request.Request(url, method="DELETE")
    with urllib.request.urlopen(request, context=stack.ssl_context(), timeout=20) as resp:  # noqa: S310
        assert resp.status in (200, 204)


def _as_application(daemon: Governord, method: str, path: str) -> bytes:
    """The raw answer of the application API to the application ``demo`` (its own certificate)."""
    issued = daemon.ctl_json("apps", "register", "demo")
    context = ssl.create_default_context(cafile=issued["ca"])
    context.load_cert_chain(issued["certificate"], issued["key"])
    request = urllib.request.Request(f"https://127.0.0.1:{daemon.api_port}{path}", method=method)
    with urllib.request.urlopen(request, context=context, timeout=20) as resp:  # noqa: S310 - loopback
        assert resp.status == 200
        return bytes(resp.read())


def _host(daemon: Governord, name: str) -> dict[str, Any]:
    return daemon.ctl_json("hosts", "show", name)  # type: ignore[no-any-return]


def test_a_real_agent_is_autosigned_configured_handed_back_and_forgotten(
        puppet_lab: tuple[Lab, PuppetStack]) -> None:
    lab, stack = puppet_lab
    config = lab.write_config()
    config.write_text(config.read_text() + '\n[sweep]\ngrace = 0\n[sweep.policy]\norphaned = "clean"\n')
    daemon = lab.start_governord(config)
    try:
        daemon.ctl("scale", "demo", "node", "--add", "1")
        host = wait_until(lambda: (h := _host(daemon, "demo-node-01"))["state"] == "configuring" and h,
                          timeout=120, what="configuring")
        fqdn = host["fqdn"]
        # exactly this certificate name was pre-authorised, with a token for cloud-init
        puppet = host["registrations"]["puppetca"]
        assert puppet["certname"] == fqdn and puppet["autosign_token"]
        csr_attributes = puppet["cloud_config"]["puppet"]["csr_attributes"]
        # the ready gate holds while no report exists
        time.sleep(3)
        assert _host(daemon, fqdn)["state"] == "configuring"

        # the application sees the certificate's name, never the token nor its cloud-config
        seen = _as_application(daemon, "GET", "/v1/hosts")
        [mine] = [h for h in json.loads(seen)["hosts"] if h["fqdn"] == fqdn]
        assert mine["registrations"]["puppetca"]["certname"] == fqdn
        assert puppet["autosign_token"] not in seen.decode() and "cloud_config" not in seen.decode()
        # the decision is asked on the autosign socket, which only puppetserver's policy may open
        assert lab.autosign_socket().stat().st_mode & 0o777 == 0o600

        # someone else with a guessed token is not signed
        code, output = stack.run_agent("intruder.lab.example",
                                       csr_attributes={"custom_attributes": {"1.2.840.113549.1.9.7": "guess"}})
        assert code == 1
        assert _get(stack, f"{stack.server_url}/puppet-ca/v1/certificate_status/intruder.lab.example")[1][
            "state"] == "requested"

        # whoever got hold of the token (before, an application could read it) asks, with it, for
        # a trusted fact of its choosing: refused, and the token is not spent by the refusal
        pp_role = "1.3.6.1.4.1.34380.1.1.13"
        forged = {**csr_attributes, "extension_requests": {**csr_attributes["extension_requests"],
                                                            pp_role: "puppetserver"}}
        code, output = stack.run_agent(fqdn, csr_attributes=forged)
        assert code == 1, output
        assert _get(stack, f"{stack.server_url}/puppet-ca/v1/certificate_status/{fqdn}")[1]["state"] == "requested"
        [refusal] = [e for e in _host(daemon, fqdn)["events"] if e["kind"] == "autosign-refused"]
        assert pp_role in refusal["detail"]["reason"] and refusal["actor"] == "puppet-autosign"
        _delete(stack, f"{stack.server_url}/puppet-ca/v1/certificate_status/{fqdn}")  # its pending request
        stack.forget_agent(fqdn)

        # the machine's first agent run: signed, classified by Foreman, configured
        code, output = stack.run_agent(fqdn, csr_attributes=csr_attributes)
        assert code == 2, output
        status, cert = _get(stack, f"{stack.server_url}/puppet-ca/v1/certificate_status/{fqdn}")
        assert status == 200 and cert["state"] == "signed"
        ready = wait_until(lambda: (h := _host(daemon, fqdn))["state"] == "ready" and h, timeout=120,
                           what="ready after the report")
        assert ready["error"] is None
        [report] = _pdb(stack, "reports", ["and", ["=", "certname", fqdn], ["=", "latest_report?", True]])
        assert report["status"] == "changed"
        events = _pdb(stack, "events", ["=", "report", report["hash"]])
        applied = sorted(e["resource_title"] for e in events if e["resource_type"] == "Notify")
        assert applied == ["openshift::node applied", "profile::base applied"]
        audit = [e["kind"] for e in _host(daemon, fqdn)["events"]]
        assert audit.count("autosign-signed") == 1
        # the token is spent: a second CSR with it (a cloned machine) is refused
        code, _ = stack.run_agent("demo-node-01-clone.lab.example", csr_attributes=csr_attributes)
        assert code == 1

        # the certificate and the PuppetDB node carry governord's marker (the CSR asked for it),
        # so the sweep sees them as this live host's: listed, nothing to find. The clone's
        # pending request carries the marker too, but of a live host: not an orphan either.
        sweep = daemon.ctl_json("sweep", "--dry-run")
        assert sweep["errors"] == [] and sweep["findings"] == []
        assert sweep["checked"]["registrars"]["puppetdb"] == 1
        assert sweep["checked"]["registrars"]["puppetca"] == 2

        # retire: certificate cleaned, node deactivated after the machine is gone, agent refused
        daemon.ctl("retire", fqdn, "--wait", timeout=300)
        assert _host(daemon, fqdn)["state"] == "gone"
        assert _get(stack, f"{stack.server_url}/puppet-ca/v1/certificate_status/{fqdn}")[0] == 404
        [node] = _pdb(stack, "nodes", ["and", ["=", "certname", fqdn], ["=", "node_state", "any"]])
        assert node["deactivated"] is not None
        assert _pdb(stack, "nodes", ["=", "certname", fqdn]) == []
        kinds = [e["kind"] for e in _host(daemon, fqdn)["events"]]
        assert kinds.index("deregistered") < kinds.index("deprovisioned") < kinds.index("gone")
        assert lab.vsphere_vms() == {} and lab.foreman_hosts() == {} and lab.satellite_systems() == {}
        code, output = stack.run_agent(fqdn)
        assert code != 0 and "certificate" in output.lower()

        # the refused clone's request names the gone host: an orphan the sweep cleans
        clone = "demo-node-01-clone.lab.example"
        sweep = daemon.ctl_json("sweep", "--dry-run")
        assert [(f["kind"], f["where"], f["name"], f["record"]) for f in sweep["findings"]] == [
            ("orphaned", "puppetca", clone, "gone")]
        assert sweep["checked"]["registrars"]["puppetdb"] == 0
        assert _get(stack, f"{stack.server_url}/puppet-ca/v1/certificate_status/{clone}")[1]["state"] == "requested"
        sweep = daemon.ctl_json("sweep")
        assert [f["action"] for f in sweep["findings"]] == ["deregistered"]
        assert _get(stack, f"{stack.server_url}/puppet-ca/v1/certificate_status/{clone}")[0] == 404
        assert daemon.ctl_json("sweep", "--dry-run")["findings"] == []
    finally:
        daemon.stop()


def test_a_node_groups_agent_gets_its_provider_id_as_a_class_parameter(puppet_lab: tuple[Lab, PuppetStack]) -> None:
    """A Cluster Autoscaler node group's host: Foreman's ENC hands the real puppetserver its
    providerID as openshift::node's provider_id (a smart class parameter override), the catalog
    compiles with it (a class without the parameter would not), and the agent applies it."""
    lab, stack = puppet_lab
    daemon = lab.start_governord(lab.write_config(autoscaler=True))
    try:
        daemon.ctl("scale", "demo", "node", "--add", "1")
        # the lab's puppetserver asks the default instance's autosign socket: this daemon's state
        # may hold an earlier test's hosts (gone), so the new one is the live one
        host = wait_until(lambda: [h for h in daemon.ctl_json("hosts", "list") if h["state"] == "configuring"],
                          timeout=120, what="configuring")[0]
        fqdn = host["fqdn"]
        csr_attributes = _host(daemon, fqdn)["registrations"]["puppetca"]["cloud_config"]["puppet"]["csr_attributes"]
        stack.forget_agent(fqdn)  # a new machine: no ssldir of an earlier host of that name (another test's)
        code, output = stack.run_agent(fqdn, csr_attributes=csr_attributes)
        assert code == 2, output
        wait_until(lambda: _host(daemon, fqdn)["state"] == "ready", timeout=120, what="ready after the report")
        [report] = _pdb(stack, "reports", ["and", ["=", "certname", fqdn], ["=", "latest_report?", True]])
        events = _pdb(stack, "events", ["=", "report", report["hash"]])
        applied = sorted(e["resource_title"] for e in events if e["resource_type"] == "Notify")
        assert applied == ["openshift::node applied", f"openshift::node kubelet provider-id governord://{host['id']}",
                           "profile::base applied"]
        daemon.ctl("retire", fqdn, "--wait", timeout=300)
        assert _host(daemon, fqdn)["state"] == "gone"
    finally:
        daemon.stop()
