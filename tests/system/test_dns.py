"""One name everywhere: the whole daemon against vcsim, the Foreman and Satellite simulators and a
real DNS server (BIND 9, and PowerDNS), with the dns registrar beside Foreman and Satellite.

Each host's name on the platform, its A and PTR records, its Foreman host and its Satellite
profile must agree, read on each side through its own interface (the VM in vcsim, a zone transfer
and plain queries of the DNS server, Foreman's API, Satellite's XML-RPC). A retired host's records
go once its machine is gone; the sweep finds a marked name of a host governord does not have.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.reversename
import dns.tsig
import dns.update
import pytest

from lab.stack import Lab

# the whole lab per run; on a loaded machine one run has taken nearly three minutes
pytestmark = pytest.mark.timeout(900)

SWEEP = """
[sweep]
interval = 0
grace = 0

[sweep.policy]
orphaned = "clean"
"""


def ask(lab: Lab, name: str, rdtype: str) -> list[str]:
    """A plain, unsigned query of the lab's DNS server: what any resolver is told."""
    server = lab.dns
    answer = dns.query.udp(dns.message.make_query(name, rdtype), server.address, port=server.port, timeout=3)
    return sorted(r.to_text().rstrip(".") for rrset in answer.answer for r in rrset)


def plant(lab: Lab, name: str, address: str, host_id: str) -> None:
    """What a crash or an old installation leaves: a name with governord's marker of a host it does not have."""
    server = lab.dns
    update = dns.update.UpdateMessage("lab.example.", keyring=dns.tsig.Key(server.key.name, server.key.secret,
                                                                           server.key.algorithm))
    update.replace(name + ".", 60, "A", address)
    update.replace(name + ".", 60, "TXT", f'"governord:host-id={host_id}"')
    assert dns.query.tcp(update, server.address, port=server.port, timeout=3).rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize("kind", ["bind", "powerdns"])
def test_one_name_everywhere(tmp_path: Path, kind: str) -> None:
    with Lab(tmp_path / "lab") as lab:
        # destroying a VM takes 6 s, so the test sees the host while its machine is being destroyed
        lab.start_vcsim(method_delays={"Destroy_Task": 6000})
        lab.start_peers("vsphere")
        lab.start_dns(kind)
        config = lab.write_config()
        config.write_text(config.read_text() + SWEEP)
        daemon = lab.start_governord(config)
        try:
            daemon.ctl("scale", "demo", "node", "--add", "3", "--wait", timeout=300)
            hosts = {h["fqdn"]: h for h in daemon.ctl_json("hosts", "list")}
            assert len(hosts) == 3 and {h["state"] for h in hosts.values()} == {"ready"}
            vms = lab.vsphere_vms()
            records = lab.dns_records()
            foreman = lab.foreman_hosts()
            satellite = lab.satellite_systems()
            for fqdn, host in hosts.items():
                [address] = host["addresses"]
                reverse = dns.reversename.from_address(address).to_text().rstrip(".")
                # the platform: the VM is named for the host and has its address
                vm = vms[host["name"]]
                assert vm["host_id"] == host["id"] and fqdn == f"{vm['name']}.lab.example"
                # DNS: the name answers the address, the address the name, each under the host's marker
                marker = f"governord:host-id={host['id']}"
                assert records[fqdn] == {"A": [address], "TXT": [marker]}
                assert records[reverse] == {"PTR": [fqdn], "TXT": [marker]}
                assert ask(lab, fqdn, "A") == [address] and ask(lab, reverse, "PTR") == [fqdn]
                # Foreman and Satellite know the host by the same name (and Foreman by the address)
                assert foreman[fqdn]["ip"] == address
                assert fqdn in satellite
                # what governord recorded of it, as an application sees it
                shown = daemon.ctl_json("hosts", "show", host["name"])["registrations"]["dns"]
                assert shown == {"fqdn": fqdn, "addresses": [address], "reverse": [reverse]}
            assert sorted(foreman) == sorted(satellite) == sorted(hosts)
            assert {n for n, r in records.items() if "A" in r} - {"ns1.lab.example"} == set(hosts)

            # retired: the records go with the machine, and only its records
            retired = hosts.pop("demo-node-01.lab.example")
            [address] = retired["addresses"]
            daemon.ctl("retire", retired["name"])
            seen = set()
            deadline = time.monotonic() + 300
            # read from the store directly: a governord-ctl run per poll could outlast the window
            while (state := daemon.db_query("SELECT state FROM hosts WHERE id = ?", (retired["id"],))[0]["state"]) \
                    != "gone":
                assert time.monotonic() < deadline, state
                if state == "deprovisioning":
                    # deregistered from Foreman already, the machine being destroyed: its name still answers
                    assert ask(lab, retired["fqdn"], "A") == [address]
                    seen.add(state)
                time.sleep(0.1)
            assert seen == {"deprovisioning"}
            assert ask(lab, retired["fqdn"], "A") == [] and ask(lab, retired["fqdn"], "TXT") == []
            assert ask(lab, dns.reversename.from_address(address).to_text(), "PTR") == []
            assert retired["name"] not in lab.vsphere_vms() and retired["fqdn"] not in lab.foreman_hosts()
            for fqdn, host in hosts.items():
                assert ask(lab, fqdn, "A") == host["addresses"]

            # the sweep: a marked name of a host governord never had is an orphan, removed as policy says
            stranger = str(uuid.uuid4())
            plant(lab, "stranger.lab.example", "198.51.100.251", stranger)
            dry = daemon.ctl_json("sweep", "--dry-run")
            orphans = {(f["where"], f["host_id"], f["name"]) for f in dry["findings"] if f["kind"] == "orphaned"}
            assert orphans == {("dns", stranger, "stranger.lab.example")}, dry
            assert ask(lab, "stranger.lab.example", "A") == ["198.51.100.251"]
            real = daemon.ctl_json("sweep")
            assert real["errors"] == [] and [f["action"] for f in real["findings"]] == ["deregistered"]
            assert ask(lab, "stranger.lab.example", "A") == [] and ask(lab, "stranger.lab.example", "TXT") == []
            for fqdn, host in hosts.items():
                assert ask(lab, fqdn, "A") == host["addresses"]
        finally:
            assert daemon.stop() == 0
