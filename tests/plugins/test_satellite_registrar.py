"""The Satellite registrar against the simulator process, checked from the other side.

Every effect is read back with a separate, plain ``xmlrpc.client`` session, the way an operator
would see it in Satellite: ``system.getId``, ``system.listGroups``, ``systemgroup.listSystems``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import ipaddress
import logging
import socket
import threading
import time
import uuid
import xmlrpc.client
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydantic
import pytest

from governord.errors import MissingAtPeer, PermanentError, RetryableError
from governord.models import HostOrigin, HostState, HostView
from governord.plugins.satellite import governord_register_registrars
from governord.plugins.satellite.registrar import (
    READ_ONLY_METHODS,
    SatelliteConfig,
    SatelliteRegistrar,
    SatelliteTagMapping,
)
from governord.registrars import RegistrarRegistry
from lab.faultproxy import FaultRates, FaultSettings, TryOutcome, describe_tries, one_try_each, set_proxy_rates
from lab.satellite_sim import SatelliteSimulator
from lab.stack import Lab
from tests.fixtures.satellite import DELETE_DELAY, SatelliteSim, start_satellite_sim

pytestmark = pytest.mark.integration

#: an API proxy (its results are untyped XML-RPC data) and a session key
Api = tuple[Any, str]

PASSWORD_ENV = "GOVERNORD_TEST_SATELLITE_PASSWORD"


def make_host(fqdn: str, host_id: str | None = None) -> HostView:
    """A host record as the engine hands it to registrars."""
    return HostView(
        id=host_id or str(uuid.uuid4()), name=fqdn.split(".")[0], fqdn=fqdn, app="openshift", role="node",
        origin=HostOrigin.PROVISIONED, state=HostState.REGISTERING, provider="lab", machine_id=None,
        tags=("node",), addresses=("192.0.2.10",), classification={}, registrations={},
    )


def make_registrar(url: str, monkeypatch: pytest.MonkeyPatch, password: str, **extra: Any) -> SatelliteRegistrar:
    """A registrar configured the way the config loader would build it."""
    monkeypatch.setenv(PASSWORD_ENV, password)
    config = SatelliteRegistrar.Config.model_validate(
        {"type": "satellite", "url": url, "username": "admin", "password": {"env": PASSWORD_ENV},
         "call_timeout": 10, **extra}
    )
    return SatelliteRegistrar("satellite", config)


@pytest.fixture
async def registrar(satellite_sim: SatelliteSim, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SatelliteRegistrar]:
    """A started registrar against the shared simulator."""
    reg = make_registrar(satellite_sim.url, monkeypatch, satellite_sim.password)
    await reg.start()
    yield reg
    await reg.close()


@pytest.fixture
def observer(satellite_sim: SatelliteSim) -> Iterator[Api]:
    """A separate API session to check the registrar's effects with."""
    proxy, key = satellite_sim.login()
    yield proxy, key
    proxy.auth.logout(key)


def subscribed(observer: Api, sid: int) -> set[str]:
    """Names of the groups a system is in."""
    proxy, key = observer
    return {g["system_group_name"] for g in proxy.system.listGroups(key, sid) if g["subscribed"]}


def members(observer: Api, group: str) -> set[int]:
    """Ids of a group's systems."""
    proxy, key = observer
    return {s["id"] for s in proxy.systemgroup.listSystems(key, group)}


NODE = {"groups": ["openshift-nodes"], "activation_key": "1-openshift-node"}


# -- pure parts ------------------------------------------------------------------------------


def test_plugin_registers_the_satellite_type() -> None:
    registry = RegistrarRegistry()
    governord_register_registrars(registry)
    # registered lazily: the config models are known, the class is imported when loaded
    entry = registry.get("satellite")
    assert entry is not None and entry.Config is SatelliteRegistrar.Config and entry.TagMapping is SatelliteRegistrar.TagMapping
    assert registry.load("satellite") is SatelliteRegistrar


