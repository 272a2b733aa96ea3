"""The gRPC code in daemon/autoscaler is generated from externalgrpc.proto beside it, by
grpcio-tools: regenerating it gives the committed files byte for byte, so the proto and the code
the daemon runs cannot drift apart. ``python -m tests.meta.test_protos`` (``make protos``)
writes them after a change to the proto."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "daemon" / "autoscaler"
PROTO = "externalgrpc.proto"
GENERATED = ("externalgrpc_pb2.py", "externalgrpc_pb2.pyi", "externalgrpc_pb2_grpc.py")


def generate(out: Path) -> dict[str, bytes]:
    """Run protoc (grpcio-tools) on the proto as the module ``governord.autoscaler`` imports it
    (so the generated service module imports ``governord.autoscaler.externalgrpc_pb2``); returns
    the generated files by name."""
    import grpc_tools
    from grpc_tools import protoc

    staged = out / "governord" / "autoscaler"
    staged.mkdir(parents=True)
    shutil.copyfile(PACKAGE / PROTO, staged / PROTO)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    status = protoc.main(["grpc_tools.protoc", f"-I{out}", f"-I{well_known}", f"--python_out={out}",
                          f"--pyi_out={out}", f"--grpc_python_out={out}", f"governord/autoscaler/{PROTO}"])
    assert status == 0, f"protoc failed on {PROTO} ({status})"
    return {name: (staged / name).read_bytes() for name in GENERATED}


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    for name, content in generate(tmp_path).items():
        committed = (PACKAGE / name).read_bytes()
        assert committed == content, f"daemon/autoscaler/{name} is not what {PROTO} generates: run `make protos`"


def test_wire_names_are_the_autoscalers() -> None:
    from governord.autoscaler import externalgrpc_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["CloudProvider"]
    assert service.full_name == "clusterautoscaler.cloudprovider.v1.externalgrpc.CloudProvider"
    assert len(service.methods) == 15
    fields = {f.name: f.number for f in pb.NodeGroupIncreaseSizeRequest.DESCRIPTOR.fields}
    assert fields == {"delta": 1, "id": 2}
    assert {f.name: f.number for f in pb.NodeGroupTemplateNodeInfoResponse.DESCRIPTOR.fields} == {"nodeBytes": 2}
    assert pb.InstanceStatus.instanceDeleting == 3


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        for file_name, text in generate(Path(scratch)).items():
            (PACKAGE / file_name).write_bytes(text)
            print(f"wrote daemon/autoscaler/{file_name}", file=sys.stderr)
