"""The OpenStack provider's config models (``[providers.NAME]`` with ``type = "openstack"``, and
a role's ``profile``). This module does not import openstacksdk: the type is registered, and a
config validated, without it; :mod:`.provider` imports it when a config uses the type."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from governord.config import ReadableFile, SecretRef, ServiceURL
from governord.providers import NodeShape, ProviderConfig, ProviderProfile

_MICROVERSION = re.compile(r"^2\.(\d+)$|^latest$")


class OpenStackConfig(ProviderConfig):
    """A ``[providers.NAME]`` section of ``type = "openstack"``."""

    #: keystone's URL, ``https://keystone.example.com:5000/v3``
    auth_url: ServiceURL = Field(min_length=1)
    username: str = Field(min_length=1)
    #: a secret reference, ``{ env = "NAME" }`` or ``{ file = "/path" }``
    password: SecretRef
    #: the project servers are created in
    project_name: str = Field(min_length=1)
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"
    #: region of the compute endpoint; empty: the catalogue's only one
    region_name: str | None = None
    #: check the TLS certificates of keystone and nova (against ``ca_file`` or the system's CAs)
    verify_tls: bool = True
    #: PEM file of the CA that signed the cloud's certificates
    ca_file: ReadableFile | None = None
    #: compute microversion to use (``2.79``); empty: the newest both sides speak
    compute_api_version: str | None = None

    @field_validator("auth_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/]+", value):
            raise ValueError(f"not a keystone URL like https://keystone.example.com:5000/v3: {value!r}")
        return value

    @field_validator("compute_api_version")
    @classmethod
    def _microversion(cls, value: str | None) -> str | None:
        if value is not None and not _MICROVERSION.match(value):
            raise ValueError(f"not a compute microversion like 2.79: {value!r}")
        return value


class OpenStackProfile(ProviderProfile):
    """A role's ``profile`` for an OpenStack provider."""

    #: flavor name (or id)
    flavor: str = Field(min_length=1)
    #: image id, or a unique image name
    image: str = Field(min_length=1)
    #: network id or name for the server's port; empty: nova's automatic allocation
    network: str | None = None
    #: nova key pair injected into the server
    key_name: str | None = None
    #: user data (cloud-init); the host's own user data, if the engine gives one, wins
    user_data: str | None = None
    #: security group names
    security_groups: list[str] = Field(default_factory=list)
    availability_zone: str | None = None
    #: extra server metadata (governord's marker is added and cannot be overridden)
    metadata: dict[str, str] = Field(default_factory=dict)

    def node_shape(self) -> NodeShape:
        # the flavor's vCPUs and RAM are nova's to say, not the config's
        return NodeShape(instance_type=self.flavor)
