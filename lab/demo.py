"""``make demo``: the whole loop once, on the local lab, printing what exists at each step.

1. start the lab: the platform's peer (vcsim built from Debian's govmomi sources by default; see
   ``--platform``), the Foreman and Satellite simulators, and a DNS server (Debian's BIND 9 by
   default; ``--dns powerdns`` or ``none``) that the dns registrar updates
2. start governord on SQLite, as systemd would (notify socket, READY only once it listens)
3. the demo application asks for 3 nodes over HTTPS with its own client certificate
4. an operator tags one of them `broker` with governord-ctl
5. an operator retires another with governord-ctl
With ``--autoscaler``, instead: the Kubernetes Cluster Autoscaler's loop over gRPC (NodeGroups,
IncreaseSize, NodeGroupNodes as the instances move, DeleteNodes).
After each step it shows the hosts as governord, vSphere, Foreman, Satellite and DNS see them, and
checks that they agree; it exits non-zero if they do not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.reversename
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .platforms import PLATFORMS
from .stack import Governord, Lab

# wide enough for the tables when output goes to a pipe or a CI log
console = Console(width=max(shutil.get_terminal_size((160, 40)).columns, 160))


def show(lab: Lab, daemon: Governord, title: str) -> dict[str, Any]:
    """The hosts as governord and each peer see them. A host's machine is found by the machine
    id governord recorded (on bare metal: the pool's machine it got, whatever its name), else by
    the host's name; a machine of no host is a row of its own."""
    assert lab.platform
    hosts = {h["fqdn"]: h for h in daemon.ctl_json("hosts", "list")}
    machines = lab.platform.machines()
    by_id = {vm["id"]: (name, vm) for name, vm in machines.items()}
    vms: dict[str, dict[str, Any]] = {}
    for fqdn, h in hosts.items():
        found = by_id.pop(h["machine_id"], None) if h.get("machine_id") else None
        if found is None and h["name"] in machines:
            found = (h["name"], by_id.pop(machines[h["name"]]["id"], (h["name"], machines[h["name"]]))[1])
        if found is not None:
            vms[fqdn] = {**found[1], "name": found[0]}
    for name, vm in by_id.values():  # machines no host has
        vms[f"{name.split('.')[0]}.lab.example" if "." not in name else name] = {**vm, "name": name}
    foreman = lab.foreman_hosts()
    satellite = lab.satellite_systems()
    names = dns_names(lab) if lab.dns is not None else {}
    table = Table(title=title, title_justify="left", header_style="bold")
    columns = ["host", "governord", "tags", f"{lab.platform.kind} machine", "Foreman hostgroup / classes",
               "Satellite groups"]
    for column in columns + (["DNS (A, PTR)"] if lab.dns is not None else []):
        table.add_column(column)
    for fqdn in sorted(set(hosts) | set(vms) | set(foreman) | set(satellite) | set(names)):
        h, vm, fm, sat = hosts.get(fqdn), vms.get(fqdn), foreman.get(fqdn), satellite.get(fqdn)
        machine = "-"
        if vm:
            named = f"{vm['name']} " if vm["name"] != vm["id"] and vm["name"].split(".")[0] != fqdn.split(".")[0] \
                else ""
            machine = f"{named}{vm['id']} {vm['state']} {vm['address'] or ''}".strip()
        row = [
            fqdn,
            h["state"] if h else "-",
            ",".join(h["tags"]) if h else "-",
            machine,
            f"{fm['hostgroup']}: {', '.join(fm['puppet_classes'])}" if fm else "-",
            ", ".join(sat["groups"]) if sat else "-",
        ]
        if lab.dns is not None:
            found_names = names.get(fqdn)
            row.append("; ".join(f"{a} (PTR {'back' if p == [fqdn] else ', '.join(p) or 'none'})"
                                 for a, p in found_names.items()) if found_names else "-")
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)
    console.print()
    return {"hosts": hosts, "vms": vms, "foreman": foreman, "satellite": satellite, "dns": names}


def dns_names(lab: Lab) -> dict[str, dict[str, list[str]]]:
    """The lab DNS server's names (other than its own): FQDN -> address -> the names its PTR gives."""
    records = lab.dns_records()
    names: dict[str, dict[str, list[str]]] = {}
    for name, sets in records.items():
        if name == "ns1.lab.example":
            continue
        for address in sets.get("A", []) + sets.get("AAAA", []):
            reverse = records.get(dns.reversename.from_address(address).to_text().rstrip("."), {})
            names.setdefault(name, {})[address] = reverse.get("PTR", [])
    return names


