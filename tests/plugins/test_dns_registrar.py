"""The DNS registrar against Debian's real BIND 9 and PowerDNS (lab/dns), each test on both.

What the registrar did is checked on the other side: by plain, unsigned queries to the server
(what any resolver would get), never by the registrar's own reading. Records another party
makes are made with dnspython directly, signed with the lab's key.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.reversename
import dns.tsig
import dns.update
import pydantic
import pytest

from governord.errors import PermanentError, RetryableError
from governord.models import HostOrigin, HostState, HostView
from governord.plugins.dns import governord_register_registrars
from governord.plugins.dns.config import DnsConfig, DnsTagMapping
from governord.plugins.dns.registrar import DnsRegistrar
from governord.registrars import Phase, RegistrarRegistry, Registration
from lab.dns import FORWARD_ZONE, REVERSE_ZONES, DnsServer
from lab.postgres import free_port
from tests.fixtures.dns import fresh_address, fresh_name

pytestmark = pytest.mark.integration

NAME = "dns"
WRONG_SECRET = "c2VjcmV0IHRoYXQgaXMgbm90IHRoZSBsYWIncyBrZXkgYXQgYWxs"


def make_host(fqdn: str, addresses: tuple[str, ...], *, host_id: str | None = None,
              registrations: dict[str, Any] | None = None) -> HostView:
    return HostView(
        id=host_id or str(uuid.uuid4()), name=fqdn.split(".")[0], fqdn=fqdn, app="openshift", role="node",
        origin=HostOrigin.PROVISIONED, state=HostState.REGISTERING, provider="lab", machine_id="vm-1",
        tags=("node",), addresses=addresses, classification={}, registrations=registrations or {},
    )


@pytest.fixture
def key_file(tmp_path: Path) -> Any:
    def write(secret: str) -> str:
        path = tmp_path / f"key-{uuid.uuid4().hex[:6]}"
        path.write_text(secret + "\n")
        return str(path)

    return write


def make_config(server: DnsServer, key_file: Any, **values: Any) -> DnsConfig:
    settings: dict[str, Any] = {
        "type": "dns", "server": server.address, "port": server.port, "zone": FORWARD_ZONE,
        "reverse_zones": list(REVERSE_ZONES), "key_name": server.key.name,
        "key_secret": {"file": key_file(values.pop("secret", server.key.secret))}, "call_timeout": 30,
        **values,
    }
    config = DnsRegistrar.Config.model_validate(settings)
    assert isinstance(config, DnsConfig)
    return config


@pytest.fixture
def registrar(dns_server: DnsServer, key_file: Any) -> DnsRegistrar:
    return DnsRegistrar(NAME, make_config(dns_server, key_file))


def ask(server: DnsServer, name: str | dns.name.Name, rdtype: str) -> list[str]:
    """What a plain resolver is told: the answer's records as text, sorted."""
    answer = dns.query.udp(dns.message.make_query(name, rdtype), server.address, port=server.port, timeout=3)
    assert answer.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN), dns.rcode.to_text(answer.rcode())
    return sorted(r.to_text() for rrset in answer.answer for r in rrset)


def rev(address: str) -> str:
    return dns.reversename.from_address(address).to_text()


def put(server: DnsServer, zone: str, name: str, rdtype: str, *values: str) -> None:
    """Someone else's records: replace ``name``'s set of ``rdtype`` with ``values`` (signed, direct)."""
    update = dns.update.UpdateMessage(zone, keyring=dns.tsig.Key(server.key.name, server.key.secret,
                                                                  server.key.algorithm))
    update.replace(name, 300, rdtype, *values)
    assert dns.query.tcp(update, server.address, port=server.port, timeout=3).rcode() == dns.rcode.NOERROR


def marker(host: HostView) -> str:
    return f'"governord:host-id={host.id}"'


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- config and type (no server) --------------------------------------------------------------


