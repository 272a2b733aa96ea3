"""The gRPC code in daemon/autoscaler is generated from the protos beside it (externalgrpc.proto,
the service; kubenode.proto, the v1.Node of its template) by grpcio-tools: regenerating it gives
the committed files byte for byte, so the protos and the code the daemon runs cannot drift apart. ``python -m tests.meta.test_protos`` (``make protos``)
writes them after a change to the proto."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "daemon" / "autoscaler"
#: each proto, and whether it declares a service (then its gRPC module is generated too)
PROTOS = {"externalgrpc.proto": True, "kubenode.proto": False}


def generated_names(proto: str, service: bool) -> list[str]:
    stem = proto.removesuffix(".proto")
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi"] + ([f"{stem}_pb2_grpc.py"] if service else [])


def generate(out: Path) -> dict[str, bytes]:
    """Run protoc (grpcio-tools) on each proto as the module ``governord.autoscaler`` imports it
    (so the generated service module imports ``governord.autoscaler.externalgrpc_pb2``); returns
    the generated files by name."""
    import grpc_tools
    from grpc_tools import protoc

    staged = out / "governord" / "autoscaler"
    staged.mkdir(parents=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files: dict[str, bytes] = {}
    for proto, service in PROTOS.items():
        shutil.copyfile(PACKAGE / proto, staged / proto)
        grpc_out = [f"--grpc_python_out={out}"] if service else []
        status = protoc.main(["grpc_tools.protoc", f"-I{out}", f"-I{well_known}", f"--python_out={out}",
                              f"--pyi_out={out}", *grpc_out, f"governord/autoscaler/{proto}"])
        assert status == 0, f"protoc failed on {proto} ({status})"
        files.update({name: (staged / name).read_bytes() for name in generated_names(proto, service)})
    return files


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    for name, content in generate(tmp_path).items():
        committed = (PACKAGE / name).read_bytes()
        assert committed == content, f"daemon/autoscaler/{name} is not what its proto generates: run `make protos`"


def test_wire_names_are_the_autoscalers() -> None:
    from governord.autoscaler import externalgrpc_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["CloudProvider"]
    assert service.full_name == "clusterautoscaler.cloudprovider.v1.externalgrpc.CloudProvider"
    assert len(service.methods) == 15
    fields = {f.name: f.number for f in pb.NodeGroupIncreaseSizeRequest.DESCRIPTOR.fields}
    assert fields == {"delta": 1, "id": 2}
    assert {f.name: f.number for f in pb.NodeGroupTemplateNodeInfoResponse.DESCRIPTOR.fields} == {
        "nodeInfo": 1, "nodeBytes": 2}
    assert pb.InstanceStatus.instanceDeleting == 3


def test_the_template_node_has_kubernetes_field_numbers() -> None:
    """The numbers of Kubernetes' own messages (k8s.io/api core/v1 and apimachinery), which the
    autoscaler decodes the template with: one wrong number and a label lands nowhere."""
    from governord.autoscaler import kubenode_pb2 as kube

    def numbers(message: Any) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(kube.Node) == {"metadata": 1, "spec": 2, "status": 3}
    assert numbers(kube.ObjectMeta) == {"name": 1, "labels": 11, "annotations": 12}
    assert numbers(kube.NodeSpec) == {"providerID": 3, "unschedulable": 4, "taints": 5}
    assert numbers(kube.Taint) == {"key": 1, "value": 2, "effect": 3}
    assert numbers(kube.NodeStatus) == {"capacity": 1, "allocatable": 2, "conditions": 4, "nodeInfo": 7}
    assert numbers(kube.Quantity) == {"string": 1}
    assert numbers(kube.NodeCondition) == {"type": 1, "status": 2, "lastHeartbeatTime": 3, "lastTransitionTime": 4,
                                           "reason": 5, "message": 6}
    assert numbers(kube.Time) == {"seconds": 1, "nanos": 2}
    assert numbers(kube.NodeSystemInfo) == {"operatingSystem": 9, "architecture": 10}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        for file_name, text in generate(Path(scratch)).items():
            (PACKAGE / file_name).write_bytes(text)
            print(f"wrote daemon/autoscaler/{file_name}", file=sys.stderr)
