"""The Satellite registrar's config models (``[registrars.NAME]`` with ``type = "satellite"``, and
``[tags.TAG.NAME]`` tables). The registrar itself (:mod:`.registrar`, with xmlrpc.client) is
imported only when a config uses the type."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from governord.config import ReadableFile, SecretRef, ServiceURL
from governord.registrars import RegistrarConfig
from governord.registrars import TagMapping as BaseTagMapping


class SatelliteConfig(RegistrarConfig):
    """A ``[registrars.NAME]`` section with ``type = "satellite"``."""


    #: the XML-RPC endpoint, ``https://HOST/rpc/api``
    url: ServiceURL
    #: API user (needs the system group admin role, or org admin)
    username: str
    #: its password, by reference: ``{ env = "NAME" }`` or ``{ file = "/path" }``
    password: SecretRef
    #: verify the server's TLS certificate (https only)
    verify_tls: bool = True
    #: CA bundle to verify it with (default: the system's)
    ca_file: ReadableFile | None = None
    #: tries of one read-only call (``system.getId``, ``system.getDetails``, ...) that failed in
    #: transit: no connection, connection cut, no answer within ``call_timeout``, or 502/503/504;
    #: 1: no call-level retry. Calls that create or change something are never repeated here.
    call_tries: int = Field(default=3, ge=1, le=10)
    #: backoff factor between those tries: none before the first retry, then
    #: ``call_backoff * 2**(n-1)`` seconds before the n-th
    call_backoff: float = Field(default=0.5, ge=0, le=10)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+/\S*$", value):
            raise ValueError(f"not an http(s) URL of the API endpoint (…/rpc/api): {value!r}")
        return value


class SatelliteTagMapping(BaseTagMapping):
    """What a tag means to Satellite (``[tags.TAG.NAME]``)."""

    #: system group the host joins (groups of all its tags are joined)
    system_group: str | None = None
    #: activation key the machine registers with (the first tag that names one wins)
    activation_key: str | None = None
