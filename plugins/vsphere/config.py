"""The vSphere provider's config models (``[providers.NAME]`` with ``type = "vsphere"``, and a
role's ``profile``). This module does not import pyvmomi: the type is registered, and a config
validated, without it; :mod:`.provider` imports it when a config uses the type."""

from __future__ import annotations

import urllib.parse

from pydantic import Field, field_validator

from governord.config import ReadableFile, SecretRef, ServiceURL
from governord.providers import NodeShape, ProviderConfig, ProviderProfile


class VSphereConfig(ProviderConfig):
    """A ``[providers.NAME]`` section of ``type = "vsphere"``."""

    #: the SDK endpoint, ``https://vcenter.example.com/sdk``
    url: ServiceURL
    username: str = Field(min_length=1)
    #: a secret reference, ``{ env = "NAME" }`` or ``{ file = "/path" }``
    password: SecretRef
    #: check vCenter's TLS certificate (against ``ca_file`` or the system's CAs)
    verify_tls: bool = True
    #: PEM file of the CA that signed vCenter's certificate (e.g. the VMCA root)
    ca_file: ReadableFile | None = None
    #: datacenter name, or its inventory path when it sits in a folder (``F0/DC0``)
    datacenter: str = Field(min_length=1)
    #: cluster the VMs run in
    cluster: str = Field(min_length=1)
    #: resource pool path below the cluster's root pool; empty: the root pool
    resource_pool: str | None = None
    #: VM folder path below the datacenter's VM folder; empty: the VM folder itself
    folder: str | None = None
    #: datastore for the clones; empty: the template's
    datastore: str | None = None
    #: tries of one read-only SOAP call (a property read, a PropertyCollector retrieval, a
    #: search-index find) that failed in transit: no connection, connection cut, no answer within
    #: ``call_timeout``, or 502/503/504; 1: no call-level retry. Calls that create or change
    #: something (clone, reconfigure, power on, set a field, start a task) are never repeated here.
    call_tries: int = Field(default=3, ge=1, le=10)
    #: backoff factor between those tries: none before the first retry, then
    #: ``call_backoff * 2**(n-1)`` seconds before the n-th
    call_backoff: float = Field(default=0.5, ge=0, le=10)

    @field_validator("url")
    @classmethod
    def _sdk_url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in {"https", "http"} or not parts.hostname:
            raise ValueError(f"not an SDK URL like https://vcenter.example.com/sdk: {value!r}")
        return value


class VSphereProfile(ProviderProfile):
    """A role's ``profile`` for a vSphere provider."""

    #: name of the VM template (or VM) to clone, searched in the whole datacenter
    template: str = Field(min_length=1)
    #: virtual CPUs; empty: as the template
    cpus: int | None = Field(default=None, ge=1, le=768)
    #: memory in MiB; empty: as the template
    memory_mb: int | None = Field(default=None, ge=4)
    #: port group (standard or distributed) for the first network adapter; empty: as the template
    network: str | None = None
    #: the VM's notes in the vSphere client
    annotation: str | None = None

    def node_shape(self) -> NodeShape:
        return NodeShape(cpus=self.cpus, memory_mb=self.memory_mb)