def test_plugin_registers_the_dns_type_lazily() -> None:
    registry = RegistrarRegistry()
    governord_register_registrars(registry)
    entry = registry.get("dns")
    assert entry is not None and entry.Config is DnsConfig and entry.TagMapping is DnsTagMapping
    assert registry.load("dns") is DnsRegistrar
    # the records go after the machine (the host's cleaning step)
    assert DnsRegistrar.deregister_phase is Phase.AFTER_MACHINE
    assert DnsRegistrar.application_keys == {"fqdn", "addresses", "reverse"}


def test_config_is_strict_and_keeps_the_secret_out_of_sight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DNS_KEY", "c2VjcmV0")
    base = {"type": "dns", "server": "192.0.2.53", "zone": "Lab.Example.", "key_name": "governord",
            "key_secret": {"env": "DNS_KEY"}}
    config = DnsConfig.model_validate({**base, "reverse_zones": ["100.51.198.IN-ADDR.ARPA."]})
    assert config.zone == "lab.example" and config.reverse_zones == ["100.51.198.in-addr.arpa"]
    assert config.port == 53 and config.ttl == 300 and config.key_algorithm == "hmac-sha256" and not config.overwrite
    assert "c2VjcmV0" not in repr(config)
    monkeypatch.setenv("NOT_BASE64", "not base64!")
    for bad in ({"key_secret": "c2VjcmV0"},                     # inline, not by reference
                {"key_secret": {"env": "NOT_BASE64"}},
                {"key_secret": {"file": str(tmp_path / "absent")}},
                {"zone": "100.51.198.in-addr.arpa"},             # a reverse zone as the forward zone
                {"zone": "bad_-.exa mple"},
                {"reverse_zones": ["lab.example"]},
                {"reverse_zones": ["300.51.198.in-addr.arpa"]},
                {"reverse_zones": ["xy.ip6.arpa"]},
                {"reverse_zones": ["100.51.198.in-addr.arpa", "100.51.198.in-addr.arpa"]},
                {"key_algorithm": "hmac-sha3"}, {"port": 0}, {"ttl": -1}, {"timeout": 0}, {"colour": "blue"}):
        with pytest.raises(pydantic.ValidationError) as info:
            DnsConfig.model_validate({**base, **bad})
        assert "not base64!" not in str(info.value)
    with pytest.raises(pydantic.ValidationError):
        DnsTagMapping.model_validate({"zone": "x"})


# -- against both servers ---------------------------------------------------------------------


async def test_register_makes_forward_and_reverse_records_that_answer(
        dns_server: DnsServer, registrar: DnsRegistrar) -> None:
    fqdn, v4, v6 = fresh_name(), fresh_address(4), fresh_address(6)
    host = make_host(fqdn, (v4, v6))
    await registrar.ensure_started()
    record = await registrar.register(host, {})
    assert record == {"fqdn": fqdn, "addresses": [v4, v6], "reverse": [rev(v4).rstrip("."), rev(v6).rstrip(".")]}
    assert ask(dns_server, fqdn + ".", "A") == [v4]
    assert ask(dns_server, fqdn + ".", "AAAA") == [v6]
    assert ask(dns_server, fqdn + ".", "TXT") == [marker(host)]
    for address in (v4, v6):
        assert ask(dns_server, rev(address), "PTR") == [fqdn + "."]
        assert ask(dns_server, rev(address), "TXT") == [marker(host)]
    found = await registrar.lookup(host)
    assert found is not None and found["A"] == [v4] and found["AAAA"] == [v6] and found["owner"] == host.id
    assert found["ptr"] == {v4: [fqdn], v6: [fqdn]} and len(found["mine"]) == 3


async def test_register_again_changes_nothing_and_a_restarted_registrar_agrees(
        dns_server: DnsServer, registrar: DnsRegistrar, key_file: Any) -> None:
    """Idempotent, also after kill -9: a new instance finds its records by the marker."""
    fqdn, v4 = fresh_name(), fresh_address()
    host = make_host(fqdn, (v4,))
    first = await registrar.register(host, {})
    again = DnsRegistrar(NAME, make_config(dns_server, key_file))
    assert await again.register(host, {}) == first
    assert await registrar.register(host, {}) == first
    assert ask(dns_server, fqdn + ".", "A") == [v4]
    assert ask(dns_server, fqdn + ".", "TXT") == [marker(host)]
    assert ask(dns_server, rev(v4), "PTR") == [fqdn + "."]