def test_classify_unions_groups_in_tag_order_and_takes_the_first_key() -> None:
    config = SatelliteRegistrar.Config.model_validate(
        {"type": "satellite", "url": "https://sat.example/rpc/api", "username": "u", "password": {"env": "PATH"}}
    )
    reg = SatelliteRegistrar("satellite", config)
    mappings = [
        ("node", SatelliteTagMapping(system_group="openshift-nodes")),
        ("broker", SatelliteTagMapping(system_group="openshift-brokers", activation_key="1-openshift-broker")),
        ("monitored", SatelliteTagMapping(system_group="openshift-nodes", activation_key="1-other")),
    ]
    assert reg.classify(mappings) == {
        "groups": ["openshift-nodes", "openshift-brokers"], "activation_key": "1-openshift-broker",
    }
    assert reg.classify([]) == {"groups": [], "activation_key": None}


def test_config_is_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "s3cr3t-value")
    base = {"type": "satellite", "url": "https://sat.example/rpc/api", "username": "u", "password": {"env": PASSWORD_ENV}}
    config = SatelliteRegistrar.Config.model_validate(base)
    assert isinstance(config, SatelliteConfig)
    assert config.verify_tls is True and config.ca_file is None
    assert "s3cr3t-value" not in repr(config)
    for bad in ({"password": "inline-secret"}, {"url": "sat.example"}, {"colour": "blue"}):
        with pytest.raises(pydantic.ValidationError):
            SatelliteRegistrar.Config.model_validate({**base, **bad})
    with pytest.raises(pydantic.ValidationError):
        SatelliteTagMapping.model_validate({"system_group": "g", "hostgroup": "h"})


# -- register --------------------------------------------------------------------------------


async def test_register_creates_the_system_in_the_classified_groups(
    registrar: SatelliteRegistrar, observer: Api, satellite_name: str,
) -> None:
    host = make_host(satellite_name)
    record = await registrar.register(host, NODE)
    proxy, key = observer
    found = proxy.system.getId(key, host.fqdn)
    assert [s["id"] for s in found] == [record["id"]]
    assert record == {"id": record["id"], "groups": ["openshift-nodes"], "activation_key": "1-openshift-node"}
    assert subscribed(observer, record["id"]) == {"openshift-nodes"}
    assert record["id"] in members(observer, "openshift-nodes")
    assert proxy.system.getDetails(key, record["id"])["description"] == f"governord:host-id={host.id}"


async def test_an_application_never_sees_the_activation_key(
    registrar: SatelliteRegistrar, observer: Api, satellite_name: str,
) -> None:
    """Whoever holds the activation key can register any machine with the site's entitlements:
    neither the record nor the classification shows it to an application."""
    host = make_host(satellite_name)
    record = await registrar.register(host, NODE)
    proxy, key = observer
    assert [s["id"] for s in proxy.system.getId(key, host.fqdn)] == [record["id"]]
    assert record["activation_key"] == NODE["activation_key"]  # there to withhold
    assert SatelliteRegistrar.application_view(record) == {"id": record["id"], "groups": ["openshift-nodes"]}
    assert SatelliteRegistrar.application_view(NODE) == {"groups": ["openshift-nodes"]}


async def test_register_again_is_idempotent(
    registrar: SatelliteRegistrar, observer: Api, satellite_name: str,
) -> None:
    host = make_host(satellite_name)
    first = await registrar.register(host, NODE)
    second = await registrar.register(host, NODE)
    assert first == second
    proxy, key = observer
    assert len(proxy.system.getId(key, host.fqdn)) == 1
    assert subscribed(observer, first["id"]) == {"openshift-nodes"}


async def test_reclassification_moves_groups(
    registrar: SatelliteRegistrar, observer: Api, satellite_name: str,
) -> None:
    host = make_host(satellite_name)
    record = await registrar.register(host, NODE)
    moved = await registrar.register(
        host, {"groups": ["openshift-brokers", "openshift-masters"], "activation_key": "1-openshift-broker"}
    )
    assert moved["id"] == record["id"]
    assert subscribed(observer, record["id"]) == {"openshift-brokers", "openshift-masters"}
    assert record["id"] not in members(observer, "openshift-nodes")
    assert record["id"] in members(observer, "openshift-brokers")
    await registrar.register(host, {"groups": [], "activation_key": None})
    assert subscribed(observer, record["id"]) == set()


