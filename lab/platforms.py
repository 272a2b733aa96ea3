"""The platforms the lab can provision on, each with its peer, the governord config that points
at it, and a view of the machines as the platform itself reports them (the "other side").

``Lab.start_platform(kind)`` starts one; the demo (``python -m lab.demo --platform KIND``) and the
tests use the same code. A platform's provider instance is named after its kind.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .process import PeerProcess, start_peer

if TYPE_CHECKING:
    from .stack import Lab

#: machine name -> {"id", "state", "address"}, as the platform reports them
MachineView = dict[str, dict[str, Any]]


@dataclass
class Platform:
    """A running platform peer and how governord reaches it."""

    kind: str
    #: the body of ``[providers.<provider>]`` (TOML lines, secrets as env references)
    provider_section: str
    #: the role's ``profile`` as a TOML inline table
    profile: str
    #: network the role allocates static addresses from ("lab"), or None (the platform assigns)
    network: str | None
    #: the machines governord owns there, read through the platform's own API
    machines: Callable[[], MachineView]
    peers: list[PeerProcess] = field(default_factory=list)
    #: the user data (cloud-init) a machine (by id) was started with, read through the
    #: platform's own API; None where the lab cannot read it back
    user_data: Callable[[str], str | None] | None = None

    @property
    def provider(self) -> str:
        return self.kind


def start_vsphere(lab: Lab) -> Platform:
    from . import vcsim

    peer = lab.vcsim or lab.start_vcsim()
    section = f"""type = "vsphere"
url = "{peer.url}"
username = "governord"
password = {{ env = "LAB_VCSIM_PASSWORD" }}
verify_tls = false
datacenter = "{vcsim.DATACENTER}"
cluster = "{vcsim.CLUSTER}"
resource_pool = "{vcsim.RESOURCE_POOL}"
folder = "{vcsim.FOLDER}"
max_concurrency = 8
call_timeout = 60.0
ready_timeout = 120.0
"""

    def machines() -> MachineView:
        return {name: {"id": vm["moid"], "state": vm["power"], "address": vm["ip"]}
                for name, vm in lab.vsphere_vms(peer).items()}

    return Platform("vsphere", section, f'{{ template = "{vcsim.TEMPLATE}", cpus = 2, memory_mb = 4096 }}', "lab",
                    machines)


def start_ovirt(lab: Lab) -> Platform:
    from .vcsim import make_tls_files

    tls = make_tls_files(lab.workdir / "ovirt-tls")
    password = lab.passwords.setdefault("LAB_OVIRT_PASSWORD", lab.new_password())
    peer, _ = start_peer(
        "ovirt-sim",
        [sys.executable, "-m", "lab.ovirt_sim", "--host", "127.0.0.1", "--port", "0", "--username",
         "admin@internal", f"--password={password}", "--tls-cert", str(tls.cert), "--tls-key", str(tls.key),
         "--time-unit", "0.05"],
        cwd=lab.repo_root, log_path=lab.workdir / "ovirt-sim.log",
    )
    lab.peers.append(peer)
    section = f"""type = "ovirt"
url = "{peer.url}"
username = "admin@internal"
password = {{ env = "LAB_OVIRT_PASSWORD" }}
verify_tls = true
ca_file = "{tls.ca}"
cluster = "Default"
ready_timeout = 120.0
"""

    def machines() -> MachineView:
        import ovirtsdk4

        connection = ovirtsdk4.Connection(url=peer.url, username="admin@internal", password=password,
                                          ca_file=str(tls.ca))
        try:
            found = {}
            for vm in connection.system_service().vms_service().list():
                if (vm.comment or "").startswith("governord:host-id="):
                    found[vm.name] = {"id": vm.id, "state": vm.status.value if vm.status else None,
                                      "address": None}
            return found
        finally:
            connection.close()

    return Platform("ovirt", section, '{ template = "rhel9-template", memory_mb = 2048, cpus = 2 }', "lab",
                    machines, peers=[peer])


def start_ec2(lab: Lab) -> Platform:
    from . import ec2

    peer = ec2.start_moto(lab.workdir)
    lab.peers.append(peer)
    resources = ec2.prepare_lab(peer.url)
    lab.passwords.setdefault("LAB_EC2_SECRET", ec2.SECRET_ACCESS_KEY)
    section = f"""type = "ec2"
