"""The Cluster Autoscaler's provider in-process, over real gRPC and mutual TLS, on the in-memory
provider and registrar: what the lab test cannot time (hosts not made yet, a request held for
approval) and the instance states of every host state. Against the lab:
tests/system/test_autoscaler.py."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from governord import testing
from governord.autoscaler import externalgrpc_pb2 as pb
from governord.autoscaler import externalgrpc_pb2_grpc as pb_grpc
from governord.autoscaler import kubenode_pb2 as kube
from governord.autoscaler.service import AutoscalerListener, host_id_of, instance_status
from governord.autoscaler.template import TemplateUnknown, template_node
from governord.engine import cloud_config
from governord.pki import CertificateAuthority
from governord.runtime import Runtime

from .conftest import wait_states

GROUP = "demo/node"
AUTOSCALER = '\n[autoscaler]\nlisten = "127.0.0.1"\nport = 0\nnode_groups = ["demo/node"]\n'


@pytest.fixture
async def provider(make_runtime: Callable[..., Any], request: pytest.FixtureRequest) -> AsyncIterator[
        tuple[Runtime, pb_grpc.CloudProviderStub]]:
    param = getattr(request, "param", "never")
    approval = "never" if param == "drain" else param
    drain = '\n[applications.demo.drain]\ntimeout = 600\n' if param == "drain" else ""
    runtime: Runtime = await make_runtime(AUTOSCALER + drain, lambda text: text.replace(
        "max_hosts = 5", f'max_hosts = 5\napproval = "{approval}"'))
    server = runtime.ca.issue("localhost", server_names=["localhost"], stem="server")
    client = runtime.ca.issue("demo", stem="demo")
    assert server.key is not None and client.key is not None
    listener = AutoscalerListener(runtime, None, certificate=str(server.certificate), key=str(server.key),
                                  client_ca=str(runtime.ca.cert_path))
    port = await listener.start()
    credentials = grpc.ssl_channel_credentials(root_certificates=runtime.ca.cert_path.read_bytes(),
                                               private_key=client.key.read_bytes(),
                                               certificate_chain=client.certificate.read_bytes())
    channel = grpc.aio.secure_channel(f"localhost:{port}", credentials)
    try:
        yield runtime, pb_grpc.CloudProviderStub(channel)
    finally:
        await channel.close()
        await listener.stop()
        await runtime.stop()


async def target(stub: pb_grpc.CloudProviderStub) -> int:
    return int((await stub.NodeGroupTargetSize(pb.NodeGroupTargetSizeRequest(id=GROUP))).targetSize)


async def test_decrease_cancels_only_hosts_not_made_yet(provider: tuple[Runtime, pb_grpc.CloudProviderStub]) -> None:
    runtime, stub = provider
    await runtime.engine.stop(0)  # nothing moves on: the hosts stay requested
    await stub.NodeGroupIncreaseSize(pb.NodeGroupIncreaseSizeRequest(id=GROUP, delta=2))
    assert await target(stub) == 2
    nodes = (await stub.NodeGroupNodes(pb.NodeGroupNodesRequest(id=GROUP))).instances
    assert [n.status.instanceState for n in nodes] == [pb.InstanceStatus.instanceCreating] * 2

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.NodeGroupDecreaseTargetSize(pb.NodeGroupDecreaseTargetSizeRequest(id=GROUP, delta=-3))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "2 hosts not made yet, asked to cancel 3" in (caught.value.details() or "")
    assert await target(stub) == 2
    await stub.NodeGroupDecreaseTargetSize(pb.NodeGroupDecreaseTargetSizeRequest(id=GROUP, delta=-1))
    assert await target(stub) == 1
    rows = await runtime.store.list_hosts(app="demo")
    cancelled = [r for r in rows if r["retire_requested"]]
    kept = [r for r in rows if not r["retire_requested"]]
    assert len(cancelled) == 1 and len(kept) == 1 and cancelled[0]["created_at"] >= kept[0]["created_at"]

    # the engine again: the cancelled host retires without a machine ever being made
    runtime.engine._stopping = False  # noqa: SLF001 - the test stopped it above
    await runtime.engine.start()
    await wait_states(runtime, [cancelled[0]["id"]], {"gone"})
    [made] = await wait_states(runtime, [kept[0]["id"]], {"ready"})
    assert [m.host_id for m in testing.MemoryProvider.worlds["mem"].values()] == [made["id"]]
    # a host that exists is never cancelled by lowering the target
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.NodeGroupDecreaseTargetSize(pb.NodeGroupDecreaseTargetSizeRequest(id=GROUP, delta=-1))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await runtime.store.get_host(made["id"]) or {})["state"] == "ready"


@pytest.mark.parametrize("provider", ["drain"], indirect=True)
async def test_delete_nodes_never_drains_again(provider: tuple[Runtime, pb_grpc.CloudProviderStub]) -> None:
    """The autoscaler drained its nodes before DeleteNodes: an application that drains its own
    scale-downs has them retired at once, and a node it was draining has its drain confirmed."""
    runtime, stub = provider
    await stub.NodeGroupIncreaseSize(pb.NodeGroupIncreaseSizeRequest(id=GROUP, delta=3))
    rows = sorted(await wait_states(runtime, [r["id"] for r in await runtime.store.list_hosts(app="demo")],
                                    {"ready"}), key=lambda r: r["name"])
    draining = (await runtime.governor.scale("demo", "node", count=2, actor="app:demo")).hosts or []
    assert [(h["name"], h["state"]) for h in draining] == [(rows[2]["name"], "draining")]
    nodes = [pb.ExternalGrpcNode(name=r["name"], providerID=f"governord://{r['id']}") for r in rows[1:]]
    await stub.NodeGroupDeleteNodes(pb.NodeGroupDeleteNodesRequest(id=GROUP, nodes=nodes))
    await wait_states(runtime, [rows[1]["id"], rows[2]["id"]], {"gone"})
    assert "drain-requested" not in [e["kind"] for e in await runtime.store.list_events(host_id=rows[1]["id"])]
    confirmed = [e for e in await runtime.store.list_events(host_id=rows[2]["id"]) if e["kind"] == "drained"]
    assert [e["detail"]["by"] for e in confirmed] == ["autoscaler"]
    assert [m.host_id for m in testing.MemoryProvider.worlds["mem"].values()] == [rows[0]["id"]]


@pytest.mark.parametrize("provider", ["always"], indirect=True)
async def test_an_increase_held_for_approval(provider: tuple[Runtime, pb_grpc.CloudProviderStub]) -> None:
    runtime, stub = provider
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.NodeGroupIncreaseSize(pb.NodeGroupIncreaseSizeRequest(id=GROUP, delta=1))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "pending approval" in (caught.value.details() or "")
    assert await target(stub) == 0
    # the autoscaler asks again after its backoff: the request that waits is named, no second one
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.NodeGroupIncreaseSize(pb.NodeGroupIncreaseSizeRequest(id=GROUP, delta=1))
    [waiting] = await runtime.store.pending_requests("demo")
    assert waiting["id"] in (caught.value.details() or "") and waiting["actor"] == "autoscaler"
    # approved, its host counts in the target and is made
    approved = await runtime.governor.decide_pending(waiting["id"], approve=True, comment="ok", actor="op")
    assert approved["state"] == "accepted"
    assert await target(stub) == 1
    await wait_states(runtime, approved["host_ids"], {"ready"})


def test_instance_states() -> None:
    def row(state: str, **values: Any) -> dict[str, Any]:
        return {"state": state, "retire_requested": False, "failed_step": None, "error": None, **values}

    assert instance_status(row("requested")).instanceState == pb.InstanceStatus.instanceCreating
    assert instance_status(row("configuring")).instanceState == pb.InstanceStatus.instanceCreating
    assert instance_status(row("ready")).instanceState == pb.InstanceStatus.instanceRunning
    assert instance_status(row("ready", retire_requested=True)).instanceState == pb.InstanceStatus.instanceDeleting
    assert instance_status(row("deprovisioning")).instanceState == pb.InstanceStatus.instanceDeleting
    assert instance_status(row("draining")).instanceState == pb.InstanceStatus.instanceDeleting
    failed = instance_status(row("failed", failed_step="provision", error="vSphere: no datastore space"))
    assert failed.instanceState == pb.InstanceStatus.instanceCreating
    assert failed.errorInfo.errorCode == "governord-provision-failed"
    assert failed.errorInfo.errorMessage == "vSphere: no datastore space"
    assert instance_status(row("failed", failed_step="deregister")).instanceState == pb.InstanceStatus.instanceDeleting
    assert instance_status(row("ready")).errorInfo.errorCode == ""


def test_provider_ids() -> None:
    assert host_id_of("governord://0b6f") == "0b6f"
    for other in ("aws:///eu-west-1a/i-0abc", "governord://", "governord://a/b", "", "vsphere://4201"):
        assert host_id_of(other) is None


def test_the_provider_id_reaches_cloud_init() -> None:
    registrations = {"cmdb": {"cloud_config": {"write_files": [{"path": "/etc/x", "content": "x"}], "puppet": {}}}}
    document = cloud_config(registrations, provider_id="governord://h-1")
    assert document is not None and document.startswith("#cloud-config\n")
    data = json.loads(document.split("\n", 1)[1])
    assert data["write_files"] == [{"path": "/etc/x", "content": "x"}, {
        "path": "/etc/governord/provider-id", "content": "governord://h-1\n", "permissions": "0644", "owner": "root:root"}]
    assert data["puppet"] == {}
    assert cloud_config({}, provider_id=None) is None


async def test_a_node_group_host_carries_its_provider_id(provider: tuple[Runtime, pb_grpc.CloudProviderStub]) -> None:
    runtime, stub = provider
    await stub.NodeGroupIncreaseSize(pb.NodeGroupIncreaseSizeRequest(id=GROUP, delta=1))
    [row] = await runtime.store.list_hosts(app="demo")
    [row] = await wait_states(runtime, [row["id"]], {"ready"})
    spec = runtime.engine.machine_spec(row)
    assert spec.user_data is not None and f"governord://{row['id']}" in spec.user_data
    [instance] = (await stub.NodeGroupNodes(pb.NodeGroupNodesRequest(id=GROUP))).instances
    assert instance.id == f"governord://{row['id']}"


async def test_a_site_ca_and_who_it_names(make_runtime: Callable[..., Any], tmp_path: Path) -> None:
    """With [api.tls] on a site CA the listener takes that CA's clients (the identity naming the
    application) and refuses governord's own CA's and one that names no application."""
    site = CertificateAuthority(tmp_path / "site")
    site.ensure()
    server = site.issue("localhost", server_names=["localhost"], stem="server")
    assert server.key is not None
    tls = (f'\n[api.tls]\ncertificate = "{server.certificate}"\nkey = "{server.key}"\n'
           f'client_ca = "{site.cert_path}"\n')
    runtime: Runtime = await make_runtime(AUTOSCALER, lambda text: text.replace("[engine]", tls + "[engine]", 1))
    listener = AutoscalerListener(runtime, None, certificate=str(server.certificate), key=str(server.key),
                                  client_ca=str(site.cert_path))
    port = await listener.start()

    async def groups(pair: Any) -> list[str]:
        credentials = grpc.ssl_channel_credentials(root_certificates=site.cert_path.read_bytes(),
                                                   private_key=pair.key.read_bytes(),
                                                   certificate_chain=pair.certificate.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            answer = await pb_grpc.CloudProviderStub(channel).NodeGroups(pb.NodeGroupsRequest(), timeout=10)
            return [g.id for g in answer.nodeGroups]

    try:
        assert await groups(site.issue("demo", stem="demo")) == [GROUP]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await groups(site.issue("shop", stem="shop"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "does not belong to a configured application" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await groups(runtime.ca.issue("demo", stem="own-demo"))  # governord's own CA: not trusted now
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await listener.stop()
        await runtime.stop()


NODE_TEMPLATE = """
[applications.demo.roles.node.node_template]
labels = { "node-role.kubernetes.io/worker" = "", "topology.kubernetes.io/zone" = "lab-a" }
taints = [{ key = "dedicated", value = "demo", effect = "NoSchedule" }]
capacity = { cpu = 4, memory = "16Gi", ephemeral-storage = "40Gi" }
allocatable = { memory = "15Gi" }
"""


async def _serve(runtime: Runtime) -> tuple[AutoscalerListener, grpc.aio.Channel]:
    server = runtime.ca.issue("localhost", server_names=["localhost"], stem="server")
    client = runtime.ca.issue("demo", stem="demo")
    assert server.key is not None and client.key is not None
    listener = AutoscalerListener(runtime, None, certificate=str(server.certificate), key=str(server.key),
                                  client_ca=str(runtime.ca.cert_path))
    port = await listener.start()
    credentials = grpc.ssl_channel_credentials(root_certificates=runtime.ca.cert_path.read_bytes(),
                                               private_key=client.key.read_bytes(),
                                               certificate_chain=client.certificate.read_bytes())
    return listener, grpc.aio.secure_channel(f"localhost:{port}", credentials)


async def test_a_group_with_no_host_describes_its_node(make_runtime: Callable[..., Any]) -> None:
    """Scale-up from zero: a group of minimum 0 without a host answers NodeGroupTemplateNodeInfo
    with a v1.Node the autoscaler decodes as it does (Node.Unmarshal of nodeBytes; releases up to
    1.34 read field 1 as a Node message): the role's labels and taints, its capacity, and the
    allocatable the kubelet leaves."""
    runtime: Runtime = await make_runtime(AUTOSCALER + NODE_TEMPLATE)
    listener, channel = await _serve(runtime)
    try:
        stub = pb_grpc.CloudProviderStub(channel)
        [group] = (await stub.NodeGroups(pb.NodeGroupsRequest())).nodeGroups
        assert (group.id, group.minSize) == (GROUP, 0)
        assert await target(stub) == 0 and await runtime.store.list_hosts(app="demo") == []
        call = stub.NodeGroupTemplateNodeInfo(pb.NodeGroupTemplateNodeInfoRequest(id=GROUP))
        answer = await call
    finally:
        await channel.close()
        await listener.stop()
        await runtime.stop()
    node = kube.Node.FromString(answer.nodeBytes)
    assert node.metadata.name == "template-node-for-demo-node"
    assert dict(node.metadata.labels) == {
        "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": node.metadata.name,
        "node-role.kubernetes.io/worker": "", "topology.kubernetes.io/zone": "lab-a"}
    assert [(t.key, t.value, t.effect) for t in node.spec.taints] == [("dedicated", "demo", "NoSchedule")]
    assert {k: v.string for k, v in node.status.capacity.items()} == {
        "cpu": "4", "memory": "16Gi", "pods": "110", "ephemeral-storage": "40Gi"}
    assert {k: v.string for k, v in node.status.allocatable.items()} == {
        "cpu": "4", "memory": "15Gi", "pods": "110", "ephemeral-storage": "40Gi"}
    assert ("Ready", "True") in [(c.type, c.status) for c in node.status.conditions]
    assert (node.status.nodeInfo.operatingSystem, node.status.nodeInfo.architecture) == ("linux", "amd64")
    assert not node.spec.providerID  # a template is no instance
    # the same response read with the message releases 1.25 to 1.34 declare (field 1 a Node)
    legacy = kube.LegacyTemplateNodeInfoResponse.FromString(answer.SerializeToString())
    assert legacy.nodeInfo == node


async def test_a_template_needs_the_machines_size(make_runtime: Callable[..., Any]) -> None:
    """The memory provider's profile says nothing of CPUs or memory: without node_template's
    capacity the call answers UNIMPLEMENTED (the autoscaler's "no template": it scales the group
    only from a node it has), naming the key to set."""
    runtime: Runtime = await make_runtime(AUTOSCALER)
    listener, channel = await _serve(runtime)
    try:
        stub = pb_grpc.CloudProviderStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.NodeGroupTemplateNodeInfo(pb.NodeGroupTemplateNodeInfoRequest(id=GROUP))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "applications.demo.roles.node.node_template.capacity.cpu" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.NodeGroupTemplateNodeInfo(pb.NodeGroupTemplateNodeInfoRequest(id="demo/other"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.NodeGroupGetOptions(pb.NodeGroupAutoscalingOptionsRequest(id=GROUP))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the autoscaler's own options apply
    finally:
        await channel.close()
        await listener.stop()
        await runtime.stop()


def test_a_template_from_the_profiles() -> None:
    """Without node_template the size comes from the placements' profiles, the smallest of each
    (a machine may be made on any of them); the instance type label only when all agree."""
    from governord.config import Config, CoreConfig, Placement
    from governord.plugins.ec2.config import EC2Profile
    from governord.plugins.ovirt.config import OVirtProfile
    from governord.plugins.vsphere.config import VSphereProfile

    def config(burst_template: dict[str, Any] | None = None, node_template: dict[str, Any] | None = None) -> Config:
        roles: dict[str, Any] = {"node": {"tags": ["node"], "provider": "vc"}, "burst": {"tags": ["node"], "provider": "aws"}}
        for role, template in (("node", node_template), ("burst", burst_template)):
            if template is not None:
                roles[role]["node_template"] = template
        core = CoreConfig.model_validate({"applications": {"app": {"roles": roles}}})
        return Config("test.toml", core, placements={
            ("app", "node"): [Placement("vc", None, None, VSphereProfile(template="t", cpus=8, memory_mb=32768)),
                              Placement("rhv", None, None, OVirtProfile(template="t", cpus=4, memory_mb=16384))],
            ("app", "burst"): [Placement("aws", None, None, EC2Profile(image_id="ami-1", instance_type="m6i.xlarge"))],
        })

    node = template_node(config(), "app", "node")
    assert {k: v.string for k, v in node.status.capacity.items()} == {"cpu": "4", "memory": "16384Mi", "pods": "110"}
    assert "node.kubernetes.io/instance-type" not in node.metadata.labels
    with pytest.raises(TemplateUnknown, match="capacity.cpu"):
        template_node(config(), "app", "burst")  # EC2's profile names the type; AWS knows its size
    burst = template_node(config({"capacity": {"cpu": 4, "memory": "16Gi"}}), "app", "burst")
    assert burst.metadata.labels["node.kubernetes.io/instance-type"] == "m6i.xlarge"
    # more allocatable than the smallest profile's memory (checked when the sizes are known)
    with pytest.raises(TemplateUnknown, match=r"allocatable.memory \(20000Mi\) is more than the capacity its machines "
                                              r"have \(16384Mi\)"):
        template_node(config(node_template={"allocatable": {"memory": "20000Mi"}}), "app", "node")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _openssl_ca(home: Path, name: str) -> Path:
    """A CA as a site makes one with openssl (RSA, not governord's code); returns its directory."""
    home.mkdir(parents=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/O=Site/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=home)
    return home


def _openssl_leaf(ca: Path, stem: str, cn: str, usage: str, san: str | None = None) -> tuple[Path, Path]:
    """A certificate the CA in ``ca`` signs (``usage``: serverAuth or clientAuth); (cert, key)."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/O=Site/CN={cn}", "-keyout", f"{stem}.key",
             "-out", f"{stem}.csr", cwd=ca)
    extensions = ["basicConstraints=critical,CA:FALSE", f"extendedKeyUsage={usage}"] + ([f"subjectAltName={san}"] if san else [])
    (ca / f"{stem}.ext").write_text("\n".join(extensions) + "\n")
    _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "1", "-extfile", f"{stem}.ext", "-out", f"{stem}.pem", cwd=ca)
    return ca / f"{stem}.pem", ca / f"{stem}.key"


async def test_a_site_ca_made_with_openssl(make_runtime: Callable[..., Any], tmp_path: Path) -> None:
    """[api.tls] on a site's own CA (made with openssl, as a site makes one): the autoscaler's
    client certificate from that CA naming the application is served; one naming the same
    application from a CA the listener does not trust is refused in the TLS handshake."""
    site = _openssl_ca(tmp_path / "site", "Site Root CA")
    server_cert, server_key = _openssl_leaf(site, "server", "localhost", "serverAuth", "DNS:localhost")
    client_cert, client_key = _openssl_leaf(site, "demo", "demo", "clientAuth")
    elsewhere = _openssl_ca(tmp_path / "elsewhere", "Another CA")
    stranger_cert, stranger_key = _openssl_leaf(elsewhere, "demo", "demo", "clientAuth")
    tls = (f'\n[api.tls]\ncertificate = "{server_cert}"\nkey = "{server_key}"\nclient_ca = "{site / "ca.pem"}"\n')
    runtime: Runtime = await make_runtime(AUTOSCALER, lambda text: text.replace("[engine]", tls + "[engine]", 1))
    tls_section = runtime.config.api.tls
    listener = AutoscalerListener(runtime, None, certificate=str(tls_section.certificate), key=str(tls_section.key),
                                  client_ca=str(tls_section.client_ca))
    port = await listener.start()

    async def groups(cert: Path, key: Path) -> list[str]:
        credentials = grpc.ssl_channel_credentials(root_certificates=(site / "ca.pem").read_bytes(),
                                                   private_key=key.read_bytes(), certificate_chain=cert.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            answer = await pb_grpc.CloudProviderStub(channel).NodeGroups(pb.NodeGroupsRequest(), timeout=10)
            return [g.id for g in answer.nodeGroups]

    try:
        assert await groups(client_cert, client_key) == [GROUP]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await groups(stranger_cert, stranger_key)
        # the same client's certificate, only its CA differs: the handshake failed, no call was made
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await listener.stop()
        await runtime.stop()
