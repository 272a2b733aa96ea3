"""The Puppet CA registrar's config models (``[registrars.NAME]`` with ``type = "puppetca"``;
no ``[tags.TAG.NAME]`` keys). This module does not import requests or cryptography: the type is
registered, and a config validated, without them; :mod:`.registrar` imports them when a config
uses the type."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from governord.config import ReadableFile, ServiceURL
from governord.registrars import RegistrarConfig
from governord.registrars import TagMapping as BaseTagMapping

#: Puppet's arc for site-specific certificate extensions (ppPrivCertExt): the CA signs requests
#: for extensions in it, and Puppet shows them as trusted facts.
PRIVATE_ARC = "1.3.6.1.4.1.34380.1.2"


class PuppetCAConfig(RegistrarConfig):
    """A ``[registrars.NAME]`` section with ``type = "puppetca"``."""

    #: puppetserver's CA base URL
    url: ServiceURL = "https://puppet:8140"
    #: CA bundle to verify the server with (default: the system's)
    ca_file: ReadableFile | None = None
    #: client certificate (PEM) with the ``pp_cli_auth`` extension
    client_cert: ReadableFile
    #: its private key (PEM); only the path is configured, the key stays in its file
    client_key: ReadableFile = Field(repr=False)
    #: verify the server's TLS certificate
    verify_tls: bool = True
    #: server name agents are told to use (cloud-config); default: the host of ``url``
    puppet_server: str | None = None
    #: seconds an autosign token stays valid after it was made
    token_ttl: float = Field(default=7200.0, gt=0)
    #: certificate extension (in Puppet's private arc 1.3.6.1.4.1.34380.1.2) the agent's CSR asks
    #: for, carrying governord's ownership marker; the sweep finds certificates by it
    marker_oid: str = f"{PRIVATE_ARC}.1"

    @field_validator("url")
    @classmethod
    def _https_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"not an https URL of a puppetserver: {value!r}")
        return value.rstrip("/")

    @field_validator("marker_oid")
    @classmethod
    def _private_oid(cls, value: str) -> str:
        if not re.fullmatch(re.escape(PRIVATE_ARC) + r"(\.\d+)+", value):
            raise ValueError(f"not an OID in Puppet's private arc {PRIVATE_ARC}: {value!r}")
        return value

    @model_validator(mode="after")
    def _server_name(self) -> PuppetCAConfig:
        if self.puppet_server is None:
            object.__setattr__(self, "puppet_server", urlsplit(self.url).hostname)
        return self


class PuppetCATagMapping(BaseTagMapping):
    """Tags mean nothing to the Puppet CA: no keys."""