def expect_dns(seen: dict[str, Any], lab: Lab) -> None:
    """Every host's name answers its addresses, and each address's PTR names the host; no other names."""
    if lab.dns is None:
        return
    hosts = {fqdn: h for fqdn, h in seen["hosts"].items() if h["state"] != "gone"}
    expect(set(seen["dns"]) == set(hosts), f"DNS has exactly the hosts' names ({len(hosts)})")
    for fqdn, host in hosts.items():
        expect(seen["dns"][fqdn] == {a: [fqdn] for a in host["addresses"]},
               f"{fqdn}: A {', '.join(host['addresses'])}, and their PTR back to {fqdn}")


def expect(condition: bool, message: str) -> None:
    if not condition:
        console.print(f"[red]demo check failed:[/red] {message}")
        raise SystemExit(1)
    console.print(f"[green]ok[/green] {message}")


def play_the_machines(lab: Lab, daemon: Governord, timeout: float = 300) -> None:
    """No real machine boots in the lab, so the demo plays each new machine's Puppet agent: for
    every host waiting in `configuring`, a real `puppet agent` run with the host's certname and
    the csr_attributes governord put in its cloud-init user data."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hosts = daemon.ctl_json("hosts", "list")
        waiting = [h for h in hosts if h["state"] == "configuring"]
        if not waiting and all(h["state"] in ("ready", "gone", "failed") for h in hosts):
            return
        for host in waiting:
            attributes = host["registrations"]["puppetca"]["cloud_config"]["puppet"]["csr_attributes"]
            code, _ = lab.puppet.run_agent(host["fqdn"], csr_attributes=attributes)
            console.print(f"  puppet agent on {host['fqdn']}: exit {code} (2 = changes applied)")
        time.sleep(1)
    raise SystemExit("hosts did not settle")


def show_puppet(lab: Lab, daemon: Governord) -> dict[str, str]:
    """The classes each host's latest report in PuppetDB applied (the Notify of each class)."""
    import urllib.parse

    stack = lab.puppet
    seen: dict[str, str] = {}
    table = Table(title="PuppetDB: latest report per host", title_justify="left", header_style="bold")
    for column in ("host", "certificate", "report", "classes applied"):
        table.add_column(column)
    for host in daemon.ctl_json("hosts", "list"):
        query = json.dumps(["and", ["=", "certname", host["fqdn"]], ["=", "latest_report?", True]])
        url = f"{stack.puppetdb_https_url}/pdb/query/v4/reports?" + urllib.parse.urlencode({"query": query})
        with urllib.request.urlopen(url, context=stack.ssl_context(), timeout=20) as resp:  # noqa: S310
            reports = json.loads(resp.read())
        applied = "-"
        if reports:
            events_url = f"{stack.puppetdb_https_url}/pdb/query/v4/events?" + urllib.parse.urlencode(
                {"query": json.dumps(["=", "report", reports[0]["hash"]])})
            with urllib.request.urlopen(events_url, context=stack.ssl_context(), timeout=20) as resp:  # noqa: S310
                events = json.loads(resp.read())
            applied = ", ".join(sorted(e["resource_title"].removesuffix(" applied") for e in events
                                       if e["resource_type"] == "Notify"))
        try:
            with urllib.request.urlopen(f"{stack.server_url}/puppet-ca/v1/certificate_status/{host['fqdn']}",
                                        context=stack.ssl_context(), timeout=20) as resp:  # noqa: S310
                cert = json.loads(resp.read())["state"]
        except urllib.error.HTTPError:
            cert = "unknown to the CA"
        table.add_row(host["fqdn"], cert, reports[0]["status"] if reports else "-", applied)
        seen[host["fqdn"]] = applied
    console.print(table)
    console.print()
    return seen


