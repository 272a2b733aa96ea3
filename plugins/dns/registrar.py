"""The DNS registrar: forward and reverse records by RFC 2136 updates signed with TSIG (dnspython).

For a host ``h1.lab.example`` with address 198.51.100.7 it makes, in one update per zone:

- ``h1.lab.example. A 198.51.100.7`` (AAAA for an IPv6 address) and beside it
  ``h1.lab.example. TXT "governord:host-id=<uuid>"``, in the forward zone;
- ``7.100.51.198.in-addr.arpa. PTR h1.lab.example.`` and beside it the same TXT marker, in the
  reverse zone the address is in.

The marker sits beside every name the registrar writes, forward and reverse, so that a zone
transfer lists everything it owns (the sweep's orphans), a PTR left behind is found even when the
forward name has since passed to another host, and nothing is removed that does not carry the
host's marker. An update writes the records and the marker together, so there is never a record
of ours without it.

Every write is checked against what the server held when it was read: the update carries
RFC 2136 prerequisites that the name's A, AAAA and TXT (or PTR and TXT) sets are still exactly
as read, so a change made meanwhile by someone else fails the update (NXRRSET/YXRRSET, retried:
the next try reads again) instead of being overwritten unseen. Before any write, every name and
address is checked for collisions: a name that holds other addresses, or an address whose PTR
names another host, not under this host's marker, is a permanent error naming both, unless
``overwrite``; a record that is already exactly what is wanted is success (and gets the marker).
After writing, and after removing, the server is queried and the answer compared with what was
wanted: the update's NOERROR is not taken on trust.

Errors: no connection, a timeout or SERVFAIL are retryable; a server that refuses the update
(REFUSED, NOTAUTH, NOTZONE, a TSIG error such as BADSIG or BADKEY) is a permanent error with the
server's rcode. Every exchange goes over TCP, in a thread of the instance's pool
(:meth:`Registrar.call_sync`), and is read by hand rather than with ``dns.query.tcp``: a server
that rejects the signature may answer unsigned (PowerDNS does), which dnspython reads as a
malformed answer, and the rcode in it is the error worth reporting.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.reversename
import dns.tsig
import dns.update
import dns.xfr

from governord.errors import PermanentError, RetryableError
from governord.models import OWNERSHIP_KEY, HostView
from governord.registrars import Phase, Registrar, RegistrarConfig, Registration, marker_of
from governord.registrars import TagMapping as BaseTagMapping

from .config import DnsConfig, DnsTagMapping

log = logging.getLogger(__name__)

A, AAAA, PTR, TXT, SOA = (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.PTR, dns.rdatatype.TXT,
                          dns.rdatatype.SOA)
IN = dns.rdataclass.IN
#: what the registrar reads and writes at a forward name, and at a reverse name
FORWARD_TYPES = (A, AAAA, TXT)
REVERSE_TYPES = (PTR, TXT)
#: rcodes of an update whose prerequisites failed: the name changed since it was read
CHANGED_MEANWHILE = frozenset({dns.rcode.NXRRSET, dns.rcode.YXRRSET, dns.rcode.YXDOMAIN, dns.rcode.NXDOMAIN})
#: rcodes that are the server's passing trouble
PASSING = frozenset({dns.rcode.SERVFAIL})


def marker_text(host_id: str) -> str:
    return f"{OWNERSHIP_KEY}={host_id}"


def _txt(rdata: Any) -> str:
    return b"".join(rdata.strings).decode("utf-8", errors="replace")


@dataclass
class NameState:
    """What the server holds at one name, per record type read (None: no such set)."""

    name: dns.name.Name
    sets: dict[dns.rdatatype.RdataType, dns.rdataset.Rdataset | None] = field(default_factory=dict)

    def values(self, rdtype: dns.rdatatype.RdataType) -> set[str]:
        found = self.sets.get(rdtype)
        return {r.to_text().lower() for r in found} if found is not None else set()

    def markers(self) -> dict[str, Any]:
        """The ownership markers in its TXT set: host id -> rdata."""
        found = self.sets.get(TXT)
        marks: dict[str, Any] = {}
        for rdata in found or ():
            host_id = marker_of(_txt(rdata))
            if host_id is not None:
                marks[host_id] = rdata
        return marks

    def owner(self) -> str | None:
        """The host id its marker names (the first, if several are there), or None."""
        marks = self.markers()
        return next(iter(marks)) if marks else None


class DnsRegistrar(Registrar):
    """Publishes each host's A/AAAA and PTR records on a DNS server, by signed dynamic updates."""

    type_name: ClassVar[str] = "dns"
    Config: ClassVar[type[RegistrarConfig]] = DnsConfig
    TagMapping: ClassVar[type[BaseTagMapping]] = DnsTagMapping
    #: the records go once the machine is gone: its name resolves as long as it can answer to it
    deregister_phase: ClassVar[Phase] = Phase.AFTER_MACHINE
    #: the records are public by nature: the name, its addresses and their reverse names
    application_keys: ClassVar[frozenset[str]] = frozenset({"fqdn", "addresses", "reverse"})

    config: DnsConfig

    def __init__(self, name: str, config: RegistrarConfig, *, state_dir: Path | None = None) -> None:
        if not isinstance(config, DnsConfig):
            raise TypeError(f"{type(self).__name__} needs a DnsConfig, not {type(config).__name__}")
        super().__init__(name, config, state_dir=state_dir)
        cfg = self.config
        self.zone = dns.name.from_text(cfg.zone)
        self.reverse_zones = [dns.name.from_text(z) for z in cfg.reverse_zones]
        self._key = dns.tsig.Key(dns.name.from_text(cfg.key_name), cfg.key_secret.reveal().strip(),
                                 dns.name.from_text(cfg.key_algorithm))
        self.where = f"DNS server {cfg.server}:{cfg.port}"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Check that the server is authoritative for every configured zone (a typo in a zone
        fails here, for good; an unreachable server is retried)."""
        for zone in (self.zone, *self.reverse_zones):
            answer = await self._query(zone, SOA)
            if not answer.answer:
                raise PermanentError(f"{self.where} has no SOA for zone {zone}: is it the zone's primary?",
                                     source=self.name)

    async def probe(self) -> bool:
        """A signed SOA query of the forward zone (a zone transfer of every zone would be the
        listing): the server answers, authoritatively, and accepts the key."""
        await self.ensure_started()
        await self._query(self.zone, SOA)
        return True

    # -- the contract --------------------------------------------------------------------

    def classify(self, mappings: list[tuple[str, Any]]) -> dict[str, Any]:
        """Nothing of its own: the records follow the host's name and addresses."""
        return {}

    async def prepare(self, host: HostView, classification: dict[str, Any]) -> dict[str, Any] | None:
        """Before the machine exists: publish the address leased for it from an address pool,
        if it has one, so that the machine comes up with its name (and a collision fails the
        host before a machine is made). Nothing for a host whose platform assigns the address."""
        if host.address is None:
            return None
        return await self._publish(host, [self._address(host, host.address)])

    async def register(self, host: HostView, classification: dict[str, Any]) -> dict[str, Any]:
        """Make the host's forward and reverse records (and their markers), as described above;
        verify them by querying. Idempotent."""
        return await self._publish(host, self._addresses(host))

    async def _publish(self, host: HostView, addresses: list[str]) -> dict[str, Any]:
        fqdn = self._fqdn(host)
        # no reverse zones configured: no PTR records at all
        reverse = {address: self._reverse(address) for address in addresses} if self.reverse_zones else {}
        forward_state = await self._read(fqdn, FORWARD_TYPES)
        reverse_states = {address: await self._read(name, REVERSE_TYPES) for address, (name, _) in reverse.items()}

        # every collision first, so that nothing is written when one of them stops the step
        collisions = []
        wanted = {str(ipaddress.ip_address(a)).lower() for a in addresses}
        owner = forward_state.owner()
        held = forward_state.values(A) | forward_state.values(AAAA)
        if owner not in (None, host.id) or (owner is None and held and held != wanted):
            collisions.append(f"{_bare(fqdn)} holds {', '.join(sorted(held)) or 'no address'} "
                              f"({_whose(owner)}), not {', '.join(sorted(wanted))} for host {host.id}")
        target = fqdn.to_text().lower()
        for address, state in reverse_states.items():
            r_owner = state.owner()
            names = state.values(PTR)
            if r_owner not in (None, host.id) or (r_owner is None and names and names != {target}):
                collisions.append(f"{address} ({_bare(state.name)}) points to {', '.join(sorted(names)) or 'nothing'} "
                                  f"({_whose(r_owner)}), not {_bare(fqdn)} for host {host.id}")
        if collisions and not self.config.overwrite:
            raise PermanentError(f"{self.where}: collision: {'; '.join(collisions)} (set overwrite = true to "
                                 "replace such records)", source=self.name)

        marker = dns.rdata.from_text(IN, TXT, _quoted(marker_text(host.id)))
        update = self._update(self.zone, forward_state)
        for rdtype in (A, AAAA):
            rdatas = [dns.rdata.from_text(IN, rdtype, a) for a in addresses if _rdtype(a) == rdtype]
            if rdatas:
                update.replace(fqdn, self.config.ttl, *rdatas)
            elif forward_state.sets.get(rdtype) is not None:
                update.delete(fqdn, rdtype)
        self._claim(update, fqdn, forward_state, marker, host.id)
        await self._send(update, f"records of {_bare(fqdn)}")

        for address, (name, zone) in reverse.items():
            state = reverse_states[address]
            update = self._update(zone, state)
            update.replace(name, self.config.ttl, dns.rdata.from_text(IN, PTR, target))
            self._claim(update, name, state, marker, host.id)
            await self._send(update, f"PTR of {address}")

        # reverse names this host had before (its addresses changed): removed, if still ours
        recorded = self._recorded(host)
        for address in recorded.get("addresses", []):
            if address not in reverse and self._reverse_zone_of(address) is not None:
                await self._remove(self._reverse(address)[0], REVERSE_TYPES, host.id)

        await self._verify_present(host, fqdn, addresses, reverse)
        return {"fqdn": _bare(fqdn), "addresses": list(addresses),
                "reverse": [_bare(name) for name, _ in reverse.values()]}

    async def deregister(self, host: HostView) -> None:
        """Remove the host's records, those that still carry its marker, and verify by querying
        that none of its records is left. What is gone already, or is another host's now, is left."""
        fqdn = self._forward_name(host)
        if fqdn is not None:
            await self._remove(fqdn, FORWARD_TYPES, host.id)
        for address in self._all_addresses(host):
            if self._reverse_zone_of(address) is not None:
                await self._remove(self._reverse(address)[0], REVERSE_TYPES, host.id)
        left = await self.lookup(host)
        if left is not None and left.get("mine"):
            raise RetryableError(f"{self.where}: records of host {host.id} are still there after removal: {left}",
                                 source=self.name)

    async def lookup(self, host: HostView) -> dict[str, Any] | None:
        """What the server holds at the host's name and its addresses' reverse names (None:
        nothing at all); ``mine`` lists the names still carrying this host's marker."""
        fqdn = self._forward_name(host)
        state = await self._read(fqdn, FORWARD_TYPES) if fqdn is not None else None
        found: dict[str, Any] = {}
        mine: list[str] = []
        if fqdn is not None and state is not None and any(state.sets.values()):
            found = {"fqdn": _bare(fqdn), "A": sorted(state.values(A)), "AAAA": sorted(state.values(AAAA)),
                     "owner": state.owner()}
            if host.id in state.markers():
                mine.append(_bare(fqdn))
        ptrs: dict[str, list[str]] = {}
        for address in self._all_addresses(host):
            if self._reverse_zone_of(address) is None:
                continue
            name = self._reverse(address)[0]
            r_state = await self._read(name, REVERSE_TYPES)
            if any(r_state.values(t) for t in REVERSE_TYPES):
                ptrs[address] = sorted(_bare(v) for v in r_state.values(PTR))
                if host.id in r_state.markers():
                    mine.append(_bare(name))
        if ptrs:
            found["ptr"] = ptrs
        if not found:
            return None
        found["mine"] = mine
        return found

    async def list_owned(self) -> list[Registration]:
        """Every name in the forward and reverse zones that carries a governord marker (read by
        signed zone transfers)."""
        found: list[Registration] = []
        for zone in (self.zone, *self.reverse_zones):
            names: dict[dns.name.Name, dict[dns.rdatatype.RdataType, list[Any]]] = {}
            for rrset in await self.call_sync(self._transfer, zone):
                if rrset.rdtype in (A, AAAA, PTR, TXT):
                    names.setdefault(rrset.name, {}).setdefault(rrset.rdtype, []).extend(rrset)
            for name, sets in names.items():
                for rdata in sets.get(TXT, []):
                    host_id = marker_of(_txt(rdata))
                    if host_id is None:
                        continue
                    records = {dns.rdatatype.to_text(t): sorted(_bare(r.to_text()) for r in v)
                               for t, v in sets.items() if t != TXT}
                    found.append(Registration(self.name, name.to_text(), _bare(name), host_id,
                                              {"zone": _bare(zone), "records": records}))
        return found

    async def remove_owned(self, entry: Registration) -> bool:
        """Remove the records at the name ``entry.entry_id`` if it still carries the marker of
        ``entry.host_id``; verified by querying."""
        name = dns.name.from_text(entry.entry_id)
        reverse = any(name.is_subdomain(z) for z in self.reverse_zones) or name.is_subdomain(
            dns.name.from_text("arpa."))
        return await self._remove(name, REVERSE_TYPES if reverse else FORWARD_TYPES, entry.host_id)

    # -- the records ---------------------------------------------------------------------

    def _fqdn(self, host: HostView) -> dns.name.Name:
        try:
            name = dns.name.from_text(host.fqdn.lower().rstrip(".") + ".")
        except dns.exception.DNSException as exc:
            raise PermanentError(f"{host.fqdn!r} is not a DNS name: {exc}", source=self.name) from None
        if not name.is_subdomain(self.zone) or name == self.zone:
            raise PermanentError(f"{host.fqdn} is not in zone {_bare(self.zone)}, the zone [registrars.{self.name}] "
                                 "updates", source=self.name)
        return name

    def _forward_name(self, host: HostView) -> dns.name.Name | None:
        """The name the host's records are at (as recorded, else its FQDN), or None if it is not
        in the zone: then it never had records here, and there is nothing to look up or remove."""
        recorded = self._recorded(host).get("fqdn")
        try:
            return self._fqdn(host) if not recorded else self._fqdn(replace(host, fqdn=str(recorded)))
        except PermanentError:
            return None

    def _address(self, host: HostView, text: str) -> str:
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            raise PermanentError(f"host {host.fqdn} has an address that is not one: {text!r}",
                                 source=self.name) from None

    def _addresses(self, host: HostView) -> list[str]:
        addresses = []
        for text in host.addresses:
            address = self._address(host, text)
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise PermanentError(f"host {host.fqdn} has no address to publish in DNS", source=self.name)
        return addresses

    def _all_addresses(self, host: HostView) -> list[str]:
        """The host's addresses now, its leased one and those its record names (what may have records)."""
        seen: list[str] = []
        leased = [host.address] if host.address else []
        for text in [*host.addresses, *leased, *self._recorded(host).get("addresses", [])]:
            try:
                address = str(ipaddress.ip_address(text))
            except ValueError:
                continue
            if address not in seen:
                seen.append(address)
        return seen

    def _recorded(self, host: HostView) -> dict[str, Any]:
        record = host.registrations.get(self.name)
        return record if isinstance(record, dict) else {}

    def _reverse_zone_of(self, address: str) -> dns.name.Name | None:
        name = dns.reversename.from_address(address)
        zones = [z for z in self.reverse_zones if name.is_subdomain(z)]
        return max(zones, key=len) if zones else None

    def _reverse(self, address: str) -> tuple[dns.name.Name, dns.name.Name]:
        """The address's reverse name and the configured zone it is in."""
        zone = self._reverse_zone_of(address)
        if zone is None:
            raise PermanentError(f"address {address} is in none of the reverse zones of [registrars.{self.name}] "
                                 f"({', '.join(_bare(z) for z in self.reverse_zones) or 'none configured'})",
                                 source=self.name)
        return dns.reversename.from_address(address), zone

    def _update(self, zone: dns.name.Name, state: NameState) -> dns.update.UpdateMessage:
        """A signed update of ``zone`` whose prerequisites are that ``state`` still holds."""
        update = dns.update.UpdateMessage(zone, keyring=self._key)
        for rdtype, found in state.sets.items():
            if found is None:
                update.absent(state.name, rdtype)
            else:
                update.present(state.name, found)
        return update

    def _claim(self, update: dns.update.UpdateMessage, name: dns.name.Name, state: NameState, marker: Any,
               host_id: str) -> None:
        """Put this host's marker at ``name``, in place of any other host's (other TXT stays)."""
        for other_id, rdata in state.markers().items():
            if other_id != host_id:
                update.delete(name, rdata)
        if host_id not in state.markers():
            update.add(name, self.config.ttl, marker)

    async def _remove(self, name: dns.name.Name, types: Iterable[dns.rdatatype.RdataType], host_id: str) -> bool:
        """Delete the record sets of ``types`` at ``name`` and the marker, if the name carries
        ``host_id``'s marker; verify. False if it did not (gone already, or another's)."""
        types = tuple(types)
        state = await self._read(name, types)
        rdata = state.markers().get(host_id)
        if rdata is None:
            return False
        zone = self._zone_of(name)
        update = self._update(zone, state)
        for rdtype in types:
            if rdtype != TXT and state.sets.get(rdtype) is not None:
                update.delete(name, rdtype)
        update.delete(name, rdata)
        await self._send(update, f"removal of {_bare(name)}")
        after = await self._read(name, types)
        if host_id in after.markers() or any(after.sets.get(t) is not None for t in types if t != TXT):
            raise RetryableError(f"{self.where}: {_bare(name)} still answers after its removal: "
                                 f"{ {dns.rdatatype.to_text(t): sorted(after.values(t)) for t in types} }",
                                 source=self.name)
        log.info("%s: removed %s of host %s", self.name, _bare(name), host_id)
        return True

    def _zone_of(self, name: dns.name.Name) -> dns.name.Name:
        zones = [z for z in (self.zone, *self.reverse_zones) if name.is_subdomain(z)]
        if not zones:
            raise PermanentError(f"{_bare(name)} is in none of the zones of [registrars.{self.name}]", source=self.name)
        return max(zones, key=len)

    async def _verify_present(self, host: HostView, fqdn: dns.name.Name, addresses: list[str],
                              reverse: dict[str, tuple[dns.name.Name, dns.name.Name]]) -> None:
        """Query the server: the name answers exactly the host's addresses, each reverse name
        exactly the name, each under the host's marker."""
        state = await self._read(fqdn, FORWARD_TYPES)
        wanted = {a.lower() for a in addresses}
        held = state.values(A) | state.values(AAAA)
        problems = []
        if held != wanted or host.id not in state.markers():
            problems.append(f"{_bare(fqdn)} answers {sorted(held)} (marker of {state.owner()})")
        for name, _zone in reverse.values():
            r_state = await self._read(name, REVERSE_TYPES)
            if r_state.values(PTR) != {fqdn.to_text().lower()} or host.id not in r_state.markers():
                problems.append(f"{_bare(name)} answers {sorted(r_state.values(PTR))} (marker of {r_state.owner()})")
        if problems:
            raise RetryableError(f"{self.where} accepted the update but does not answer as updated: "
                                 f"{'; '.join(problems)}", source=self.name)

    # -- the wire ------------------------------------------------------------------------

    async def _read(self, name: dns.name.Name, types: Iterable[dns.rdatatype.RdataType]) -> NameState:
        state = NameState(name)
        for rdtype in types:
            answer = await self._query(name, rdtype)
            found = answer.get_rrset(answer.answer, name, IN, rdtype)
            if found is None or not len(found):
                state.sets[rdtype] = None
            else:
                # TTL 0: as a prerequisite of an update (RFC 2136 2.4.2), a set is compared by its data
                rdataset = dns.rdataset.Rdataset(IN, rdtype)
                for rdata in found:
                    rdataset.add(rdata, 0)
                state.sets[rdtype] = rdataset
        return state

    async def _query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        """A signed query (so that a server with views answers from the key's view), which the
        server must answer authoritatively."""
        query = dns.message.make_query(name, rdtype, IN)
        query.use_tsig(self._key)
        answer = await self.call_sync(self._exchange, query)
        rcode = answer.rcode()
        if rcode in PASSING:
            raise RetryableError(f"{self.where} answered {dns.rcode.to_text(rcode)} to {_bare(name)} "
                                 f"{dns.rdatatype.to_text(rdtype)}", source=self.name)
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise PermanentError(f"{self.where} answered {dns.rcode.to_text(rcode)} to {_bare(name)} "
                                 f"{dns.rdatatype.to_text(rdtype)}", source=self.name)
        if not answer.flags & dns.flags.AA:
            raise PermanentError(f"{self.where} is not authoritative for {_bare(name)} (no AA in its answer): "
                                 "name the zone's primary server", source=self.name)
        return answer

    async def _send(self, update: dns.update.UpdateMessage, what: str) -> None:
        answer = await self.call_sync(self._exchange, update)
        rcode = answer.rcode()
        if rcode == dns.rcode.NOERROR:
            return
        text = dns.rcode.to_text(rcode)
        if rcode in CHANGED_MEANWHILE:
            raise RetryableError(f"{self.where}: the {what} was not made ({text}): the records changed "
                                 "since they were read", source=self.name)
        if rcode in PASSING:
            raise RetryableError(f"{self.where} refused the {what} for now: {text}", source=self.name)
        raise PermanentError(f"{self.where} refused the {what} in zone {_bare(update.zone[0].name)}: {text}",
                             source=self.name)

    def _exchange(self, message: dns.message.Message) -> dns.message.Message:
        """One exchange over TCP (blocking: runs in a thread). Its answer must be signed with the
        key; an answer that is not, or whose TSIG says the server rejected ours, is the server's
        refusal, reported with its rcode and TSIG error."""
        wire = message.to_wire()
        timeout = self.config.timeout
        try:
            with socket.create_connection((self.config.server, self.config.port), timeout=timeout) as sock:
                sock.sendall(struct.pack("!H", len(wire)) + wire)
                (length,) = struct.unpack("!H", _receive(sock, 2))
                reply = _receive(sock, length)
        except OSError as exc:
            raise RetryableError(f"{self.where} is unreachable: {exc}", source=self.name) from None
        try:
            answer = dns.message.from_wire(reply, keyring=self._key, request_mac=message.mac)
        except (dns.tsig.PeerError, dns.message.UnknownTSIGKey, dns.exception.FormError) as exc:
            try:
                unsigned = dns.message.from_wire(reply, keyring=False)
            except dns.exception.DNSException:
                raise PermanentError(f"{self.where} answered something that is not DNS: {exc}",
                                     source=self.name) from None
            rcode = dns.rcode.to_text(unsigned.rcode())
            tsig = f", TSIG error {dns.rcode.to_text(dns.rcode.Rcode.make(unsigned.tsig_error), True)}" if unsigned.tsig_error else ""
            raise PermanentError(f"{self.where} refused key {self.config.key_name} "
                                 f"({self.config.key_algorithm}): {rcode}{tsig} ({exc})", source=self.name) from None
        except dns.exception.DNSException as exc:
            raise RetryableError(f"{self.where} answered something unreadable: {exc}", source=self.name) from None
        if answer.id != message.id or answer.opcode() != message.opcode():
            raise RetryableError(f"{self.where} answered another message (id {answer.id})", source=self.name)
        return answer

    def _transfer(self, zone: dns.name.Name) -> list[Any]:
        """Every record set of ``zone`` by a signed zone transfer (AXFR; blocking)."""
        rrsets: list[Any] = []
        try:
            for message in dns.query.xfr(self.config.server, zone, port=self.config.port,
                                         keyring={self._key.name: self._key}, keyname=self._key.name,
                                         keyalgorithm=self._key.algorithm, relativize=False,
                                         lifetime=self.config.timeout * 6, timeout=self.config.timeout):
                rrsets.extend(message.answer)
        except dns.xfr.TransferError as exc:
            raise PermanentError(f"{self.where} refused the transfer of {_bare(zone)} (needed to list what "
                                 f"governord owns): {dns.rcode.to_text(exc.rcode)}", source=self.name) from None
        except (dns.tsig.PeerError, dns.message.UnknownTSIGKey) as exc:
            raise PermanentError(f"{self.where} refused key {self.config.key_name} for the transfer of "
                                 f"{_bare(zone)}: {exc}", source=self.name) from None
        except (OSError, dns.exception.Timeout) as exc:
            raise RetryableError(f"{self.where} is unreachable: {exc}", source=self.name) from None
        except dns.exception.DNSException as exc:
            raise PermanentError(f"{self.where}: the transfer of {_bare(zone)} failed: {exc}",
                                 source=self.name) from None
        return rrsets


def _receive(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionResetError("the server closed the connection before answering")
        data += chunk
    return data


def _rdtype(address: str) -> dns.rdatatype.RdataType:
    return A if ipaddress.ip_address(address).version == 4 else AAAA


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bare(name: dns.name.Name | str) -> str:
    text = name.to_text() if isinstance(name, dns.name.Name) else name
    return text.rstrip(".")


def _whose(owner: str | None) -> str:
    return f"governord host {owner}" if owner else "not governord's"