async def test_an_identical_record_made_by_someone_else_is_success(
        dns_server: DnsServer, registrar: DnsRegistrar) -> None:
    fqdn, v4 = fresh_name(), fresh_address()
    put(dns_server, FORWARD_ZONE, fqdn + ".", "A", v4)
    put(dns_server, REVERSE_ZONES[0], rev(v4), "PTR", fqdn + ".")
    host = make_host(fqdn, (v4,))
    await registrar.register(host, {})
    assert ask(dns_server, fqdn + ".", "A") == [v4]
    assert ask(dns_server, fqdn + ".", "TXT") == [marker(host)]  # taken over: it is the host's now
    assert ask(dns_server, rev(v4), "PTR") == [fqdn + "."]


async def test_a_name_holding_another_address_is_a_permanent_collision_naming_both(
        dns_server: DnsServer, registrar: DnsRegistrar, key_file: Any) -> None:
    fqdn, theirs, ours = fresh_name(), fresh_address(), fresh_address()
    put(dns_server, FORWARD_ZONE, fqdn + ".", "A", theirs)
    host = make_host(fqdn, (ours,))
    with pytest.raises(PermanentError) as info:
        await registrar.register(host, {})
    message = str(info.value)
    assert fqdn in message and theirs in message and ours in message and "collision" in message
    # nothing written: not the name, not the PTR of the address
    assert ask(dns_server, fqdn + ".", "A") == [theirs]
    assert ask(dns_server, fqdn + ".", "TXT") == []
    assert ask(dns_server, rev(ours), "PTR") == []

    # allowed to overwrite: the name is the host's
    bold = DnsRegistrar(NAME, make_config(dns_server, key_file, overwrite=True))
    await bold.register(host, {})
    assert ask(dns_server, fqdn + ".", "A") == [ours]
    assert ask(dns_server, rev(ours), "PTR") == [fqdn + "."]


async def test_an_address_whose_ptr_names_another_host_is_a_permanent_collision(
        dns_server: DnsServer, registrar: DnsRegistrar) -> None:
    fqdn, other, v4 = fresh_name(), fresh_name("other"), fresh_address()
    put(dns_server, REVERSE_ZONES[0], rev(v4), "PTR", other + ".")
    host = make_host(fqdn, (v4,))
    with pytest.raises(PermanentError) as info:
        await registrar.register(host, {})
    assert v4 in str(info.value) and other in str(info.value) and fqdn in str(info.value)
    assert ask(dns_server, fqdn + ".", "A") == []  # the forward name was not written either
    assert ask(dns_server, rev(v4), "PTR") == [other + "."]


async def test_another_hosts_name_is_a_collision_even_with_the_same_address(
        dns_server: DnsServer, registrar: DnsRegistrar) -> None:
    fqdn, v4 = fresh_name(), fresh_address()
    first = make_host(fqdn, (v4,))
    await registrar.register(first, {})
    second = make_host(fqdn, (v4,))
    with pytest.raises(PermanentError) as info:
        await registrar.register(second, {})
    assert first.id in str(info.value) and second.id in str(info.value)
    assert ask(dns_server, fqdn + ".", "TXT") == [marker(first)]


