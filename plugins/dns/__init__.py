"""DNS registrar: A, AAAA and PTR records for every host, by RFC 2136 dynamic updates signed with TSIG.

Needs the ``dns`` extra (``pip install governord[dns]``, which brings dnspython, imported only
when a config uses the type). Works with any server that takes signed updates for the zones and
signed zone transfers of them (BIND 9, PowerDNS, Knot, Windows DNS with a TSIG key...).
Configured by a ``[registrars.NAME]`` section with ``type = "dns"``; several such sections (two
servers, or two views of one server told apart by their keys) work side by side::

    [registrars.dns]
    type = "dns"
    server = "192.0.2.53"                 # the primary that takes updates (address or name)
    # port = 53
    zone = "lab.example"                  # the forward zone; every host's FQDN must be in it
    reverse_zones = ["100.51.198.in-addr.arpa", "8.b.d.0.1.0.0.2.ip6.arpa"]
    key_name = "governord"                # the TSIG key the server allows to update those zones
    key_secret = { file = "/etc/governord/dns-key" }   # its base64 secret, by reference
    # key_algorithm = "hmac-sha256"
    # ttl = 300
    # overwrite = false                   # true: take over a name or address another record holds
    # timeout = 5                         # seconds one DNS exchange may take

What it makes, for each host: an A (IPv4) or AAAA (IPv6) record per address at the host's FQDN,
a PTR record at each address's reverse name in the matching ``reverse_zones`` zone (an address
outside all of them is a permanent error), and a TXT record ``governord:host-id=<uuid>`` beside
each of those names: the ownership marker by which the registrar finds its records again (zone
transfer) and removes only its own. There are no ``[tags.TAG.NAME]`` keys.

A host whose address is leased from an address pool gets its records before the machine exists
(``prepare``); every host gets them, for every address, when it is registered. The records are
removed after the machine is gone (the host's ``cleaning`` step), so its name
resolves for as long as the machine can answer to it, and the name and address are free for
another host only once it is gone. Each removal is verified by querying the server.
"""

from __future__ import annotations

from governord import hookimpl
from governord.registrars import LazyRegistrar, RegistrarRegistry


@hookimpl
def governord_register_registrars(registry: RegistrarRegistry) -> None:
    """Make the ``dns`` registrar type known (dnspython is imported when a config uses it)."""
    from .config import DnsConfig, DnsTagMapping

    registry.add(LazyRegistrar("dns", f"{__name__}.registrar:DnsRegistrar", Config=DnsConfig,
                               TagMapping=DnsTagMapping, requires=["dns"]))
