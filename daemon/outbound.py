"""Where governord may send an application's callbacks: the address policy, checked when a
request names a ``callback_url`` and again, on the addresses the host name resolves to, at every
delivery (:mod:`governord.engine.callbacks`).

A callback is a POST signed with the application's webhook secret, sent from inside the site: an
application that could point it anywhere could make governord talk to services only governord's
network can reach. So:

- https only, unless the application's rules say ``allow_http = true``;
- redirects are never followed (the notifier counts a 3xx as a failed attempt);
- every address the host name resolves to is checked, and the connection is made only to a
  checked address: the resolver the notifier's connector uses refuses the whole lookup if one
  address is denied, and the connector's socket factory checks the address of every socket it
  opens (so an IP literal, which aiohttp does not resolve, is checked too, and a DNS answer that
  changes between the check and the connect cannot get past it);
- denied, whatever the rules say (no ``allow_networks`` entry overrides these): cloud metadata
  addresses, governord's own listeners (its API port on any of this machine's addresses), the
  unspecified address (0.0.0.0 and :: reach this machine), multicast, link-local (169.254/16,
  fe80::/10: metadata services live there) and reserved addresses;
- denied unless an ``allow_networks`` entry holds the address: loopback (for the lab and
  single-host sites);
- denied unless ``allow_private = true`` or an ``allow_networks`` entry holds the address: every
  other address that is not globally reachable: RFC 1918, unique local fc00::/7, CGNAT
  100.64/10, documentation and benchmark ranges.

An IPv6 address that carries an IPv4 address (IPv4-mapped ::ffff:a.b.c.d, 6to4, Teredo, the
NAT64 prefix 64:ff9b::/96) is judged by the IPv4 address too.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: instance metadata services (credentials, user data): never a callback's destination
METADATA: frozenset[IPAddress] = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle ... (link-local anyway)
    "169.254.170.2",    # AWS ECS task metadata and credentials
    "fd00:ec2::254",    # AWS instance metadata over IPv6 (unique local: private)
    "fd20:ce::254",     # GCP metadata over IPv6
    "100.100.100.200",  # Alibaba Cloud (in CGNAT 100.64/10: private)
    "168.63.129.16",    # Azure WireServer (a global address)
    "192.0.0.192",      # Oracle Cloud Classic
))

#: the NAT64 well-known prefix (RFC 6052): 64:ff9b::a.b.c.d is a.b.c.d behind a translator
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def never_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is refused whatever the application's rules say, or None."""
    if ip in METADATA:
        return "a cloud metadata address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_loopback:  # ::1 is in IPv6's reserved ::/8: not "never", decided by the rules
        return None
    if ip.is_reserved:
        return "a reserved address"
    return None