async def test_deregister_removes_the_records_verified_and_again_is_success(
        dns_server: DnsServer, registrar: DnsRegistrar) -> None:
    fqdn, v4, v6 = fresh_name(), fresh_address(4), fresh_address(6)
    host = make_host(fqdn, (v4, v6))
    record = await registrar.register(host, {})
    put(dns_server, FORWARD_ZONE, fqdn + ".", "MX", f"10 {fqdn}.")  # an operator's record at the name stays
    gone = make_host(fqdn, (), host_id=host.id, registrations={NAME: record})  # addresses from the record
    await registrar.deregister(gone)
    for rdtype in ("A", "AAAA", "TXT"):
        assert ask(dns_server, fqdn + ".", rdtype) == []
    assert ask(dns_server, fqdn + ".", "MX") == [f"10 {fqdn}."]
    for address in (v4, v6):
        assert ask(dns_server, rev(address), "PTR") == [] and ask(dns_server, rev(address), "TXT") == []
    assert (await registrar.lookup(gone) or {}).get("mine", []) == []
    await registrar.deregister(gone)


async def test_deregister_leaves_what_another_host_holds_now(
        dns_server: DnsServer, registrar: DnsRegistrar, key_file: Any) -> None:
    fqdn, old_address, new_address = fresh_name(), fresh_address(), fresh_address()
    old = make_host(fqdn, (old_address,))
    await registrar.register(old, {})
    new = make_host(fqdn, (new_address,))
    await DnsRegistrar(NAME, make_config(dns_server, key_file, overwrite=True)).register(new, {})
    await registrar.deregister(old)
    assert ask(dns_server, fqdn + ".", "A") == [new_address]
    assert ask(dns_server, fqdn + ".", "TXT") == [marker(new)]
    assert ask(dns_server, rev(new_address), "PTR") == [fqdn + "."]
    # the old address's PTR was the old host's alone: gone
    assert ask(dns_server, rev(old_address), "PTR") == []


async def test_a_changed_address_moves_the_records(dns_server: DnsServer, registrar: DnsRegistrar) -> None:
    fqdn, before, after = fresh_name(), fresh_address(), fresh_address()
    host = make_host(fqdn, (before,))
    record = await registrar.register(host, {})
    moved = make_host(fqdn, (after,), host_id=host.id, registrations={NAME: record})
    await registrar.register(moved, {})
    assert ask(dns_server, fqdn + ".", "A") == [after]
    assert ask(dns_server, rev(after), "PTR") == [fqdn + "."]
    assert ask(dns_server, rev(before), "PTR") == [] and ask(dns_server, rev(before), "TXT") == []


async def test_list_owned_finds_every_marked_name_and_remove_owned_only_its_own(
        dns_server: DnsServer, registrar: DnsRegistrar) -> None:
    one, two = make_host(fresh_name(), (fresh_address(),)), make_host(fresh_name(), (fresh_address(),))
    for host in (one, two):
        await registrar.register(host, {})
    owned = await registrar.list_owned()
    mine = {(entry.name, entry.host_id) for entry in owned}
    for host in (one, two):
        assert (host.fqdn, host.id) in mine
        assert (rev(host.addresses[0]).rstrip("."), host.id) in mine
    forward = next(e for e in owned if e.host_id == one.id and e.name == one.fqdn)
    assert forward.system == NAME and forward.details["records"] == {"A": [one.addresses[0]]}

    # an entry whose marker names another host now is left alone
    stale = Registration(NAME, forward.entry_id, forward.name, str(uuid.uuid4()), {})
    assert await registrar.remove_owned(stale) is False
    assert ask(dns_server, one.fqdn + ".", "A") == [one.addresses[0]]

    for entry in [e for e in owned if e.host_id == one.id]:
        assert await registrar.remove_owned(entry) is True
        assert await registrar.remove_owned(entry) is False
    assert ask(dns_server, one.fqdn + ".", "A") == [] and ask(dns_server, rev(one.addresses[0]), "PTR") == []
    assert ask(dns_server, two.fqdn + ".", "A") == [two.addresses[0]]
    assert {e.host_id for e in await registrar.list_owned()} >= {two.id}
    assert one.id not in {e.host_id for e in await registrar.list_owned()}


