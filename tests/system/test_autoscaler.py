"""governord as the Cluster Autoscaler's ``externalgrpc`` cloud provider, driven by a client
generated from the same proto the way the autoscaler's loop drives it (Refresh, then the cached
NodeGroups and NodeGroupForNode; a scale-up; a scale-down), against the lab: every answer is
checked against the other side (vcsim's VMs, the Foreman and Satellite simulators, governord's
own database)."""

from __future__ import annotations

import base64
import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from governord.autoscaler import externalgrpc_pb2 as pb
from governord.autoscaler import externalgrpc_pb2_grpc as pb_grpc
from governord.autoscaler import kubenode_pb2 as kube
from governord.pki import CertificateAuthority
from lab.stack import Governord, Lab

from .conftest import wait_until

GROUP = "demo/node"
STATE = pb.InstanceStatus


def start_with_autoscaler(lab: Lab, *, max_hosts: int = 3) -> Governord:
    return lab.start_governord(lab.write_config(max_hosts=max_hosts, autoscaler=True))


def channel(daemon: Governord, issued: dict[str, str] | None) -> grpc.Channel:
    ca = Path(daemon.state_dir / "pki" / "ca.pem").read_bytes()
    if issued is None:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=Path(issued["key"]).read_bytes(),
                                                   certificate_chain=Path(issued["certificate"]).read_bytes())
    return grpc.secure_channel(f"localhost:{daemon.autoscaler_port}", credentials)


def call(stub: pb_grpc.CloudProviderStub, method: str, request: Any) -> Any:
    return getattr(stub, method)(request, timeout=30)