async def test_unknown_group_is_permanent_and_changes_nothing(
    registrar: SatelliteRegistrar, observer: Api, satellite_name: str,
) -> None:
    host = make_host(satellite_name)
    with pytest.raises(PermanentError) as info:
        await registrar.register(host, {"groups": ["openshift-nodes", "no-such-group"], "activation_key": None})
    assert "no-such-group" in str(info.value)
    assert not info.value.retryable and info.value.source == "satellite"
    proxy, key = observer
    assert proxy.system.getId(key, host.fqdn) == []


async def test_unknown_activation_key_is_permanent(registrar: SatelliteRegistrar, satellite_name: str) -> None:
    with pytest.raises(PermanentError) as info:
        await registrar.register(make_host(satellite_name), {"groups": [], "activation_key": "1-no-such-key"})
    assert isinstance(info.value, MissingAtPeer)
    assert "Satellite activation key '1-no-such-key' does not exist" in str(info.value)
    assert "(redstone.xmlrpc.XmlRpcFault: Activation Key [1-no-such-key] Not Found!)" in str(info.value)


async def test_several_systems_with_the_name_is_permanent(
    registrar: SatelliteRegistrar, observer: Api, satellite_name: str,
) -> None:
    proxy, key = observer
    proxy.system.createSystemProfile(key, satellite_name, {"hostname": satellite_name})
    proxy.system.createSystemProfile(key, satellite_name, {"hostname": "twin-" + satellite_name})
    with pytest.raises(PermanentError) as info:
        await registrar.register(make_host(satellite_name), NODE)
    assert "2 systems" in str(info.value)


async def test_system_owned_by_another_host_is_not_taken_over(
    registrar: SatelliteRegistrar, observer: Api, satellite_name: str,
) -> None:
    owner = make_host(satellite_name)
    record = await registrar.register(owner, NODE)
    intruder = make_host(satellite_name)
    with pytest.raises(PermanentError):
        await registrar.register(intruder, NODE)
    with pytest.raises(PermanentError):
        await registrar.deregister(intruder)
    proxy, key = observer
    assert proxy.system.getDetails(key, record["id"])["description"] == f"governord:host-id={owner.id}"


async def test_own_profile_renamed_by_someone_is_taken_back(
    registrar: SatelliteRegistrar, observer: Api, satellite_name: str,
) -> None:
    host = make_host(satellite_name)
    record = await registrar.register(host, NODE)
    proxy, key = observer
    proxy.system.setDetails(key, record["id"], {"profile_name": "renamed-" + satellite_name})
    again = await registrar.register(host, NODE)
    assert again["id"] == record["id"]
    assert proxy.system.getName(key, record["id"])["name"] == satellite_name


# -- names are not unique: empty profiles, registered machines, Spacewalk ------------------------


@pytest.fixture
def uyuni() -> Iterator[SatelliteSimulator]:
    """An in-process Uyuni simulator, so a test can have a machine register (``register_machine``)."""
    with SatelliteSimulator(username="admin", password="in-process-pw", delete_delay=0) as sim:
        yield sim


@pytest.fixture
def spacewalk() -> Iterator[SatelliteSimulator]:
    """An in-process simulator playing Spacewalk / Satellite 5 (no ``system.createSystemProfile``)."""
    with SatelliteSimulator(username="admin", password="in-process-pw", delete_delay=0, flavor="spacewalk") as sim:
        yield sim


def admin_api(sim: SatelliteSimulator) -> Api:
    proxy = xmlrpc.client.ServerProxy(sim.url)
    return proxy, proxy.auth.login("admin", "in-process-pw")