def _judged(ip: IPAddress) -> Iterator[IPAddress]:
    """The addresses ``ip`` is judged by: an IPv4-mapped or NAT64 address by the IPv4 address
    it stands for (Python counts both prefixes as reserved); a 6to4 or Teredo address by itself
    and the IPv4 addresses it carries; any other by itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            yield ip.ipv4_mapped
            return
        if ip in _NAT64:
            yield ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            return
        if ip.sixtofour is not None:
            yield ip.sixtofour
        if ip.teredo is not None:
            yield from ip.teredo
    yield ip


def _is_local(ip: IPAddress) -> bool:
    """Whether ``ip`` is one of this machine's addresses (binding to it works: a syscall on a
    datagram socket, no traffic and no wait)."""
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:  # not ours (or no IPv6 here: then no IPv6 address is ours either)
        return False
    return True


@dataclass(frozen=True)
class Policy:
    """An application's callback rules, with governord's own listeners."""

    app: str
    allow_http: bool = False
    allow_private: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()
    #: TCP ports governord listens on (its application API): refused on every local address
    own_ports: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def of(cls, app: str, rules: Any, own_ports: Collection[int]) -> Policy:
        """From an application's ``[applications.APP.callbacks]`` (a config CallbackRules)."""
        return cls(app, rules.allow_http, rules.allow_private, tuple(rules.allow_networks), frozenset(own_ports))

    def address_refusal(self, address: str | IPAddress, port: int) -> str | None:
        """Why a callback may not be sent to ``address``:``port``, or None if it may."""
        ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
        for each in _judged(ip):
            if (reason := self._refusal(each, port)) is not None:
                shown = f"{each} (in {ip})" if each != ip else str(ip)
                return f"{shown} is {reason}"
        return None

    def _refusal(self, ip: IPAddress, port: int) -> str | None:
        if (reason := never_reason(ip)) is not None:
            return reason
        if port in self.own_ports and (ip.is_loopback or _is_local(ip)):
            return f"governord's own listener (port {port} on this machine)"
        if any(ip in network for network in self.allow_networks):
            return None
        if ip.is_loopback:
            return (f"a loopback address (application {self.app} may allow it with "
                    "[applications.APP.callbacks] allow_networks)")
        if not ip.is_global and not self.allow_private:
            return (f"a private address (application {self.app} may allow it with "
                    "[applications.APP.callbacks] allow_private or allow_networks)")
        return None

    def url_refusal(self, url: str) -> str | None:
        """Why the rules refuse ``url`` before any lookup: http where only https is allowed, an
        address literal that is denied, a numeric host that is no canonical IPv4 address (such
        as ``127.1`` or ``2130706433``, which resolvers read as addresses). None if a delivery
        may be tried (the resolved addresses are checked then). A URL that is no URL is not
        refused here: :func:`governord.engine.callbacks.unsendable` says why."""
        try:
            parsed = yarl.URL(url)
            host, port = parsed.host, parsed.port
        except (ValueError, TypeError):
            return None
        if parsed.scheme == "http" and not self.allow_http:
            return (f"plain http is not allowed for application {self.app}: use https "
                    "(or allow it with [applications.APP.callbacks] allow_http)")
        if not host or port is None:
            return None
        try:
            literal = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            if _numeric_ipv4(host):
                return f"{host} is not a canonical IPv4 address (write it as a.b.c.d)"
            return None
        return self.address_refusal(literal, port)


def _numeric_ipv4(host: str) -> bool:
    """Whether the C library reads ``host`` as an IPv4 address in a legacy form (``127.1``,
    ``0x7f.0.0.1``, ``2130706433``); only looked at when it is no canonical address."""
    try:
        socket.inet_aton(host)
    except (OSError, ValueError):
        return False
    return True


class AddressRefused(OSError):
    """A destination the policy refuses (an OSError, so aiohttp treats it as a connect failure)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)
        self.message = message


class Guard:
    """What one delivery attempt's connector checks: every resolved address before it is
    returned to the connector, and every socket's address before it is opened.
    :attr:`refused` keeps the first refusal, for the attempt's ``last_error``."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.refused: str | None = None

    def refuse(self, message: str) -> AddressRefused:
        if self.refused is None:
            self.refused = message
        return AddressRefused(message)

    def socket(self, addr_info: Any) -> socket.socket:
        """aiohttp's ``socket_factory``: a socket for ``addr_info`` if its address may be reached."""
        family, type_, proto, _, sockaddr = addr_info
        address, port = sockaddr[0], sockaddr[1]
        if (reason := self.policy.address_refusal(address, port)) is not None:
            raise self.refuse(f"refused to connect to {address} port {port}: {reason}")
        return socket.socket(family=family, type=type_, proto=proto)

    def connector(self, **kwargs: Any) -> aiohttp.TCPConnector:
        """A connector that reaches only what the policy allows: no DNS cache (each lookup is
        checked), no connection kept for another attempt."""
        return aiohttp.TCPConnector(resolver=GuardedResolver(self), use_dns_cache=False, force_close=True,
                                    socket_factory=self.socket, **kwargs)


class GuardedResolver(AbstractResolver):
    """The system resolver (getaddrinfo in a thread), refusing the whole lookup when any
    address the name resolves to is denied."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        for result in results:
            if (reason := self.guard.policy.address_refusal(result["host"], result["port"])) is not None:
                raise self.guard.refuse(f"refused to connect: {host} resolves to {result['host']}; {reason}")
        return results

    async def close(self) -> None:
        await self._resolver.close()
