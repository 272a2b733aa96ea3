"""The EC2 provider's config models (``[providers.NAME]`` with ``type = "ec2"``, and a role's
``profile``). This module does not import boto3: the type is registered, and a config
validated, without it; :mod:`.provider` imports it when a config uses the type."""

from __future__ import annotations

import urllib.parse

from pydantic import Field, field_validator, model_validator

from governord.config import ReadableFile, SecretRef, ServiceURL
from governord.errors import FieldError
from governord.providers import NodeShape, ProviderConfig, ProviderProfile


class EC2Config(ProviderConfig):
    """A ``[providers.NAME]`` section of ``type = "ec2"``."""

    #: the AWS region the instances run in (``eu-west-1``)
    region: str = Field(min_length=1)
    #: EC2 endpoint; empty: AWS's own for ``region`` (set it for a private endpoint or a simulator)
    endpoint_url: ServiceURL | None = None
    #: access key id; empty (with ``secret_access_key`` empty): boto3's standard credential chain
    access_key_id: str | None = Field(default=None, min_length=16)
    #: the secret access key, a secret reference ``{ env = "NAME" }`` or ``{ file = "/path" }``
    secret_access_key: SecretRef | None = None
    #: check the endpoint's TLS certificate (against ``ca_file`` or the system's CAs)
    verify_tls: bool = True
    #: PEM file of the CA that signed a private endpoint's certificate
    ca_file: ReadableFile | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in {"https", "http"} or not parts.hostname:
            raise ValueError(f"not an endpoint URL like https://ec2.eu-west-1.amazonaws.com: {value!r}")
        return value

    @model_validator(mode="after")
    def _both_keys_or_neither(self) -> EC2Config:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            missing = "secret_access_key" if self.secret_access_key is None else "access_key_id"
            raise FieldError(
                missing, "set access_key_id and secret_access_key together, or neither (boto3's credential chain)"
            )
        return self


class EC2Profile(ProviderProfile):
    """A role's ``profile`` for an EC2 provider."""

    #: the AMI to launch (``ami-...``), which must exist in the provider's region
    image_id: str = Field(min_length=1)
    #: instance type (``m6i.large``)
    instance_type: str = Field(min_length=1)
    #: subnet to launch in; empty: the default VPC's subnet EC2 picks (no static address then)
    subnet_id: str | None = None
    #: security groups of the primary network interface; empty: the VPC's default group
    security_group_ids: list[str] = Field(default_factory=list)
    #: EC2 key pair for the default user's SSH key
    key_name: str | None = None
    #: user data (cloud-init) when the host's own request has none
    user_data: str | None = None
    #: extra instance and volume tags (``Name`` and ``governord:*`` are governord's own)
    tags: dict[str, str] = Field(default_factory=dict)
    #: instance profile, by name or ARN, whose role the instance gets
    iam_instance_profile: str | None = None

    def node_shape(self) -> NodeShape:
        # the type's CPUs and memory are AWS's to say (DescribeInstanceTypes), not the config's
        return NodeShape(instance_type=self.instance_type)

    @field_validator("tags")
    @classmethod
    def _own_tags(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = [key for key in value if key == "Name" or key.startswith(("governord:", "aws:"))]
        if reserved:
            raise ValueError(f"tags {reserved} are reserved (Name, governord:*, aws:*)")
        return value