async def test_profile_renamed_after_the_machine_registered_is_found_by_its_recorded_id(
    uyuni: SatelliteSimulator, monkeypatch: pytest.MonkeyPatch, satellite_name: str,
) -> None:
    reg = make_registrar(uyuni.url, monkeypatch, "in-process-pw")
    proxy, key = admin_api(uyuni)
    try:
        host = make_host(satellite_name)
        record = await reg.register(host, NODE)
        # the machine registers into its empty profile under its own (short) name
        uyuni.state.register_machine(satellite_name, name=host.name)
        assert proxy.system.getId(key, satellite_name) == []
        # Uyuni would now make a second profile; the recorded id finds the first one again
        again = await reg.register(dataclasses.replace(host, registrations={"satellite": record}), NODE)
        assert again["id"] == record["id"]
        assert [s["id"] for s in proxy.system.getId(key, satellite_name)] == [record["id"]]
        assert subscribed((proxy, key), record["id"]) == {"openshift-nodes"}
        # renamed again, it is still found and deleted with the host
        proxy.system.setDetails(key, record["id"], {"profile_name": host.name})
        await reg.deregister(dataclasses.replace(host, registrations={"satellite": record}))
        assert fault_of_call(proxy.system.getDetails, key, record["id"]).faultCode == -208
    finally:
        await reg.close()


def fault_of_call(call: Any, *args: Any) -> xmlrpc.client.Fault:
    """The fault ``call(*args)`` raises."""
    with pytest.raises(xmlrpc.client.Fault) as info:
        call(*args)
    return info.value


async def test_of_several_profiles_of_one_name_the_ownership_marker_decides(
    uyuni: SatelliteSimulator, monkeypatch: pytest.MonkeyPatch, satellite_name: str,
) -> None:
    reg = make_registrar(uyuni.url, monkeypatch, "in-process-pw")
    proxy, key = admin_api(uyuni)
    try:
        host = make_host(satellite_name)
        record = await reg.register(host, NODE)
        uyuni.state.register_machine(satellite_name)
        # after the registration Uyuni accepts another profile of that name and hostname
        other = proxy.system.createSystemProfile(key, satellite_name, {"hostname": satellite_name})
        assert sorted(s["id"] for s in proxy.system.getId(key, satellite_name)) == sorted([record["id"], other])
        again = await reg.register(host, NODE)
        assert again["id"] == record["id"]
        assert (await reg.lookup(host) or {})["id"] == record["id"]
        assert proxy.system.getDetails(key, other)["description"] == ""  # the other is left alone
        assert subscribed((proxy, key), other) == set()
        # and so is it when the host goes
        await reg.deregister(host)
        assert [s["id"] for s in proxy.system.getId(key, satellite_name)] == [other]
    finally:
        await reg.close()


async def test_on_spacewalk_the_profile_comes_from_the_machine_registering_itself(
    spacewalk: SatelliteSimulator, monkeypatch: pytest.MonkeyPatch, satellite_name: str,
) -> None:
    reg = make_registrar(spacewalk.url, monkeypatch, "in-process-pw")
    proxy, key = admin_api(spacewalk)
    try:
        host = make_host(satellite_name)
        with pytest.raises(RetryableError) as info:
            await reg.register(host, NODE)
        assert "no system.createSystemProfile (Spacewalk or Satellite 5)" in str(info.value)
        assert "until the machine registers itself with activation key '1-openshift-node'" in str(info.value)
        assert proxy.system.getId(key, satellite_name) == []
        sid = spacewalk.state.register_machine(satellite_name, activation_key="1-openshift-node").id
        record = await reg.register(host, {"groups": ["openshift-brokers"], "activation_key": "1-openshift-node"})
        assert record["id"] == sid
        assert proxy.system.getDetails(key, sid)["description"] == f"governord:host-id={host.id}"
        # the key put it in openshift-nodes; the classification wants openshift-brokers only
        assert subscribed((proxy, key), sid) == {"openshift-brokers"}
        await reg.deregister(host)
        assert proxy.system.getId(key, satellite_name) == []
    finally:
        await reg.close()


# -- deregister and lookup -------------------------------------------------------------------


