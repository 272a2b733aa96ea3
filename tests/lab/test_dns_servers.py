"""The lab's DNS servers as a client meets them: BIND 9 and PowerDNS take an RFC 2136 update
signed with their TSIG key and answer it, refuse one signed with a wrong key or none, and
transfer their zones only to the key.

The checks use dnspython directly (not the registrar), so they test the servers' set-up."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import dns.tsig
import dns.update
import dns.xfr
import pytest

from lab.dns import FORWARD_ZONE, REVERSE_ZONES, DnsServer
from tests.fixtures.dns import fresh_address, fresh_name

pytestmark = pytest.mark.integration

WRONG_SECRET = "c2VjcmV0IHRoYXQgaXMgbm90IHRoZSBsYWIncyBrZXkgYXQgYWxs"


def key(server: DnsServer, *, secret: str | None = None, name: str | None = None) -> dns.tsig.Key:
    return dns.tsig.Key(name or server.key.name, secret or server.key.secret, server.key.algorithm)


def ask(server: DnsServer, name: str, rdtype: str) -> list[str]:
    answer = dns.query.udp(dns.message.make_query(name, rdtype), server.address, port=server.port, timeout=3)
    assert answer.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
    return sorted(r.to_text() for rrset in answer.answer for r in rrset)


def refusal(server: DnsServer, update: dns.update.UpdateMessage) -> str:
    """The server's answer to an update it should refuse: its rcode, and TSIG error if any.

    A server may answer a badly signed update unsigned (PowerDNS), which dnspython refuses to
    read as the answer to a signed request; the raw answer is read without checking then."""
    try:
        answer = dns.query.tcp(update, server.address, port=server.port, timeout=3)
    except dns.tsig.PeerError as exc:  # BIND: signed with the error in the TSIG
        return f"{type(exc).__name__}"
    except dns.exception.FormError:
        wire = update.to_wire()
        with socket.create_connection((server.address, server.port), timeout=3) as sock:
            sock.sendall(struct.pack("!H", len(wire)) + wire)
            length = struct.unpack("!H", sock.recv(2))[0]
            data = b""
            while len(data) < length:
                data += sock.recv(length - len(data))
        return dns.rcode.to_text(dns.message.from_wire(data, keyring=False).rcode())
    return dns.rcode.to_text(answer.rcode())


def test_both_servers_are_authoritative_for_the_lab_zones(dns_server: DnsServer) -> None:
    assert set(dns_server.zones) == {FORWARD_ZONE, *REVERSE_ZONES}
    for zone in dns_server.zones:
        answer = dns.query.tcp(dns.message.make_query(zone, "SOA"), dns_server.address, port=dns_server.port,
                               timeout=3)
        assert answer.flags & dns.flags.AA and answer.answer, zone


def serial(server: DnsServer, zone: str) -> int:
    answer = dns.query.tcp(dns.message.make_query(zone, "SOA"), server.address, port=server.port, timeout=3)
    return int(answer.answer[0][0].serial)


def test_an_update_signed_with_the_key_is_taken_and_answered(dns_server: DnsServer) -> None:
    name, address = fresh_name(), fresh_address()
    before = serial(dns_server, FORWARD_ZONE)
    update = dns.update.UpdateMessage(FORWARD_ZONE, keyring=key(dns_server))
    update.replace(name + ".", 300, "A", address)
    answer = dns.query.tcp(update, dns_server.address, port=dns_server.port, timeout=3)
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.had_tsig  # the answer is signed with the same key
    assert ask(dns_server, name + ".", "A") == [address]
    assert serial(dns_server, FORWARD_ZONE) > before  # so that secondaries transfer the change

    reverse = dns.reversename.from_address(address)
    zone = REVERSE_ZONES[0]
    update = dns.update.UpdateMessage(zone, keyring=key(dns_server))
    update.replace(reverse, 300, "PTR", name + ".")
    assert dns.query.tcp(update, dns_server.address, port=dns_server.port, timeout=3).rcode() == dns.rcode.NOERROR
    assert ask(dns_server, reverse.to_text(), "PTR") == [name + "."]

    update = dns.update.UpdateMessage(FORWARD_ZONE, keyring=key(dns_server))
    update.delete(name + ".")
    assert dns.query.tcp(update, dns_server.address, port=dns_server.port, timeout=3).rcode() == dns.rcode.NOERROR
    assert ask(dns_server, name + ".", "A") == []


def test_an_update_with_a_wrong_key_or_none_is_refused_and_changes_nothing(dns_server: DnsServer) -> None:
    name = fresh_name()
    outcomes = {}
    for label, signer in (("wrong secret", key(dns_server, secret=WRONG_SECRET)),
                          ("unknown key", key(dns_server, name="not-the-lab-key")),
                          ("unsigned", None)):
        update = dns.update.UpdateMessage(FORWARD_ZONE, keyring=signer)
        update.replace(name + ".", 300, "A", fresh_address())
        outcomes[label] = refusal(dns_server, update)
    if dns_server.kind == "bind":
        # BIND signs its refusal, the TSIG error in it
        assert outcomes == {"wrong secret": "PeerBadSignature", "unknown key": "PeerBadKey", "unsigned": "REFUSED"}
    else:
        # PowerDNS answers a bad signature unsigned
        assert outcomes == {"wrong secret": "REFUSED", "unknown key": "REFUSED", "unsigned": "REFUSED"}
    assert ask(dns_server, name + ".", "A") == []


def test_an_update_of_a_zone_the_server_does_not_hold_is_refused(dns_server: DnsServer) -> None:
    update = dns.update.UpdateMessage("elsewhere.example.", keyring=key(dns_server))
    update.replace("x.elsewhere.example.", 300, "A", "192.0.2.1")
    answer = dns.query.tcp(update, dns_server.address, port=dns_server.port, timeout=3)
    assert dns.rcode.to_text(answer.rcode()) in ("NOTAUTH", "REFUSED")


def test_zones_are_transferred_only_to_the_key(dns_server: DnsServer) -> None:
    name = fresh_name("xfr")
    update = dns.update.UpdateMessage(FORWARD_ZONE, keyring=key(dns_server))
    update.replace(name + ".", 300, "TXT", '"seen"')
    assert dns.query.tcp(update, dns_server.address, port=dns_server.port, timeout=3).rcode() == dns.rcode.NOERROR
    signed = key(dns_server)
    names = {rrset.name.to_text() for message in dns.query.xfr(
        dns_server.address, FORWARD_ZONE, port=dns_server.port, keyring={signed.name: signed}, keyname=signed.name,
        relativize=False, lifetime=10) for rrset in message.answer}
    assert name + "." in names
    with pytest.raises(dns.xfr.TransferError):
        list(dns.query.xfr(dns_server.address, FORWARD_ZONE, port=dns_server.port, lifetime=10))


def test_a_stopped_server_is_gone(tmp_path: Path) -> None:
    """start/stop leave no process behind (the session's servers are stopped the same way)."""
    from lab.dns import start_bind, start_powerdns

    for start in (start_bind, start_powerdns):
        server = start(tmp_path / start.__name__)
        assert server.running()
        server.stop()
        assert not server.running() and server.process.returncode is not None


def test_bind_views_are_told_apart_by_their_keys(bind_views: list[DnsServer]) -> None:
    internal, external = bind_views
    assert internal.key.name != external.key.name and internal.port == external.port
    name = fresh_name("view")
    for server, address in ((internal, "198.51.100.201"), (external, "198.51.100.202")):
        update = dns.update.UpdateMessage(FORWARD_ZONE, keyring=key(server))
        update.replace(name + ".", 300, "A", address)
        assert dns.query.tcp(update, server.address, port=server.port, timeout=3).rcode() == dns.rcode.NOERROR
    for server, address in ((internal, "198.51.100.201"), (external, "198.51.100.202")):
        query = dns.message.make_query(name + ".", "A")
        query.use_tsig(key(server))
        answer = dns.query.tcp(query, server.address, port=server.port, timeout=3)
        assert sorted(r.to_text() for rrset in answer.answer for r in rrset) == [address]
    # a client with no key matches no view
    unsigned = dns.query.tcp(dns.message.make_query(name + ".", "A"), internal.address, port=internal.port, timeout=3)
    assert unsigned.rcode() == dns.rcode.REFUSED