def refused(stub: pb_grpc.CloudProviderStub, method: str, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(stub, method, request)
    return caught.value


def node(provider_id: str, name: str = "a-node") -> pb.ExternalGrpcNode:
    return pb.ExternalGrpcNode(providerID=provider_id, name=name)


def foreman_enc(lab: Lab, host_id: int) -> dict[str, Any]:
    """What Foreman's ENC gives Puppet for the host (its classes and parameters)."""
    assert lab.foreman is not None
    token = base64.b64encode(f"admin:{lab.passwords['LAB_FOREMAN_PASSWORD']}".encode()).decode()
    request = urllib.request.Request(f"{lab.foreman.url}/api/hosts/{host_id}/enc", headers={
        "Authorization": f"Basic {token}", "Accept": "application/json;version=2"})
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback lab peer
        return dict(json.loads(resp.read())["data"])


def provider_id_overrides(lab: Lab) -> dict[str, Any]:
    """openshift::node's provider_id overrides in Foreman, by match (fqdn=HOST)."""
    assert lab.foreman
    token = base64.b64encode(f"admin:{lab.passwords['LAB_FOREMAN_PASSWORD']}".encode()).decode()

    def get(path: str) -> Any:
        request = urllib.request.Request(f"{lab.foreman.url}/foreman_puppet/api/{path}", headers={  # type: ignore[union-attr]
            "Authorization": f"Basic {token}", "Accept": "application/json;version=2"})
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback lab peer
            return json.loads(resp.read())

    search = urllib.parse.quote('puppetclass_name = "openshift::node" and parameter = "provider_id"')
    [smart] = get(f"smart_class_parameters?search={search}")["results"]
    values = get(f"smart_class_parameters/{smart['id']}/override_values?per_page=all")["results"]
    return {v["match"]: v["value"] for v in values}


def instances(stub: pb_grpc.CloudProviderStub) -> dict[str, Any]:
    answer = call(stub, "NodeGroupNodes", pb.NodeGroupNodesRequest(id=GROUP))
    return {i.id: i.status for i in answer.instances}


def test_the_autoscalers_loop_over_mtls(lab: Lab) -> None:
    daemon = start_with_autoscaler(lab)
    try:
        issued = daemon.ctl_json("apps", "register", "demo")
        stub = pb_grpc.CloudProviderStub(channel(daemon, issued))

        # the start of each loop: Refresh, then what the autoscaler caches until the next Refresh
        call(stub, "Refresh", pb.RefreshRequest())
        groups = call(stub, "NodeGroups", pb.NodeGroupsRequest()).nodeGroups
        assert [(g.id, g.minSize, g.maxSize) for g in groups] == [(GROUP, 0, 3)]
        unmanaged = call(stub, "NodeGroupForNode", pb.NodeGroupForNodeRequest(node=node("aws:///eu-west-1a/i-0abc")))
        assert unmanaged.nodeGroup.id == ""
        assert call(stub, "GPULabel", pb.GPULabelRequest()).label == "nvidia.com/gpu"
        assert list(call(stub, "GetAvailableGPUTypes", pb.GetAvailableGPUTypesRequest()).gpuTypes) == ["nvidia-tesla-t4"]
        assert call(stub, "NodeGroupTargetSize", pb.NodeGroupTargetSizeRequest(id=GROUP)).targetSize == 0
        for method, request in (("PricingNodePrice", pb.PricingNodePriceRequest()),
                                ("NodeGroupGetOptions", pb.NodeGroupAutoscalingOptionsRequest(id=GROUP))):
            assert refused(stub, method, request).code() == grpc.StatusCode.UNIMPLEMENTED
        # scale-up from zero: the group's node, sized by the vSphere profile (cpus 2, memory_mb
        # 4096), decoded as the autoscaler decodes it (Node.Unmarshal of nodeBytes)
        template = call(stub, "NodeGroupTemplateNodeInfo", pb.NodeGroupTemplateNodeInfoRequest(id=GROUP))
        sized = kube.Node.FromString(template.nodeBytes)
        assert {k: v.string for k, v in sized.status.capacity.items()} == {"cpu": "2", "memory": "4096Mi", "pods": "110"}
        assert sized.metadata.labels["kubernetes.io/os"] == "linux" and not sized.spec.taints

        # scale-up: the target grows at once, the instances move from creating to running
        call(stub, "NodeGroupIncreaseSize", pb.NodeGroupIncreaseSizeRequest(id=GROUP, delta=2))
        assert call(stub, "NodeGroupTargetSize", pb.NodeGroupTargetSizeRequest(id=GROUP)).targetSize == 2
        first = instances(stub)
        assert len(first) == 2 and all(i.startswith("governord://") for i in first)
        assert {s.instanceState for s in first.values()} <= {STATE.instanceCreating, STATE.instanceRunning}
        wait_until(lambda: {s.instanceState for s in instances(stub).values()} == {STATE.instanceRunning},
                   timeout=120, what="both instances running")
        hosts = {f"governord://{h['id']}": h for h in daemon.ctl_json("hosts", "list")}
        assert sorted(hosts) == sorted(first)
        assert {h["state"] for h in hosts.values()} == {"ready"}
        assert sorted(lab.vsphere_vms()) == sorted(h["name"] for h in hosts.values())
        assert sorted(lab.foreman_hosts()) == sorted(h["fqdn"] for h in hosts.values())
        assert sorted(lab.satellite_systems()) == sorted(h["fqdn"] for h in hosts.values())
        # the providerID reaches the machine's configuration: a Foreman host parameter, which
        # Foreman's ENC hands Puppet as a parameter of the node
        # and a smart class parameter override, which the ENC hands Puppet as openshift::node's
        # provider_id (the lab's class declares it; a real puppetserver compiles it)
        foreman = lab.foreman_hosts()
        for pid, host in hosts.items():
            assert foreman[host["fqdn"]]["parameters"]["governord_provider_id"] == pid
            enc = foreman_enc(lab, foreman[host["fqdn"]]["id"])
            assert enc["parameters"]["governord_provider_id"] == pid
            assert enc["classes"]["openshift::node"] == {"provider_id": pid}
        assert sorted(provider_id_overrides(lab)) == sorted(f"fqdn={h['fqdn']}" for h in hosts.values())
        events = daemon.db_query("SELECT actor, kind FROM events WHERE kind = 'request-accepted'")
        assert [e["actor"] for e in events] == ["autoscaler"]

        # each node maps to the group by its providerID (what the kubelet reports)
        some_id, some_host = next(iter(hosts.items()))
        mapped = call(stub, "NodeGroupForNode", pb.NodeGroupForNodeRequest(node=node(some_id, some_host["name"])))
        assert mapped.nodeGroup.id == GROUP and mapped.nodeGroup.maxSize == 3

        # a cap refusal reaches the autoscaler with the rule's reason; nothing was made
        refusal = refused(stub, "NodeGroupIncreaseSize", pb.NodeGroupIncreaseSizeRequest(id=GROUP, delta=2))
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "cap reached" in (refusal.details() or "") and "may have 3" in (refusal.details() or "")
        assert call(stub, "NodeGroupTargetSize", pb.NodeGroupTargetSizeRequest(id=GROUP)).targetSize == 2
        # nothing left to cancel: made hosts are never removed by lowering the target
        refusal = refused(stub, "NodeGroupDecreaseTargetSize", pb.NodeGroupDecreaseTargetSizeRequest(id=GROUP, delta=-1))
        assert refusal.code() == grpc.StatusCode.FAILED_PRECONDITION and "not made yet" in (refusal.details() or "")
        assert len(lab.vsphere_vms()) == 2
        # an unknown group, a node of no group: refused, and nothing is retired
        assert refused(stub, "NodeGroupTargetSize", pb.NodeGroupTargetSizeRequest(id="demo/other")).code() \
            == grpc.StatusCode.NOT_FOUND
        refusal = refused(stub, "NodeGroupDeleteNodes", pb.NodeGroupDeleteNodesRequest(
            id=GROUP, nodes=[node(some_id), node("governord://no-such-host", "stranger")]))
        assert refusal.code() == grpc.StatusCode.NOT_FOUND and "stranger" in (refusal.details() or "")
        assert {h["state"] for h in daemon.ctl_json("hosts", "list")} == {"ready"}

        # scale-down: exactly the named node is deleted, and verified gone everywhere
        call(stub, "NodeGroupDeleteNodes", pb.NodeGroupDeleteNodesRequest(id=GROUP, nodes=[node(some_id)]))
        assert call(stub, "NodeGroupTargetSize", pb.NodeGroupTargetSizeRequest(id=GROUP)).targetSize == 1
        status = instances(stub).get(some_id)
        assert status is None or status.instanceState == STATE.instanceDeleting
        wait_until(lambda: some_id not in instances(stub), timeout=120, what="the deleted instance gone")
        assert daemon.ctl_json("hosts", "show", some_host["name"])["state"] == "gone"
        assert some_host["name"] not in lab.vsphere_vms()
        assert some_host["fqdn"] not in lab.foreman_hosts()
        assert some_host["fqdn"] not in lab.satellite_systems()
        assert f"fqdn={some_host['fqdn']}" not in provider_id_overrides(lab)
        assert len(lab.vsphere_vms()) == 1
        # a deleted node no longer maps to the group
        gone = call(stub, "NodeGroupForNode", pb.NodeGroupForNodeRequest(node=node(some_id)))
        assert gone.nodeGroup.id == ""
        call(stub, "Cleanup", pb.CleanupRequest())
    finally:
        daemon.stop()


def test_a_client_without_a_valid_certificate_is_refused(lab: Lab, tmp_path: Path) -> None:
    daemon = start_with_autoscaler(lab)
    try:
        # no client certificate: the handshake fails
        stub = pb_grpc.CloudProviderStub(channel(daemon, None))
        assert refused(stub, "NodeGroups", pb.NodeGroupsRequest()).code() == grpc.StatusCode.UNAVAILABLE
        # one from another CA: the handshake fails too
        other = CertificateAuthority(tmp_path / "other-ca")
        other.ensure()
        pair = other.issue("demo", stem="demo")
        stranger = {"certificate": str(pair.certificate), "key": str(pair.key)}
        stub = pb_grpc.CloudProviderStub(channel(daemon, stranger))
        assert refused(stub, "NodeGroups", pb.NodeGroupsRequest()).code() == grpc.StatusCode.UNAVAILABLE
        # governord's own, revoked: refused at the call, naming why
        issued = daemon.ctl_json("apps", "register", "demo")
        daemon.ctl("apps", "revoke", "demo", "--serial", issued["serial"])
        stub = pb_grpc.CloudProviderStub(channel(daemon, issued))
        refusal = refused(stub, "NodeGroups", pb.NodeGroupsRequest())
        assert refusal.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in (refusal.details() or "")
        assert daemon.db_rows("hosts") == []
    finally:
        daemon.stop()


def test_the_provider_id_reaches_cloud_init_on_ec2(tmp_path: Path) -> None:
    """On a platform that starts machines with user data (EC2, here moto), the node group's
    machine gets its providerID in its cloud-init document, read back through EC2's API."""
    with Lab(tmp_path / "lab") as lab:
        lab.start_peers("ec2")
        assert lab.platform is not None and lab.platform.user_data is not None
        daemon = start_with_autoscaler(lab)
        try:
            issued = daemon.ctl_json("apps", "register", "demo")
            stub = pb_grpc.CloudProviderStub(channel(daemon, issued))
            call(stub, "NodeGroupIncreaseSize", pb.NodeGroupIncreaseSizeRequest(id=GROUP, delta=1))
            wait_until(lambda: {s.instanceState for s in instances(stub).values()} == {STATE.instanceRunning},
                       timeout=180, what="the instance running")
            [host] = daemon.ctl_json("hosts", "list")
            document = lab.platform.user_data(host["machine_id"])
            assert document is not None and document.startswith("#cloud-config\n")
            files = json.loads(document.split("\n", 1)[1])["write_files"]
            assert {"path": "/etc/governord/provider-id", "content": f"governord://{host['id']}\n",
                    "permissions": "0644", "owner": "root:root"} in files
            assert list(instances(stub)) == [f"governord://{host['id']}"]
        finally:
            assert daemon.stop() == 0