async def test_deregister_removes_and_twice_succeeds(
    registrar: SatelliteRegistrar, observer: Api, satellite_name: str,
) -> None:
    host = make_host(satellite_name)
    record = await registrar.register(host, NODE)
    await registrar.deregister(host)
    proxy, key = observer
    assert proxy.system.getId(key, host.fqdn) == []
    assert record["id"] not in members(observer, "openshift-nodes")
    await registrar.deregister(host)
    await registrar.deregister(make_host("never-registered-" + satellite_name))


async def test_deregister_waits_for_an_asynchronous_delete(
    registrar: SatelliteRegistrar, observer: Api, satellite_name: str,
) -> None:
    host = make_host(satellite_name)
    record = await registrar.register(host, NODE)
    proxy, key = observer
    proxy.system.deleteSystems(key, [record["id"]])  # someone else's bulk delete is still pending
    started = time.monotonic()
    await registrar.deregister(host)
    assert proxy.system.getId(key, host.fqdn) == []
    assert time.monotonic() - started < DELETE_DELAY + 5


# -- the API user's role ----------------------------------------------------------------------------


async def test_registrar_works_as_an_api_user_with_the_role_the_config_names(
    satellite_sim: SatelliteSim, observer: Api, monkeypatch: pytest.MonkeyPatch, satellite_name: str,
) -> None:
    # etc/governord.toml: the API user needs org_admin, nothing more; not the simulator's own admin
    login, password = satellite_sim.make_user(("org_admin",))
    reg = make_registrar(satellite_sim.url, monkeypatch, password, username=login)
    try:
        await reg.start()
        host = make_host(satellite_name)
        record = await reg.register(host, NODE)
        assert subscribed(observer, record["id"]) == {"openshift-nodes"}
        assert (await reg.lookup(host) or {})["id"] == record["id"]
        await reg.deregister(host)
        proxy, key = observer
        assert proxy.system.getId(key, satellite_name) == []
    finally:
        await reg.close()


