"""The PuppetDB registrar's config models (``[registrars.NAME]`` with ``type = "puppetdb"``; no
``[tags.TAG.NAME]`` keys). This module does not import pypuppetdb or requests: the type is
registered, and a config validated, without them; :mod:`.registrar` imports them when a config
uses the type."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from governord.config import ReadableFile, ServiceURL
from governord.errors import FieldError
from governord.registrars import RegistrarConfig
from governord.registrars import TagMapping as BaseTagMapping


class PuppetDBConfig(RegistrarConfig):
    """A ``[registrars.NAME]`` section with ``type = "puppetdb"``."""

    #: PuppetDB's base URL: ``https://HOST:8081`` (client certificate) or ``http://HOST:8080``
    url: ServiceURL = "https://puppetdb:8081"
    #: CA bundle to verify PuppetDB with (default: the system's)
    ca_file: ReadableFile | None = None
    #: client certificate (PEM) for https; PuppetDB's certificate-allowlist must admit it
    client_cert: ReadableFile | None = None
    #: its private key (PEM); only the path is configured, the key stays in its file
    client_key: ReadableFile | None = Field(default=None, repr=False)
    #: verify PuppetDB's TLS certificate
    verify_tls: bool = True
    #: seconds one HTTP request to PuppetDB may take
    timeout: float = Field(default=10.0, gt=0)
    #: seconds a host may take to produce a successful report with its classes
    ready_timeout: float = Field(default=1800.0, gt=0)
    #: registrar whose classification lists the host's ``puppet_classes`` (it must be configured,
    #: and be of a type whose tags name Puppet classes); "": no class check
    classes_from: str | None = "foreman"
    #: seconds the agent's clock may lag governord's when judging whether a report is new
    clock_skew: float = Field(default=60.0, ge=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL of PuppetDB: {value!r}")
        parts.port  # noqa: B018  -- raises ValueError on a bad port
        return value.rstrip("/")

    @model_validator(mode="after")
    def _cert_pair(self) -> PuppetDBConfig:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        return self

    def check_peers(self, registrars: Mapping[str, RegistrarConfig], mappings: Mapping[str, type[BaseTagMapping]]) -> None:
        """``classes_from`` names a configured registrar whose tags can name Puppet classes:
        otherwise no host would ever be asked for a class, and the check would be off unseen."""
        source = self.classes_from
        if not source:
            return
        if source not in registrars:
            configured = ", ".join(sorted(registrars))
            raise FieldError("classes_from", f"no registrar named {source!r} is configured (configured: {configured}); "
                             "name the registrar whose classification lists the hosts' puppet_classes, "
                             'or set classes_from = "" for no class check')
        if "puppet_classes" not in mappings[source].model_fields:
            raise FieldError("classes_from", f"registrar {source!r} (type {registrars[source].type!r}) lists no "
                             "puppet_classes in its classification; name one that does (foreman), "
                             'or set classes_from = "" for no class check')


class PuppetDBTagMapping(BaseTagMapping):
    """Tags mean nothing to PuppetDB directly: no keys."""
