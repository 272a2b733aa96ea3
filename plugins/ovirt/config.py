"""The oVirt provider's config models (``[providers.NAME]`` with ``type = "ovirt"``, and a role's
``profile``). This module does not import ovirtsdk4 or pycurl: the type is registered, and a
config validated, without them; :mod:`.provider` imports them when a config uses the type."""

from __future__ import annotations

import urllib.parse

from pydantic import Field, field_validator

from governord.config import ReadableFile, SecretRef, ServiceURL
from governord.providers import NodeShape, ProviderConfig, ProviderProfile


class OVirtConfig(ProviderConfig):
    """A ``[providers.NAME]`` section of ``type = "ovirt"``."""

    #: the engine's API endpoint, ``https://engine.example.com/ovirt-engine/api``
    url: ServiceURL
    #: the API user with its profile, ``governord@internal``
    username: str = Field(min_length=1)
    #: a secret reference, ``{ env = "NAME" }`` or ``{ file = "/path" }``
    password: SecretRef
    #: check the engine's TLS certificate (against ``ca_file`` or the system's CAs)
    verify_tls: bool = True
    #: PEM file of the engine's CA (``https://engine/ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA``)
    ca_file: ReadableFile | None = None
    #: cluster the VMs are made in (by name)
    cluster: str = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in {"https", "http"} or not parts.hostname:
            raise ValueError(f"not an API URL like https://engine.example.com/ovirt-engine/api: {value!r}")
        return value.rstrip("/")


class OVirtProfile(ProviderProfile):
    """A role's ``profile`` for an oVirt provider."""

    #: name of the template the VMs are made from (resolved by the engine in the cluster's data center)
    template: str = Field(min_length=1)
    #: memory in MiB; empty: as the template
    memory_mb: int | None = Field(default=None, ge=16)
    #: virtual CPUs (sockets of one core); empty: as the template
    cpus: int | None = Field(default=None, ge=1, le=710)
    #: start the VM with a cloud-init run-once initialization (host name, static address, user data)
    cloud_init: bool = True
    #: the guest's name of the NIC the static address goes to
    nic_name: str = Field(default="eth0", min_length=1)

    def node_shape(self) -> NodeShape:
        return NodeShape(cpus=self.cpus, memory_mb=self.memory_mb)