async def test_api_user_without_org_admin_is_refused_at_start_naming_the_role(
    satellite_sim: SatelliteSim, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # with both narrower roles and every group it needs it still could not see the profiles it makes
    login, password = satellite_sim.make_user(
        ("system_group_admin", "activation_key_admin"), ("openshift-nodes", "openshift-brokers"),
    )
    reg = make_registrar(satellite_sim.url, monkeypatch, password, username=login)
    try:
        with pytest.raises(PermanentError) as info:
            await reg.start()
        message = str(info.value)
        assert f"Satellite API user '{login}' lacks the org_admin role (Organization Administrator)" in message
        assert "roles it has: activation_key_admin, system_group_admin" in message
    finally:
        await reg.close()


async def test_roles_taken_away_after_start_are_named_in_the_errors(
    satellite_sim: SatelliteSim, monkeypatch: pytest.MonkeyPatch, satellite_name: str,
) -> None:
    login, password = satellite_sim.make_user(("org_admin",))
    reg = make_registrar(satellite_sim.url, monkeypatch, password, username=login)
    admin, admin_key = satellite_sim.login()
    try:
        await reg.start()
        admin.user.removeRole(admin_key, login, "org_admin")
        # the key exists, but Uyuni answers it as not found to a user without activation_key_admin
        with pytest.raises(MissingAtPeer) as key_info:
            await reg.register(make_host(satellite_name), {"groups": [], "activation_key": "1-openshift-node"})
        assert f"API user '{login}' lacks the activation_key_admin role (Activation Key Administrator)" in str(
            key_info.value
        )
        assert "Activation Key [1-openshift-node] Not Found!" in str(key_info.value)
        admin.user.addRole(admin_key, login, "activation_key_admin")
        with pytest.raises(MissingAtPeer) as group_info:
            await reg.register(make_host(satellite_name), NODE)
        assert "without the org_admin role (Organization Administrator) it sees only the groups it administers" in (
            str(group_info.value)
        )
        assert admin.system.getId(admin_key, satellite_name) == []
    finally:
        await reg.close()
        admin.auth.logout(admin_key)


async def test_lookup(registrar: SatelliteRegistrar, satellite_name: str) -> None:
    host = make_host(satellite_name)
    assert await registrar.lookup(host) is None
    record = await registrar.register(host, NODE)
    assert await registrar.lookup(host) == {
        "id": record["id"], "name": satellite_name, "groups": ["openshift-nodes"],
        "description": f"governord:host-id={host.id}",
    }
    await registrar.deregister(host)
    assert await registrar.lookup(host) is None


async def test_concurrent_calls_share_one_session(registrar: SatelliteRegistrar, satellite_name: str) -> None:
    hosts = [make_host(f"c{i}-{satellite_name}") for i in range(6)]
    records = await asyncio.gather(*(registrar.register(h, NODE) for h in hosts))
    assert len({r["id"] for r in records}) == len(hosts)
    await asyncio.gather(*(registrar.deregister(h) for h in hosts))


# -- failures --------------------------------------------------------------------------------


async def test_wrong_password_is_permanent_with_the_fault_text(
    satellite_sim: SatelliteSim, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reg = make_registrar(satellite_sim.url, monkeypatch, "not-the-password")
    with pytest.raises(PermanentError) as info:
        await reg.start()
    assert "Either the password or username is incorrect." in str(info.value)
    assert "2950" in str(info.value)
    assert "not-the-password" not in str(info.value)


async def test_session_expiry_is_handled_by_logging_in_again(
    monkeypatch: pytest.MonkeyPatch, satellite_name: str,
) -> None:
    sim = start_satellite_sim(session_lifetime=0.5, session_purge_interval=0.2)
    reg = make_registrar(sim.url, monkeypatch, sim.password)
    try:
        await reg.start()
        first_key = reg._session
        await asyncio.sleep(2.0)  # the session expires unused and the cleanup deletes it
        record = await reg.register(make_host(satellite_name), NODE)
        assert reg._session is not None and reg._session != first_key
        proxy, key = sim.login()
        assert [s["id"] for s in proxy.system.getId(key, satellite_name)] == [record["id"]]
        await reg.close()
    finally:
        sim.stop()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_simulator_down_is_retryable(monkeypatch: pytest.MonkeyPatch, satellite_name: str) -> None:
    reg = make_registrar(f"http://127.0.0.1:{free_port()}/rpc/api", monkeypatch, "pw")
    with pytest.raises(RetryableError):
        await reg.start()
    # ... and a server that goes away after login
    sim = start_satellite_sim()
    reg = make_registrar(sim.url, monkeypatch, sim.password)
    await reg.start()
    sim.stop()
    with pytest.raises(RetryableError):
        await reg.register(make_host(satellite_name), NODE)
    with pytest.raises(RetryableError):
        await reg.deregister(make_host(satellite_name))
    await reg.close()


class _Unavailable(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_error(503, "Service Unavailable")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


async def test_server_errors_are_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        reg = make_registrar(f"http://127.0.0.1:{server.server_address[1]}/rpc/api", monkeypatch, "pw")
        with pytest.raises(RetryableError) as info:
            await reg.start()
        assert "503" in str(info.value)
    finally:
        server.shutdown()
        server.server_close()


async def test_wrong_path_is_permanent(satellite_sim: SatelliteSim, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = make_registrar(satellite_sim.url.replace("/rpc/api", "/rpc/wrong"), monkeypatch, satellite_sim.password)
    with pytest.raises(PermanentError) as info:
        await reg.start()
    assert "404" in str(info.value)


# -- TLS -------------------------------------------------------------------------------------


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (PEM cert, PEM key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "satellite-sim")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "sim.pem", directory / "sim.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_https_verifies_the_server_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, satellite_name: str,
) -> None:
    cert, key = self_signed_cert(tmp_path)
    sim = start_satellite_sim(tls=(cert, key))
    try:
        assert sim.url.startswith("https://127.0.0.1:")
        untrusted = make_registrar(sim.url, monkeypatch, sim.password)
        with pytest.raises(PermanentError) as info:
            await untrusted.start()
        assert "not trusted" in str(info.value)

        host = make_host(satellite_name)
        trusted = make_registrar(sim.url, monkeypatch, sim.password, ca_file=str(cert))
        await trusted.start()
        record = await trusted.register(host, NODE)
        assert record["groups"] == ["openshift-nodes"]
        await trusted.close()

        unverified = make_registrar(sim.url, monkeypatch, sim.password, verify_tls=False)
        await unverified.start()
        await unverified.deregister(host)
        assert await unverified.lookup(host) is None
        await unverified.close()
    finally:
        sim.stop()


# -- the sweep: listing what carries the marker, removing one profile by its id -------------------


async def test_list_owned_finds_every_marked_profile_and_nothing_else(
    registrar: SatelliteRegistrar, observer: Api, satellite_name: str,
) -> None:
    ours = make_host(satellite_name)
    record = await registrar.register(ours, NODE)
    proxy, key = observer
    orphan_of = str(uuid.uuid4())
    orphan_sid = proxy.system.createSystemProfile(key, "orphan-" + satellite_name, {"hostname": "orphan-" + satellite_name})
    proxy.system.setDetails(key, orphan_sid, {"description": f"governord:host-id={orphan_of}"})
    plain_sid = proxy.system.createSystemProfile(key, "plain-" + satellite_name, {"hostname": "plain-" + satellite_name})
    proxy.system.setDetails(key, plain_sid, {"description": "built by hand"})

    listed = {int(entry.entry_id): entry for entry in await registrar.list_owned()}
    assert listed[record["id"]].host_id == ours.id and listed[record["id"]].name == satellite_name
    assert listed[orphan_sid].host_id == orphan_of and listed[orphan_sid].system == "satellite"
    assert plain_sid not in listed


async def test_remove_owned_deletes_exactly_that_profile_while_it_carries_the_marker(
    registrar: SatelliteRegistrar, observer: Api, satellite_name: str,
) -> None:
    proxy, key = observer
    orphan_of = str(uuid.uuid4())
    sid = proxy.system.createSystemProfile(key, satellite_name, {"hostname": satellite_name})
    proxy.system.setDetails(key, sid, {"description": f"governord:host-id={orphan_of}"})
    [entry] = [e for e in await registrar.list_owned() if e.entry_id == str(sid)]

    # re-marked for another host between listing and removal: left alone
    proxy.system.setDetails(key, sid, {"description": f"governord:host-id={uuid.uuid4()}"})
    assert await registrar.remove_owned(entry) is False
    assert proxy.system.getDetails(key, sid)["id"] == sid

    proxy.system.setDetails(key, sid, {"description": f"governord:host-id={orphan_of}"})
    assert await registrar.remove_owned(entry) is True
    with pytest.raises(xmlrpc.client.Fault) as gone:
        proxy.system.getDetails(key, sid)
    assert gone.value.faultCode == -208
    assert await registrar.remove_owned(entry) is False


# -- call-level retries, through the fault proxy ---------------------------------------------------

FAULT_RATE = 0.2
FAULT_TRIES = 12


async def test_one_register_try_survives_faults_on_reads_and_repeats_no_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Behind the fault proxy (20% of requests: 502/503/504, held past the timeout, or cut, before
    or after Satellite acted), a register try survives faults on its read-only calls, which are
    repeated; a faulted create or change fails the try retryably and is not repeated (all calls
    are POSTs to the proxy, so which ones were repeated is read from the registrar's own log).
    Without call-level retries (``call_tries = 1``) any fault fails the try. Step-level tries
    then finish every host: each profile exists once."""
    settings = FaultSettings(rates=FaultRates(), seed=5, slow_seconds=1.5, client_timeout=1.0)
    caplog.set_level(logging.INFO, logger="governord.plugins.satellite.registrar")
    with Lab(tmp_path / "lab", faults=settings) as lab:
        peer = lab.start_satellite()
        proxy = lab.fronts[peer.url]

        def registrar(tries: int) -> SatelliteRegistrar:
            return make_registrar(proxy.url, monkeypatch, lab.passwords["LAB_SATELLITE_PASSWORD"],
                                  call_timeout=settings.client_timeout, call_tries=tries, call_backoff=0.1)

        results: dict[int, list[TryOutcome]] = {}
        hosts: list[HostView] = []
        for tries in (1, 3):
            reg = registrar(tries)
            set_proxy_rates(proxy, FaultRates())
            await reg.start()
            set_proxy_rates(proxy, FaultRates.spread(FAULT_RATE))
            batch = [make_host(f"fault-{tries}-{i:02d}-{uuid.uuid4().hex[:6]}.lab.example") for i in range(FAULT_TRIES)]
            hosts += batch
            results[tries] = await one_try_each(proxy, [functools.partial(reg.register, host, NODE) for host in batch],
                                                (RetryableError, PermanentError))
            set_proxy_rates(proxy, FaultRates())
            await reg.close()
        print(describe_tries(f"\none register try each, {FAULT_TRIES} hosts, {FAULT_RATE:.0%} faults:", results))

        # without call-level retries a try fails exactly when one of its requests is faulted
        assert all(ok == (not faults) for ok, faults, _ in results[1]), results[1]
        # with them: tries survived faults (on reads, the only calls repeated), and no failure is
        # permanent (a create made twice would be refused: "systems exist" with that hostname)
        assert any(ok and faults for ok, faults, _ in results[3]), results[3]
        assert all(error is None or isinstance(error, RetryableError) for _, _, error in results[3]), results[3]
        repeated = {r.args[1] for r in caplog.records if "failed in transit" in r.getMessage()}
        assert repeated and repeated <= READ_ONLY_METHODS, repeated

        # step-level tries finish the rest
        reg = registrar(3)
        await reg.start()
        set_proxy_rates(proxy, FaultRates.spread(FAULT_RATE))
        for host in hosts:
            for _ in range(30):
                try:
                    await reg.register(host, NODE)
                    break
                except RetryableError:
                    continue
            else:
                pytest.fail(f"{host.fqdn} not registered in 30 tries")
        set_proxy_rates(proxy, FaultRates())
        await reg.close()

        # asked past the proxy: each host's profile once, marked as its own, in its group
        direct = xmlrpc.client.ServerProxy(peer.url)
        key = direct.auth.login("admin", lab.passwords["LAB_SATELLITE_PASSWORD"])
        try:
            names = [s["name"] for s in direct.system.listSystems(key)]
            assert sorted(names) == sorted(h.fqdn for h in hosts)
            for host in hosts:
                [system] = direct.system.getId(key, host.fqdn)
                assert direct.system.getDetails(key, system["id"])["description"] == f"governord:host-id={host.id}"
                assert subscribed((direct, key), system["id"]) == {"openshift-nodes"}
        finally:
            direct.auth.logout(key)


# -- health: the probe, and what the tags name -----------------------------------------------------


async def test_check_mappings_names_each_missing_group_and_key_and_nothing_that_exists(
        registrar: SatelliteRegistrar) -> None:
    mappings = {
        "node": SatelliteTagMapping(system_group="openshift-nodes", activation_key="1-openshift-node"),
        "typo": SatelliteTagMapping(system_group="openshift-node", activation_key="1-openshift-nodes"),
        "groups-only": SatelliteTagMapping(system_group="openshift-brokers"),
    }
    found = await registrar.check_mappings(mappings)
    assert set(found) == {("typo", "system_group"), ("typo", "activation_key")}
    assert "'openshift-node' does not exist" in found[("typo", "system_group")]
    assert "'1-openshift-nodes' does not exist" in found[("typo", "activation_key")]


async def test_probe_is_one_authenticated_call(satellite_sim: SatelliteSim, monkeypatch: pytest.MonkeyPatch) -> None:
    good = make_registrar(satellite_sim.url, monkeypatch, satellite_sim.password)
    bad = make_registrar(satellite_sim.url, monkeypatch, "not-the-password")
    try:
        assert await good.probe() is True
        with pytest.raises(PermanentError, match="2950"):
            await bad.probe()
    finally:
        await good.close()
        await bad.close()