async def test_a_wrong_key_is_a_permanent_error_with_the_servers_rcode(
        dns_server: DnsServer, key_file: Any) -> None:
    wrong = DnsRegistrar(NAME, make_config(dns_server, key_file, secret=WRONG_SECRET))
    fqdn = fresh_name()
    with pytest.raises(PermanentError) as info:
        await wrong.register(make_host(fqdn, (fresh_address(),)), {})
    # the registrar reads first (signed queries): BIND signs its refusal (NOTAUTH, TSIG error
    # BADSIG), PowerDNS answers NOTAUTH unsigned
    expected = "NOTAUTH, TSIG error BADSIG" if dns_server.kind == "bind" else "NOTAUTH"
    assert expected in str(info.value) and dns_server.key.name in str(info.value)
    assert info.value.source == NAME
    assert ask(dns_server, fqdn + ".", "A") == []
    with pytest.raises(PermanentError):
        await wrong.list_owned()
    with pytest.raises(PermanentError, match="NOTAUTH"):  # the health probe: a signed SOA query
        await wrong.probe()


async def test_the_probe_is_a_signed_soa_query_the_server_answers(dns_server: DnsServer, registrar: DnsRegistrar,
                                                                  key_file: Any) -> None:
    assert await registrar.probe() is True
    closed = DnsRegistrar(NAME, make_config(dns_server, key_file, port=free_port(), call_timeout=1))
    with pytest.raises(RetryableError):
        await closed.probe()


async def test_a_zone_the_server_does_not_hold_is_a_permanent_error(dns_server: DnsServer, key_file: Any) -> None:
    elsewhere = DnsRegistrar(NAME, make_config(dns_server, key_file, zone="elsewhere.example"))
    with pytest.raises(PermanentError) as info:
        await elsewhere.start()
    assert "REFUSED" in str(info.value) or "NOTAUTH" in str(info.value) or "no SOA" in str(info.value)
    with pytest.raises(PermanentError) as info:
        await elsewhere.register(make_host("h.elsewhere.example", (fresh_address(),)), {})
    assert any(rcode in str(info.value) for rcode in ("REFUSED", "NOTAUTH", "authoritative"))


async def test_names_and_addresses_outside_the_zones_are_permanent_errors(registrar: DnsRegistrar) -> None:
    with pytest.raises(PermanentError, match="not in zone lab.example"):
        await registrar.register(make_host("h.other.example", (fresh_address(),)), {})
    with pytest.raises(PermanentError, match="none of the reverse zones"):
        await registrar.register(make_host(fresh_name(), ("192.0.2.10",)), {})
    with pytest.raises(PermanentError, match="no address"):
        await registrar.register(make_host(fresh_name(), ()), {})


async def test_an_unreachable_server_is_retryable(dns_server: DnsServer, key_file: Any) -> None:
    down = DnsRegistrar(NAME, make_config(dns_server, key_file, port=closed_port(), timeout=1))
    host = make_host(fresh_name(), (fresh_address(),))
    for call in (down.start(), down.register(host, {}), down.deregister(host), down.lookup(host), down.list_owned()):
        with pytest.raises(RetryableError) as info:
            await call
        assert "unreachable" in str(info.value) and info.value.source == NAME


async def test_two_registrars_side_by_side(bind_server: DnsServer, powerdns_server: DnsServer, key_file: Any) -> None:
    """Two [registrars.*] sections of type dns, on two servers: each publishes the host."""
    first = DnsRegistrar("dns-bind", make_config(bind_server, key_file))
    second = DnsRegistrar("dns-pdns", make_config(powerdns_server, key_file, ttl=60))
    fqdn, v4 = fresh_name(), fresh_address()
    host = make_host(fqdn, (v4,))
    for registrar in (first, second):
        await registrar.register(host, {})
    for server in (bind_server, powerdns_server):
        assert ask(server, fqdn + ".", "A") == [v4] and ask(server, rev(v4), "PTR") == [fqdn + "."]
    ttl = dns.query.udp(dns.message.make_query(fqdn + ".", "A"), powerdns_server.address,
                        port=powerdns_server.port, timeout=3).answer[0].ttl
    assert ttl == 60
    await second.deregister(host)
    assert ask(powerdns_server, fqdn + ".", "A") == [] and ask(bind_server, fqdn + ".", "A") == [v4]
    await first.deregister(host)