def app_request(daemon: Governord, cert: dict[str, str], method: str, path: str, body: Any = None, *,
                quiet: bool = False) -> Any:
    """What the demo application does: HTTPS with its client certificate; shown as it goes
    (``quiet``: not shown, for the polls)."""
    context = ssl.create_default_context(cafile=cert["ca"])
    context.load_cert_chain(cert["certificate"], cert["key"])
    data = json.dumps(body).encode() if body is not None else None
    url = f"https://localhost:{daemon.api_port}{path}"
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if not quiet:
        console.print(f"[bold]the application sends[/bold] {escape(method)} {escape(url)}")
        console.print(f"  client certificate {escape(cert['certificate'])} (CN {escape(cert['common_name'])}), "
                      f"trusting {escape(cert['ca'])}")
        if data is not None:
            console.print(f"  Content-Type: application/json\n  {escape(data.decode())}")
    with urllib.request.urlopen(request, context=context, timeout=30) as resp:  # noqa: S310 - loopback
        answer = json.loads(resp.read())
        if not quiet:
            shown = {k: answer[k] for k in ("id", "decision", "status", "reason") if k in answer}
            console.print(f"[bold]governord answers[/bold] {resp.status}: {escape(json.dumps(shown))}")
        return answer


def run(workdir: Path, platform: str, puppet: bool, dns_server: str = "bind") -> None:
    with Lab(workdir) as lab:
        console.rule(f"1. the lab ({platform}{', with Puppet' if puppet else ''})")
        lab.start_peers(platform)
        if dns_server != "none":
            server = lab.start_dns(dns_server)
            console.print(f"DNS            {server.address}:{server.port} ({dns_server}, Debian's; zones "
                          f"{', '.join(z.rstrip('.') for z in server.zones)}; updates signed with TSIG key "
                          f"{server.key.name})")
        for peer in lab.peers:
            console.print(f"{peer.name:14} {peer.url}")
        if puppet:
            stack = lab.start_puppet()
            console.print(f"puppetserver   {stack.server_url} (Debian's, Foreman as the ENC, governord's autosign)")
            console.print(f"puppetdb       {stack.puppetdb_https_url}")
        console.print(f"Satellite  {lab.satellite.url}  (project simulator)" if lab.satellite else "")

        console.rule("2. governord")
        daemon = lab.start_governord()
        console.print(f"READY from governord (pid {daemon.process.pid}); config {daemon.config}")
        console.print(daemon.ctl("plugins").stdout)

        console.rule("3. the demo application asks for 3 nodes")
        cert = daemon.ctl_json("apps", "register", "demo")
        request = app_request(daemon, cert, "POST", "/v1/scale",
                              {"role": "node", "add": 3, "idempotency_key": "demo-scale-1"})
        console.print(f"request {request['id']}: {request['decision']}, hosts "
                      f"{', '.join(h['name'] for h in request['hosts'])}")
        if puppet:
            play_the_machines(lab, daemon)
        deadline = time.monotonic() + 300
        while request["status"] == "in-progress" and time.monotonic() < deadline:
            time.sleep(0.5)
            request = app_request(daemon, cert, "GET", f"/v1/requests/{request['id']}", quiet=True)
        console.print(f"request status: {request['status']}")
        seen = show(lab, daemon, "after scale-up")
        if puppet:
            show_puppet(lab, daemon)
        expect(request["status"] == "completed", "the request completed")
        expect(len(seen["vms"]) == 3 and len(seen["foreman"]) == 3 and len(seen["satellite"]) == 3,
               f"3 machines on {platform}, 3 hosts in Foreman, 3 systems in Satellite")
        expect_dns(seen, lab)

        console.rule("4. governord-ctl tag demo-node-02 broker")
        if puppet:
            console.print(daemon.ctl("tag", "demo-node-02", "broker").stdout)
            play_the_machines(lab, daemon)
        else:
            console.print(daemon.ctl("tag", "demo-node-02", "broker", "--wait").stdout)
        seen = show(lab, daemon, "after tagging demo-node-02 broker")
        if puppet:
            applied = show_puppet(lab, daemon)
            expect("openshift::broker" in applied["demo-node-02.lab.example"],
                   "Puppet applied openshift::broker on demo-node-02 before it was handed back")
        fqdn = "demo-node-02.lab.example"
        expect(seen["foreman"][fqdn]["hostgroup"] == "openshift/broker", "Foreman hostgroup is openshift/broker")
        expect("openshift-brokers" in seen["satellite"][fqdn]["groups"], "Satellite group openshift-brokers")

        console.rule("5. governord-ctl retire demo-node-01")
        console.print(daemon.ctl("retire", "demo-node-01", "--wait").stdout)
        seen = show(lab, daemon, "after retiring demo-node-01")
        gone = "demo-node-01.lab.example"
        expect(gone not in seen["vms"] and gone not in seen["foreman"] and gone not in seen["satellite"],
               f"demo-node-01 is gone from {platform}, Foreman and Satellite")
        expect_dns(seen, lab)
        console.print(daemon.ctl("hosts", "show", "demo-node-01").stdout)

        console.rule("6. stop")
        code = daemon.stop()
        expect(code == 0, "governord stopped cleanly on SIGTERM")
        console.print(f"governord's log: {daemon.log}")