region = "{resources.region}"
endpoint_url = "{peer.url}"
access_key_id = "{ec2.ACCESS_KEY_ID}"
secret_access_key = {{ env = "LAB_EC2_SECRET" }}
ready_timeout = 120.0
"""
    profile = (f'{{ image_id = "{resources.image_id}", instance_type = "t3.medium", '
               f'subnet_id = "{resources.subnet_id}", security_group_ids = ["{resources.security_group_id}"], '
               f'key_name = "{resources.key_name}" }}')

    def machines() -> MachineView:
        client = ec2.client(peer.url, resources.region)
        found = {}
        for reservation in client.describe_instances(
                Filters=[{"Name": "tag-key", "Values": ["governord:host-id"]}])["Reservations"]:
            for instance in reservation["Instances"]:
                if instance["State"]["Name"] == "terminated":
                    continue
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                found[tags.get("Name", instance["InstanceId"])] = {
                    "id": instance["InstanceId"], "state": instance["State"]["Name"],
                    "address": instance.get("PrivateIpAddress")}
        return found

    def user_data(machine_id: str) -> str | None:
        client = ec2.client(peer.url, resources.region)
        value = client.describe_instance_attribute(InstanceId=machine_id, Attribute="userData")["UserData"].get("Value")
        return base64.b64decode(value).decode() if value else None

    return Platform("ec2", section, profile, None, machines, peers=[peer], user_data=user_data)


def start_openstack(lab: Lab) -> Platform:
    from . import openstack

    cloud = openstack.start_openstack(lab.workdir / "openstack")
    lab.peers += [cloud.keystone, cloud.nova]
    lab.passwords.setdefault("LAB_OPENSTACK_PASSWORD", cloud.password)
    section = f"""type = "openstack"
auth_url = "{cloud.auth_url}"
username = "{cloud.username}"
password = {{ env = "LAB_OPENSTACK_PASSWORD" }}
project_name = "{cloud.project}"
user_domain_name = "{cloud.user_domain}"
project_domain_name = "{cloud.project_domain}"
region_name = "{cloud.region}"
ready_timeout = 120.0
"""
    profile = f'{{ flavor = "{cloud.flavor}", image = "{cloud.image_id}", network = "{cloud.network}" }}'

    def machines() -> MachineView:
        connection = cloud.connect()
        try:
            return {server.name: {"id": server.id, "state": server.status,
                                  "address": next((a["addr"] for net in (server.addresses or {}).values()
                                                   for a in net), None)}
                    for server in connection.compute.servers()
                    if "governord:host-id" in (server.metadata or {})}
        finally:
            connection.close()

    return Platform("openstack", section, profile, None, machines, peers=[cloud.keystone, cloud.nova])


def _toml_value(value: Any) -> str:
    """A TOML inline value (strings as JSON strings, which TOML reads the same)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def _start_baremetal(lab: Lab, protocol: str) -> Platform:
    from . import baremetal

    directory = lab.workdir / f"baremetal-{protocol}"
    start = baremetal.start_ipmi_pool if protocol == "ipmi" else baremetal.start_redfish_pool
    pool = start(directory)
    lab.stoppers.append(pool.stop)
    lab.passwords.setdefault("LAB_BMC_PASSWORD", pool.password)
    config = pool.provider_config("LAB_BMC_PASSWORD")
    machines = config.pop("machines")
    section = "\n".join(f"{key} = {_toml_value(value)}" for key, value in config.items())
    section += "\nmachines = [\n" + "".join(f"  {_toml_value(m)},\n" for m in machines) + "]\n"

    def view() -> MachineView:
        """Machines in use, as the hardware shows it: powered on (BMC) or with the OS up."""
        found = {}
        for machine in pool.machines:
            power, os_state = machine.power(), machine.os.status().get("os")
            if power == "on" or os_state == "up":
                found[machine.name] = {"id": machine.name, "state": f"power {power}, os {os_state}",
                                       "address": machine.address}
        return found

    return Platform(protocol, section, "{ min_cpus = 2 }", None, view)


def start_ipmi(lab: Lab) -> Platform:
    return _start_baremetal(lab, "ipmi")


def start_redfish(lab: Lab) -> Platform:
    return _start_baremetal(lab, "redfish")


#: every platform the lab can start, by kind
PLATFORMS: dict[str, Callable[[Lab], Platform]] = {
    "vsphere": start_vsphere,
    "ovirt": start_ovirt,
    "ec2": start_ec2,
    "openstack": start_openstack,
    "ipmi": start_ipmi,
    "redfish": start_redfish,
}
