"""The DNS registrar's config models (``[registrars.NAME]`` with ``type = "dns"``; no
``[tags.TAG.NAME]`` keys). This module does not import dnspython: the type is registered, and a
config validated, without it; :mod:`.registrar` imports it when a config uses the type."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Literal

from pydantic import Field, field_validator

from governord.config import SecretRef
from governord.registrars import RegistrarConfig
from governord.registrars import TagMapping as BaseTagMapping

#: TSIG algorithms (RFC 8945); hmac-sha256 is what ``tsig-keygen`` makes by default
Algorithm = Literal["hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1", "hmac-md5"]

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_REVERSE_SUFFIXES = ("in-addr.arpa", "ip6.arpa")


def domain_name(value: str) -> str:
    """``value`` as a lower-case domain name without the final dot, if it is one (letters,
    digits, hyphens and underscores, labels of 1 to 63, 253 in all)."""
    name = value.strip().lower().rstrip(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"not a domain name: {value!r}")
    return name


def _reverse_zone(value: str) -> str:
    """A reverse zone: whole octets under in-addr.arpa, or nibbles under ip6.arpa."""
    name = domain_name(value)
    if name.endswith(".in-addr.arpa"):
        octets = name[: -len(".in-addr.arpa")].split(".")
        if len(octets) > 4 or not all(o.isdigit() and int(o) <= 255 and str(int(o)) == o for o in octets):
            raise ValueError(f"not a reverse zone of whole IPv4 octets: {value!r}")
    elif name.endswith(".ip6.arpa"):
        nibbles = name[: -len(".ip6.arpa")].split(".")
        if len(nibbles) > 32 or not all(re.fullmatch(r"[0-9a-f]", n) for n in nibbles):
            raise ValueError(f"not a reverse zone of IPv6 nibbles: {value!r}")
    else:
        raise ValueError(f"not a reverse zone (under {' or '.join(_REVERSE_SUFFIXES)}): {value!r}")
    return name


class DnsConfig(RegistrarConfig):
    """A ``[registrars.NAME]`` section with ``type = "dns"``."""

    #: the primary server that takes the updates: an IP address or a host name
    server: str
    #: its port (UDP is not used: every exchange is over TCP)
    port: int = Field(default=53, ge=1, le=65535)
    #: the forward zone (``lab.example``); every host's FQDN must be in it
    zone: str
    #: reverse zones the hosts' addresses are in (``100.51.198.in-addr.arpa``); each address gets
    #: a PTR in the longest one it is in, and an address in none of them is a permanent error;
    #: empty: no PTR records at all
    reverse_zones: list[str] = Field(default_factory=list)
    #: the TSIG key's name, as the server knows it
    key_name: str
    #: its base64 secret, as a secret reference ({ env = "NAME" } or { file = "/path" })
    key_secret: SecretRef = Field(repr=False)
    #: its algorithm
    key_algorithm: Algorithm = "hmac-sha256"
    #: TTL of the records made, seconds
    ttl: int = Field(default=300, ge=0, le=2_147_483_647)
    #: a name holding other addresses, or an address whose PTR names another host, is a
    #: permanent error naming both; true: replace those records instead
    overwrite: bool = False
    #: seconds one DNS exchange (one query, one update, one zone transfer) may take
    timeout: float = Field(default=5.0, gt=0)

    @field_validator("server")
    @classmethod
    def _server(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value.strip().strip("[]")))
        except ValueError:
            return domain_name(value)

    @field_validator("zone")
    @classmethod
    def _forward_zone(cls, value: str) -> str:
        zone = domain_name(value)
        if zone.endswith(_REVERSE_SUFFIXES):
            raise ValueError(f"{zone!r} is a reverse zone: name the forward zone the hosts' FQDNs are in")
        return zone

    @field_validator("key_name")
    @classmethod
    def _key_name(cls, value: str) -> str:
        return domain_name(value)

    @field_validator("reverse_zones")
    @classmethod
    def _reverse(cls, values: list[str]) -> list[str]:
        zones = [_reverse_zone(v) for v in values]
        if len(set(zones)) != len(zones):
            raise ValueError("a reverse zone is listed twice")
        return zones

    @field_validator("key_secret")
    @classmethod
    def _base64(cls, value: SecretRef) -> SecretRef:
        try:
            decoded = base64.b64decode(value.reveal().strip(), validate=True)
        except (binascii.Error, ValueError):
            # the secret itself is not repeated
            raise ValueError(f"the secret ({value.source}) is not base64, as tsig-keygen writes it") from None
        if not decoded:
            raise ValueError(f"the secret ({value.source}) is empty")
        return value


class DnsTagMapping(BaseTagMapping):
    """Tags mean nothing to DNS: no keys."""