def run_autoscaler(workdir: Path, platform: str) -> None:
    """``--autoscaler``: one scale-up and one scale-down as the Kubernetes Cluster Autoscaler makes
    them, over gRPC with the application's client certificate (a client generated from
    daemon/autoscaler/externalgrpc.proto), with governord's, the platform's, Foreman's and
    Satellite's tables after each."""
    import grpc

    from governord.autoscaler import externalgrpc_pb2 as pb
    from governord.autoscaler import externalgrpc_pb2_grpc as pb_grpc
    from governord.autoscaler import kubenode_pb2 as kube

    group = "demo/node"
    with Lab(workdir) as lab:
        console.rule(f"1. the lab ({platform})")
        lab.start_peers(platform)
        for peer in lab.peers:
            console.print(f"{peer.name:14} {peer.url}")

        console.rule(escape('2. governord with [autoscaler] node_groups = ["demo/node"]'))
        daemon = lab.start_governord(lab.write_config(max_hosts=3, autoscaler=True))
        cert = daemon.ctl_json("apps", "register", "demo")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(cert["ca"]).read_bytes(), private_key=Path(cert["key"]).read_bytes(),
            certificate_chain=Path(cert["certificate"]).read_bytes())
        address = f"localhost:{daemon.autoscaler_port}"
        console.print(f"the autoscaler's cloud-config: address {address}, cert/key {cert['certificate']}, "
                      f"cacert {cert['ca']}")
        stub = pb_grpc.CloudProviderStub(grpc.secure_channel(address, credentials))

        def instances(title: str) -> dict[str, int]:
            answer = stub.NodeGroupNodes(pb.NodeGroupNodesRequest(id=group), timeout=30)
            size = stub.NodeGroupTargetSize(pb.NodeGroupTargetSizeRequest(id=group), timeout=30).targetSize
            table = Table(title=f"{title}: NodeGroupNodes({group}), target size {size}", title_justify="left",
                          header_style="bold")
            table.add_column("instance (providerID)")
            table.add_column("state")
            table.add_column("error")
            states = {}
            for instance in answer.instances:
                states[instance.id] = instance.status.instanceState
                table.add_row(instance.id, pb.InstanceStatus.InstanceState.Name(instance.status.instanceState),
                              instance.status.errorInfo.errorCode or "-")
            console.print(table)
            return states

        console.rule("3. the autoscaler's loop: Refresh, NodeGroups, NodeGroupIncreaseSize(demo/node, 2)")
        stub.Refresh(pb.RefreshRequest(), timeout=30)
        for g in stub.NodeGroups(pb.NodeGroupsRequest(), timeout=30).nodeGroups:
            console.print(f"node group {g.id}: min {g.minSize}, max {g.maxSize} ({g.debug})")
        # the group has no node yet: the autoscaler simulates the scale-up on the group's template
        try:
            template = kube.Node.FromString(stub.NodeGroupTemplateNodeInfo(
                pb.NodeGroupTemplateNodeInfoRequest(id=group), timeout=30).nodeBytes)
        except grpc.RpcError as exc:  # a profile that gives no size (EC2, OpenStack) and no node_template
            console.print(escape(f"NodeGroupTemplateNodeInfo(demo/node): {exc.code().name}: {exc.details()}"))
            expect(exc.code() == grpc.StatusCode.UNIMPLEMENTED, "no template node without a size, and why")
        else:
            capacity = {k: v.string for k, v in template.status.capacity.items()}
            console.print(escape(f"NodeGroupTemplateNodeInfo(demo/node): {template.metadata.name}, capacity {capacity}, "
                                 f"labels {dict(template.metadata.labels)}"))
            expect(bool(capacity.get("cpu")) and bool(capacity.get("memory")),
                   "the group's template node has the profile's CPUs and memory (a scale-up from zero)")
        stub.NodeGroupIncreaseSize(pb.NodeGroupIncreaseSizeRequest(id=group, delta=2), timeout=30)
        instances("just after IncreaseSize")
        def states() -> dict[str, int]:
            found = stub.NodeGroupNodes(pb.NodeGroupNodesRequest(id=group), timeout=30).instances
            return {i.id: i.status.instanceState for i in found}

        def wait_for(done: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + 300
            while not done():
                if time.monotonic() > deadline:
                    expect(False, f"{what} within 300 s")
                time.sleep(0.5)
            expect(True, what)

        wait_for(lambda: set(states().values()) == {pb.InstanceStatus.instanceRunning}, "both instances running")
        running = instances("once made and registered")
        seen = show(lab, daemon, "after the scale-up")
        expect(len(running) == 2 and len(seen["vms"]) == 2 and len(seen["foreman"]) == 2 and len(seen["satellite"]) == 2,
               f"2 instances running, 2 machines on {platform}, 2 hosts in Foreman, 2 systems in Satellite")
        for fqdn, host in seen["hosts"].items():
            expect(seen["foreman"][fqdn]["parameters"].get("governord_provider_id") == f"governord://{host['id']}",
                   f"{fqdn}: Foreman parameter governord_provider_id = governord://{host['id']}")
        try:
            stub.NodeGroupIncreaseSize(pb.NodeGroupIncreaseSizeRequest(id=group, delta=2), timeout=30)
            expect(False, "a scale-up past max_hosts is refused")
        except grpc.RpcError as exc:
            console.print(f"NodeGroupIncreaseSize(demo/node, 2): {exc.code().name}: {exc.details()}")
            expect(exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, "a scale-up past max_hosts is refused with the reason")

        victim = sorted(running)[0]
        console.rule(escape(f"4. scale-down: NodeGroupDeleteNodes(demo/node, [{victim}])"))
        stub.NodeGroupDeleteNodes(pb.NodeGroupDeleteNodesRequest(
            id=group, nodes=[pb.ExternalGrpcNode(providerID=victim)]), timeout=30)
        instances("just after DeleteNodes")
        wait_for(lambda: victim not in states(), "the deleted instance gone")
        instances("once torn down")
        seen = show(lab, daemon, "after the scale-down")
        expect(len(seen["vms"]) == 1 and len(seen["foreman"]) == 1 and len(seen["satellite"]) == 1,
               f"1 machine left on {platform}, in Foreman and in Satellite")

        console.rule("5. stop")
        expect(daemon.stop() == 0, "governord stopped cleanly on SIGTERM")
        console.print(f"governord's log: {daemon.log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="keep the lab's files and logs here (default: a temporary "
                        "directory, removed unless the demo fails)")
    parser.add_argument("--platform", choices=sorted(PLATFORMS), default="vsphere",
                        help="where the machines are made (default: vsphere on vcsim)")
    parser.add_argument("--puppet", action="store_true",
                        help="add Debian's puppetserver and PuppetDB: autosign, Foreman as the ENC, the ready gate")
    parser.add_argument("--dns", choices=["bind", "powerdns", "none"], default="bind",
                        help="the DNS server the dns registrar updates (default: Debian's BIND 9)")
    parser.add_argument("--autoscaler", action="store_true",
                        help="instead, one scale-up and one scale-down as the Kubernetes Cluster Autoscaler makes them")
    args = parser.parse_args(argv)

    def play(workdir: Path) -> None:
        if args.autoscaler:
            run_autoscaler(workdir, args.platform)
        else:
            run(workdir, args.platform, args.puppet, args.dns)

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        console.print(f"the lab's files and logs are kept in {args.workdir} (governord's: "
                      f"{args.workdir / 'governord' / 'governord.log'})")
        play(args.workdir)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="governord-demo-"))
    workdir.chmod(0o711)  # the Puppet stack's PostgreSQL runs as user postgres
    try:
        play(workdir)
    except BaseException:
        # a demo that failed keeps what shows why
        console.print(f"the demo failed: the lab's files and logs are kept in {workdir} (governord's: "
                      f"{workdir / 'governord' / 'governord.log'})")
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