async def test_an_update_the_server_refuses_is_permanent_with_its_rcode(registrar: DnsRegistrar) -> None:
    """The update itself refused (the reads went through): a zone the server does not hold."""
    update = dns.update.UpdateMessage("elsewhere.example.", keyring=registrar._key)
    update.replace("h.elsewhere.example.", 300, "A", "192.0.2.1")
    with pytest.raises(PermanentError) as info:
        await registrar._send(update, "records of h.elsewhere.example")
    assert "NOTAUTH" in str(info.value) or "REFUSED" in str(info.value)
    assert "elsewhere.example" in str(info.value)


async def test_a_leased_address_is_published_before_the_machine_exists(
        dns_server: DnsServer, registrar: DnsRegistrar) -> None:
    """prepare: the address from the pool, before provisioning; register then finds it made."""
    fqdn, leased = fresh_name(), fresh_address()
    planned = HostView(**{**make_host(fqdn, ()).__dict__, "address": leased, "state": HostState.REQUESTED})
    record = await registrar.prepare(planned, {})
    assert record == {"fqdn": fqdn, "addresses": [leased], "reverse": [rev(leased).rstrip(".")]}
    assert ask(dns_server, fqdn + ".", "A") == [leased] and ask(dns_server, rev(leased), "PTR") == [fqdn + "."]
    # the platform assigns nothing: nothing to do before the machine exists
    assert await registrar.prepare(make_host(fresh_name(), ()), {}) is None

    provisioned = HostView(**{**planned.__dict__, "addresses": (leased,), "registrations": {NAME: record}})
    assert await registrar.register(provisioned, {}) == record
    # a rollback before the machine was made: the leased address's records go too
    never_made = HostView(**{**planned.__dict__, "registrations": {NAME: record}})
    await registrar.deregister(never_made)
    assert ask(dns_server, fqdn + ".", "A") == [] and ask(dns_server, rev(leased), "PTR") == []


async def test_a_collision_found_before_the_machine_exists_fails_the_host_then(
        dns_server: DnsServer, registrar: DnsRegistrar) -> None:
    fqdn, leased, theirs = fresh_name(), fresh_address(), fresh_address()
    put(dns_server, FORWARD_ZONE, fqdn + ".", "A", theirs)
    planned = HostView(**{**make_host(fqdn, ()).__dict__, "address": leased})
    with pytest.raises(PermanentError, match=theirs):
        await registrar.prepare(planned, {})


async def test_deregistering_a_host_that_never_had_records_here_is_success(
        dns_server: DnsServer, registrar: DnsRegistrar) -> None:
    """A host outside the zone (its registration failed for it, and it is rolled back) or without
    an address: nothing to remove, nothing to find."""
    outside = make_host("h.other.example", (fresh_address(),))
    await registrar.deregister(outside)
    assert await registrar.lookup(outside) is None
    bare = make_host(fresh_name(), ())
    await registrar.deregister(bare)
    assert await registrar.lookup(bare) is None


async def test_a_registration_cut_short_is_completed(dns_server: DnsServer, registrar: DnsRegistrar) -> None:
    """kill -9 between the forward update and the reverse one: the forward records carry the
    host's marker, the PTR is missing; the step run again completes it."""
    fqdn, v4 = fresh_name(), fresh_address()
    host = make_host(fqdn, (v4,))
    update = dns.update.UpdateMessage(FORWARD_ZONE, keyring=registrar._key)
    update.replace(fqdn + ".", 300, "A", v4)
    update.replace(fqdn + ".", 300, "TXT", marker(host))
    assert dns.query.tcp(update, dns_server.address, port=dns_server.port, timeout=3).rcode() == dns.rcode.NOERROR
    await registrar.register(host, {})
    assert ask(dns_server, rev(v4), "PTR") == [fqdn + "."] and ask(dns_server, fqdn + ".", "A") == [v4]


