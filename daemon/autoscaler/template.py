"""The node a node group's scale-up would add, as the Cluster Autoscaler's simulation wants it
(``NodeGroupTemplateNodeInfo``): a Kubernetes v1.Node in Kubernetes' protobuf encoding, from the
role's ``node_template`` and what its placements' profiles say of the machines.

What the node has:

- labels: ``kubernetes.io/os`` (linux), ``kubernetes.io/arch`` (amd64), ``kubernetes.io/hostname``
  (the template's name), ``node.kubernetes.io/instance-type`` when every placement names the same
  instance type or flavor, then the role's ``node_template.labels`` over them;
- taints: the role's ``node_template.taints``;
- capacity: ``cpu`` and ``memory`` from ``node_template.capacity``, else from the profiles (the
  smallest over the role's placements: the machine may be made on any of them), ``pods`` 110,
  and whatever else ``node_template.capacity`` names (``ephemeral-storage``, GPUs);
- allocatable: the capacity, with ``node_template.allocatable`` over it;
- the conditions of a ready node, as the autoscaler's own providers build their templates.
"""

from __future__ import annotations

import re
import time

from ..config import Config
from ..nodetemplate import DEFAULT_PODS, NodeTemplateSection, quantity_value
from . import kubenode_pb2 as kube

OS_LABEL = "kubernetes.io/os"
ARCH_LABEL = "kubernetes.io/arch"
HOSTNAME_LABEL = "kubernetes.io/hostname"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
#: what a node of a readied machine reports (the autoscaler's providers build the same set)
_READY_CONDITIONS = (("Ready", "True"), ("NetworkUnavailable", "False"), ("DiskPressure", "False"),
                     ("MemoryPressure", "False"))


class TemplateUnknown(Exception):
    """The config does not say enough to describe the group's node (its message says what to set)."""


def template_name(app: str, role: str) -> str:
    """A node name (a DNS subdomain) for the template; the autoscaler renames its copies anyway."""
    return re.sub(r"[^a-z0-9-]+", "-", f"template-node-for-{app}-{role}".lower()).strip("-")[:253]


def template_node(config: Config, app: str, role: str, *, now: float | None = None) -> kube.Node:
    """The node the group ``app/role`` adds.

    :raises TemplateUnknown: neither the role's node_template nor every placement's profile
        gives the cpu and memory of its machines."""
    placements = config.placements[(app, role)]
    section = config.applications[app].roles[role].node_template or NodeTemplateSection()
    shapes = [placement.profile.node_shape() for placement in placements]
    key = f"applications.{app}.roles.{role}.node_template"

    capacity: dict[str, str] = {}
    cpus = [s.cpus for s in shapes]
    memory = [s.memory_mb for s in shapes]
    if "cpu" not in section.capacity:
        if not cpus or any(c is None for c in cpus):
            raise TemplateUnknown(f"node group {app}/{role}: no CPU count for its machines; set {key}.capacity.cpu "
                                  "(or the CPUs in every placement's profile)")
        capacity["cpu"] = str(min(c for c in cpus if c is not None))
    if "memory" not in section.capacity:
        if not memory or any(m is None for m in memory):
            raise TemplateUnknown(f"node group {app}/{role}: no memory size for its machines; set "
                                  f"{key}.capacity.memory (or the memory in every placement's profile)")
        capacity["memory"] = f"{min(m for m in memory if m is not None)}Mi"
    capacity["pods"] = DEFAULT_PODS
    capacity.update({name: str(amount) for name, amount in section.capacity.items()})
    allocatable = {**capacity, **{name: str(amount) for name, amount in section.allocatable.items()}}
    for resource, amount in allocatable.items():
        if quantity_value(amount) > quantity_value(capacity.get(resource, amount)):
            raise TemplateUnknown(f"node group {app}/{role}: {key}.allocatable.{resource} ({amount}) is more than "
                                  f"the capacity its machines have ({capacity[resource]})")

    name = template_name(app, role)
    labels = {OS_LABEL: "linux", ARCH_LABEL: "amd64", HOSTNAME_LABEL: name}
    types = {s.instance_type for s in shapes}
    if len(types) == 1 and None not in types:
        labels[INSTANCE_TYPE_LABEL] = str(next(iter(types)))
    labels.update(section.labels)

    moment = int(now if now is not None else time.time()) - 60
    node = kube.Node()
    node.metadata.name = name
    node.metadata.labels.update(labels)
    for taint in section.taints:
        node.spec.taints.add(key=taint.key, value=taint.value, effect=taint.effect)
    for resource, amount in capacity.items():
        node.status.capacity[resource].string = amount
    for resource, amount in allocatable.items():
        node.status.allocatable[resource].string = amount
    for kind, status in _READY_CONDITIONS:
        condition = node.status.conditions.add(type=kind, status=status)
        condition.lastHeartbeatTime.seconds = moment
        condition.lastTransitionTime.seconds = moment
    node.status.nodeInfo.operatingSystem = labels[OS_LABEL]
    node.status.nodeInfo.architecture = labels[ARCH_LABEL]
    return node
