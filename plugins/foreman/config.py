"""The Foreman registrar's config models (``[registrars.NAME]`` with ``type = "foreman"``, and
``[tags.TAG.NAME]`` tables). This module does not import apypie or requests: the type is
registered, and a config validated, without them; :mod:`.registrar` imports them when a config
uses the type."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from governord.config import ReadableFile, SecretRef, ServiceURL
from governord.registrars import RegistrarConfig
from governord.registrars import TagMapping as BaseTagMapping

ParamValue = str | int | float | bool


class ForemanConfig(RegistrarConfig):
    """A ``[registrars.NAME]`` section of type ``foreman``."""


    #: Foreman's base URL, e.g. ``https://foreman.example.com``
    url: ServiceURL
    #: API user
    username: str
    #: its password, as a secret reference
    password: SecretRef
    #: verify Foreman's TLS certificate
    verify_tls: bool = True
    #: CA bundle to verify it with (default: the system's)
    ca_file: ReadableFile | None = None
    #: organization hosts are created in, by name
    organization: str
    #: location hosts are created in, by title
    location: str
    #: Puppet environment of new hosts (used when foreman_puppet is installed)
    puppet_environment: str = "production"
    #: tries of one safe-to-repeat request (GET, HEAD, OPTIONS) that failed in transit: no
    #: connection, connection cut, no answer within ``call_timeout``, or 502/503/504; 1: no
    #: call-level retry. Creates, updates and deletes are never repeated at this level.
    call_tries: int = Field(default=3, ge=1, le=10)
    #: backoff factor between those tries: the n-th retry waits ``call_backoff * 2**(n-1)``
    #: seconds (the first one none), as urllib3 counts it
    call_backoff: float = Field(default=0.5, ge=0, le=10)
    #: the Puppet class parameter, ``CLASS::PARAMETER`` (``openshift::node::provider_id``), that
    #: a Cluster Autoscaler node group's host gets its providerID in: a smart class parameter
    #: override matching the host (``fqdn=HOST``), which Foreman's ENC hands Puppet as the
    #: class's parameter. The class must be one of the host's (by its tags or hostgroup), the
    #: parameter a string imported from the Puppet environment with ``fqdn`` in its order.
    #: Empty: the providerID reaches Puppet as the host parameter ``governord_provider_id`` only.
    provider_id_parameter: str | None = None

    @field_validator("provider_id_parameter")
    @classmethod
    def _class_parameter(cls, value: str | None) -> str | None:
        if value is not None and not _CLASS_PARAMETER.fullmatch(value):
            raise ValueError(f"not CLASS::PARAMETER, a Puppet class and one of its parameters "
                             f"(openshift::node::provider_id): {value!r}")
        return value

    def provider_id_target(self) -> tuple[str, str] | None:
        """(Puppet class, parameter) of ``provider_id_parameter``, or None."""
        if self.provider_id_parameter is None:
            return None
        klass, _, parameter = self.provider_id_parameter.rpartition("::")
        return klass, parameter


#: a Puppet class name (segments of lower-case letters, digits and _, the first a letter), then
#: "::" and a parameter name (a lower-case letter or _, then letters, digits and _)
_CLASS_PARAMETER = re.compile(r"[a-z][a-z0-9_]*(::[a-z][a-z0-9_]*)*::[a-z_][a-z0-9_]*")


class ForemanTagMapping(BaseTagMapping):
    """What one tag means in Foreman."""

    #: hostgroup by title (``parent/child``); the first tag that names one wins
    hostgroup: str | None = None
    #: Puppet classes by name; the union over all tags
    puppet_classes: list[str] = Field(default_factory=list)
    #: host parameters; on a clash the earlier tag wins
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