async def test_a_change_made_between_reading_and_writing_is_not_overwritten(
        dns_server: DnsServer, registrar: DnsRegistrar) -> None:
    """The update's prerequisites are the sets as read: someone else's write in between fails it
    (retryable: the next try reads again and sees the collision)."""
    fqdn, ours, theirs = fresh_name(), fresh_address(), fresh_address()
    name = dns.name.from_text(fqdn + ".")
    state = await registrar._read(name, (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.TXT))
    put(dns_server, FORWARD_ZONE, fqdn + ".", "A", theirs)  # meanwhile
    update = registrar._update(dns.name.from_text(FORWARD_ZONE), state)
    update.replace(name, 300, dns.rdata.from_text("IN", "A", ours))
    with pytest.raises(RetryableError, match="changed since they were read"):
        await registrar._send(update, f"records of {fqdn}")
    assert ask(dns_server, fqdn + ".", "A") == [theirs]
    with pytest.raises(PermanentError, match="collision"):
        await registrar.register(make_host(fqdn, (ours,)), {})


async def test_a_server_that_does_not_answer_is_retryable_after_the_timeout(
        dns_server: DnsServer, key_file: Any) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        mute = DnsRegistrar(NAME, make_config(dns_server, key_file, port=port, timeout=0.5))
        with pytest.raises(RetryableError, match="unreachable: timed out"):
            await mute.register(make_host(fresh_name(), (fresh_address(),)), {})


async def test_without_reverse_zones_only_forward_records_are_made(dns_server: DnsServer, key_file: Any) -> None:
    forward_only = DnsRegistrar(NAME, make_config(dns_server, key_file, reverse_zones=[]))
    fqdn, v4 = fresh_name(), fresh_address()
    host = make_host(fqdn, (v4,))
    assert await forward_only.register(host, {}) == {"fqdn": fqdn, "addresses": [v4], "reverse": []}
    assert ask(dns_server, fqdn + ".", "A") == [v4] and ask(dns_server, rev(v4), "PTR") == []
    await forward_only.deregister(host)
    assert ask(dns_server, fqdn + ".", "A") == []


def ask_signed(server: DnsServer, name: str, rdtype: str) -> list[str]:
    """What a client with the view's key is told (a view answers only the clients it matches)."""
    query = dns.message.make_query(name, rdtype)
    query.use_tsig(dns.tsig.Key(server.key.name, server.key.secret, server.key.algorithm))
    answer = dns.query.tcp(query, server.address, port=server.port, timeout=3)
    return sorted(r.to_text() for rrset in answer.answer for r in rrset)


async def test_two_registrars_on_two_views_of_one_server(bind_views: list[DnsServer], key_file: Any) -> None:
    """Two [registrars.*] sections on one BIND, each with its view's key: each view gets the host's
    records, and removing them from one leaves the other's."""
    internal, external = bind_views
    inside = DnsRegistrar("dns-internal", make_config(internal, key_file))
    outside = DnsRegistrar("dns-external", make_config(external, key_file, reverse_zones=[]))
    fqdn, v4 = fresh_name(), fresh_address()
    host = make_host(fqdn, (v4,))
    for registrar in (inside, outside):
        await registrar.ensure_started()
        await registrar.register(host, {})
    assert ask_signed(internal, fqdn + ".", "A") == [v4] and ask_signed(internal, rev(v4), "PTR") == [fqdn + "."]
    assert ask_signed(external, fqdn + ".", "A") == [v4] and ask_signed(external, rev(v4), "PTR") == []
    assert {e.host_id for e in await outside.list_owned()} == {host.id}
    await outside.deregister(host)
    assert ask_signed(external, fqdn + ".", "A") == [] and ask_signed(internal, fqdn + ".", "A") == [v4]
    await inside.deregister(host)
    assert ask_signed(internal, fqdn + ".", "A") == []
