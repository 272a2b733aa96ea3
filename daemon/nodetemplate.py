"""A role's Kubernetes node template (``[applications.APP.ROLE.node_template]``): the labels,
taints and resources a node of the role has once it has joined its cluster, which the Cluster
Autoscaler simulates a scale-up with when the node group has no node to copy
(``NodeGroupTemplateNodeInfo``). Each value is checked here as Kubernetes checks it, so that a
template governord answers with is one the autoscaler can decode (a quantity it cannot parse
fails the whole node)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .errors import FieldError
from .providers import StrictModel

#: a label value, and the name part of a qualified name (a label key, a taint key, a resource)
_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
#: a DNS subdomain: the optional prefix of a qualified name
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
#: resource.Quantity's text form (not negative): a number, then a binary or decimal suffix or an exponent
_QUANTITY = re.compile(r"\+?(?P<number>\d+(\.\d*)?|\.\d+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?")
_SCALE = {"": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal("1e3"),
          "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"), "P": Decimal("1e15"), "E": Decimal("1e18"),
          **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))}}
#: kubelet's default --max-pods: a node's pod capacity when the template does not give one
DEFAULT_PODS = "110"


def qualified_name_problem(value: str) -> str | None:
    """Why ``value`` is not a Kubernetes qualified name (``[PREFIX/]NAME``), or None."""
    prefix, slash, name = value.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _SUBDOMAIN.fullmatch(prefix)):
        return f"{value!r}: the part before '/' must be a DNS subdomain (lower case, at most 253 characters)"
    if not name or len(name) > 63 or not _NAME.fullmatch(name):
        return (f"{value!r}: the name must be 1 to 63 letters, digits, '-', '_' or '.', beginning and ending "
                "with a letter or digit")
    return None


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a Kubernetes label value (empty, or a name of at most 63), or None."""
    if value and (len(value) > 63 or not _NAME.fullmatch(value)):
        return (f"{value!r}: a label value is empty or 1 to 63 letters, digits, '-', '_' or '.', beginning and "
                "ending with a letter or digit")
    return None


def quantity_value(text: str) -> Decimal:
    """The amount a Kubernetes quantity (``4``, ``500m``, ``16Gi``, ``1e3``) stands for.

    :raises ValueError: not a quantity Kubernetes parses, or a negative one."""
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (a number with an optional suffix: 4, 500m, 16Gi, 40G)")
    suffix = match["suffix"] or ""
    try:
        number = Decimal(match["number"])
        if suffix[:1] in ("e", "E") and len(suffix) > 1:
            return number * Decimal(10) ** int(suffix[1:])
    except (InvalidOperation, ValueError):
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from None
    return number * _SCALE[suffix]


def _resources(value: dict[str, str | int]) -> dict[str, str]:
    checked: dict[str, str] = {}
    for name, amount in value.items():
        problem = qualified_name_problem(name)
        if problem is not None:
            raise FieldError(name, f"not a resource name: {problem}")
        if isinstance(amount, bool) or (isinstance(amount, int) and amount < 0):
            raise FieldError(name, f"must be a quantity such as 4, 16Gi or 500m, not {amount!r}")
        text = str(amount)
        try:
            quantity_value(text)
        except ValueError as exc:
            raise FieldError(name, str(exc)) from None
        checked[name] = text
    return checked


class TaintSection(StrictModel):
    """One taint every node of the role carries."""

    key: str
    value: str = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        problem = qualified_name_problem(value)
        if problem is not None:
            raise ValueError(f"not a taint key: {problem}")
        return value

    @field_validator("value")
    @classmethod
    def _value(cls, value: str) -> str:
        problem = label_value_problem(value)
        if problem is not None:
            raise ValueError(f"not a taint value: {problem}")
        return value


class NodeTemplateSection(StrictModel):
    """What a node of the role looks like in Kubernetes once it has joined: for the Cluster
    Autoscaler's scale-up from zero. Every value must be what the node really gets (from its
    kubelet's configuration, which the role's Puppet classes write): the autoscaler adds a node
    only if the pending pod fits this template."""

    #: node labels (``kubernetes.io/os`` and ``kubernetes.io/arch`` default to linux and amd64,
    #: ``node.kubernetes.io/instance-type`` to the profile's instance type or flavor)
    labels: dict[str, str] = Field(default_factory=dict)
    #: node taints
    taints: list[TaintSection] = Field(default_factory=list)
    #: resources by name (``cpu``, ``memory``, ``pods``, ``ephemeral-storage``, ``nvidia.com/gpu``)
    #: as Kubernetes quantities; cpu and memory default to the profile's (the smallest over the
    #: role's placements), pods to 110
    capacity: dict[str, str | int] = Field(default_factory=dict)
    #: what of the capacity pods may use (the kubelet's reservations taken off); by default the capacity
    allocatable: dict[str, str | int] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            problem = qualified_name_problem(key) or label_value_problem(text)
            if problem is not None:
                raise FieldError(key, f"not a node label: {problem}")
        return value

    @field_validator("capacity", "allocatable")
    @classmethod
    def _quantities(cls, value: dict[str, str | int]) -> dict[str, str]:
        return _resources(value)

    @model_validator(mode="after")
    def _consistent(self) -> NodeTemplateSection:
        seen: set[tuple[str, str]] = set()
        for index, taint in enumerate(self.taints):
            if (taint.key, taint.effect) in seen:
                raise FieldError(f"taints.{index}", f"a second taint {taint.key} with effect {taint.effect} "
                                 "(Kubernetes allows one per key and effect)")
            seen.add((taint.key, taint.effect))
        for name, amount in self.allocatable.items():
            if name in self.capacity and quantity_value(str(amount)) > quantity_value(str(self.capacity[name])):
                raise FieldError(f"allocatable.{name}", f"{amount} is more than the capacity {self.capacity[name]}")
        return self
