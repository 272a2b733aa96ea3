"""The oVirt provider against the engine simulator, checked from the other side with its own
ovirtsdk4 connection: what exists on the engine, not what the provider says about it."""

from __future__ import annotations

import ipaddress
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import ovirtsdk4
import pytest
from ovirtsdk4 import types

from governord.errors import PermanentError, RetryableError
from governord.models import MachineSpec, NetworkAssignment, PowerState
from governord.plugins.ovirt import governord_register_providers
from governord.plugins.ovirt.provider import OVirtProvider, host_id_of, marker
from governord.providers import ProviderRegistry
from lab.ovirt_sim import AUTH_KEY, OVirtSimServer, Timing, default_seed, expire_tokens
from lab.vcsim import TLSFiles
from tests.fixtures.ovirt import OVirtEngine, launch_ovirt_sim

pytestmark = pytest.mark.integration

PASSWORD_ENV = "OVIRT_PASSWORD"
MIB = 1024 * 1024


def make_provider(engine: OVirtEngine, monkeypatch: pytest.MonkeyPatch, password: str | None = None,
                  **overrides: Any) -> OVirtProvider:
    monkeypatch.setenv(PASSWORD_ENV, engine.password if password is None else password)
    config = OVirtProvider.Config.model_validate(engine.provider_config(PASSWORD_ENV, **overrides))
    return OVirtProvider("rhv", config)


@pytest.fixture
async def provider(ovirt_engine: OVirtEngine, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OVirtProvider]:
    instance = make_provider(ovirt_engine, monkeypatch)
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
def peer(ovirt_engine: OVirtEngine) -> Iterator[Any]:
    """A separate ovirtsdk4 connection to the same engine: the other side."""
    connection = ovirt_engine.connection()
    try:
        yield connection.system_service()
    finally:
        connection.close()


@pytest.fixture
def spec_factory(ovirt_engine: OVirtEngine) -> Callable[..., MachineSpec]:
    counter = iter(range(100, 250))

    def factory(*, static: bool = True, **profile: Any) -> MachineSpec:
        n = next(counter)
        hostname = f"node-{uuid.uuid4().hex[:8]}"
        network = (
            NetworkAssignment(address=f"198.51.100.{n}", prefix_length=24, gateway="198.51.100.1",
                              dns_servers=("198.51.100.2",), domain="lab.example")
            if static
            else NetworkAssignment(domain="lab.example")
        )
        return MachineSpec(
            host_id=str(uuid.uuid4()),
            hostname=hostname,
            fqdn=f"{hostname}.lab.example",
            profile={"template": ovirt_engine.template, **profile},
            network=network,
        )

    return factory


def named(peer: Any, name: str) -> list[types.Vm]:
    return [vm for vm in peer.vms_service().list(search=f"name={name}") if vm.name == name]


def wait_down(peer: Any, vm_id: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while peer.vms_service().vm_service(vm_id).get().status is not types.VmStatus.DOWN:
        assert time.monotonic() < deadline, "the VM did not settle down"
        time.sleep(0.02)


# -- create, seen from the other side --------------------------------------------------------------


async def test_create_is_seen_by_the_engine(
    provider: OVirtProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory(memory_mb=3072, cpus=3)
    machine = await provider.create_or_find(spec)
    ready = await provider.wait_ready(machine, 10)

    [vm] = named(peer, spec.hostname)
    assert vm.id == machine.machine_id == ready.machine_id
    assert vm.status is types.VmStatus.UP
    assert vm.comment == marker(spec.host_id) == f"governord:host-id={spec.host_id}"
    assert host_id_of(vm) == spec.host_id
    [template] = peer.templates_service().list(search="name=rhel9-template")
    assert vm.template.id == template.id
    assert vm.memory == 3072 * MIB
    # guaranteed memory kept from the template (1 GiB), max raised to cover the new size
    assert vm.memory_policy.guaranteed == 1024 * MIB and vm.memory_policy.max >= 3072 * MIB
    assert vm.cpu.topology.sockets == 3
    assert vm.fqdn == spec.fqdn
    assert ready.addresses == (spec.network.address,)
    assert ready.power is PowerState.ON
    assert [m.machine_id for m in await provider.list_owned() if m.host_id == spec.host_id] == [vm.id]

    await provider.destroy(spec.host_id)
    with pytest.raises(ovirtsdk4.NotFoundError):
        peer.vms_service().vm_service(vm.id).get()
    assert named(peer, spec.hostname) == []


async def test_a_dhcp_guest_is_ready_with_the_engines_address(
    provider: OVirtProvider, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory(static=False)
    machine = await provider.create_or_find(spec)
    try:
        ready = await provider.wait_ready(machine, 10)
        assert ready.addresses and ready.addresses[0].startswith("192.0.2.")
    finally:
        await provider.destroy(spec.host_id)


async def test_create_twice_makes_one_vm(
    provider: OVirtProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    try:
        first = await provider.create_or_find(spec)
        second = await provider.create_or_find(spec)
        assert first.machine_id == second.machine_id
        assert [vm.id for vm in named(peer, spec.hostname)] == [first.machine_id]
    finally:
        await provider.destroy(spec.host_id)


async def test_a_marked_vm_left_down_by_a_crash_is_started_not_duplicated(
    provider: OVirtProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    # what a crash right after "add" leaves behind: the marked VM, never started
    orphan = peer.vms_service().add(types.Vm(
        name=spec.hostname, cluster=types.Cluster(name="Default"), template=types.Template(name="rhel9-template"),
        comment=marker(spec.host_id)))
    wait_down(peer, orphan.id)
    try:
        machine = await provider.create_or_find(spec)
        assert machine.machine_id == orphan.id
        assert machine.power is PowerState.ON
        ready = await provider.wait_ready(machine, 10)
        assert ready.addresses == (spec.network.address,)
        assert [vm.id for vm in named(peer, spec.hostname)] == [orphan.id]
    finally:
        await provider.destroy(spec.host_id)


async def test_a_marked_vm_still_image_locked_is_waited_for(
    provider: OVirtProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    orphan = peer.vms_service().add(types.Vm(
        name=spec.hostname, cluster=types.Cluster(name="Default"), template=types.Template(name="rhel9-template"),
        comment=marker(spec.host_id)))
    assert orphan.status is types.VmStatus.IMAGE_LOCKED
    try:
        machine = await provider.create_or_find(spec)
        assert machine.machine_id == orphan.id and machine.power is PowerState.ON
    finally:
        await provider.destroy(spec.host_id)


async def test_a_name_taken_by_a_foreign_vm_is_permanent(
    provider: OVirtProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    foreign = peer.vms_service().add(types.Vm(
        name=spec.hostname, cluster=types.Cluster(name="Default"), template=types.Template(name="Blank")))
    try:
        with pytest.raises(PermanentError, match="The VM name is already in use"):
            await provider.create_or_find(spec)
        assert [vm.id for vm in named(peer, spec.hostname)] == [foreign.id]
    finally:
        peer.vms_service().vm_service(foreign.id).remove()


async def test_destroy_stops_a_running_vm_made_outside(
    provider: OVirtProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    vm = peer.vms_service().add(types.Vm(
        name=spec.hostname, cluster=types.Cluster(name="Default"), template=types.Template(name="rhel9-template"),
        comment=marker(spec.host_id)))
    wait_down(peer, vm.id)
    peer.vms_service().vm_service(vm.id).start()
    await provider.destroy(spec.host_id)
    with pytest.raises(ovirtsdk4.NotFoundError):
        peer.vms_service().vm_service(vm.id).get()
    assert await provider.find(spec.host_id) is None


# -- races with other clients and the engine (an in-process engine, whose state the test drives) ----


@pytest.fixture
async def inproc(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[OVirtSimServer, OVirtProvider, Any]]:
    """An engine in this process, a provider on it, and a separate connection (the other side)."""
    with OVirtSimServer(default_seed(), "governord@internal", "pw", timing=Timing.scaled(0.01)) as server:
        monkeypatch.setenv(PASSWORD_ENV, "pw")
        config = OVirtProvider.Config.model_validate({
            "type": "ovirt", "url": server.url, "username": "governord@internal",
            "password": {"env": PASSWORD_ENV}, "cluster": "Default", "ready_timeout": 5.0,
        })
        instance = OVirtProvider("inproc", config)
        await instance.start()
        other = ovirtsdk4.Connection(url=server.url, username="governord@internal", password="pw")
        try:
            yield server, instance, other.system_service()
        finally:
            other.close()
            await instance.close()


def marked_vm(system: Any, host_id: str, template: str = "Blank", name: str | None = None) -> types.Vm:
    return system.vms_service().add(types.Vm(
        name=name or f"race-{uuid.uuid4().hex[:8]}", cluster=types.Cluster(name="Default"),
        template=types.Template(name=template), comment=marker(host_id)))


@pytest.mark.parametrize(("action", "running"), [("stop", True), ("remove", False)])
async def test_destroy_treats_a_vm_removed_before_its_action_as_gone(
    inproc: tuple[OVirtSimServer, OVirtProvider, Any], action: str, running: bool,
) -> None:
    """Someone removes the VM between the provider's read and its stop (the engine answers 400
    "VM is not found"), or its removal (404): gone either way."""
    server, provider, other = inproc
    host_id = str(uuid.uuid4())
    vm = marked_vm(other, host_id)
    if running:
        other.vms_service().vm_service(vm.id).start()
    raced: list[str] = []

    def removed_by_someone_else(state: Any, vm_id: str) -> None:
        raced.append(vm_id)
        state.forget(vm_id)

    server.state.before(action, removed_by_someone_else)
    await provider.destroy(host_id)
    assert raced == [vm.id]
    assert vm.id not in server.state.vms
    assert await provider.find(host_id) is None


async def test_destroy_of_a_vm_that_went_down_by_itself(
    inproc: tuple[OVirtSimServer, OVirtProvider, Any],
) -> None:
    server, provider, other = inproc
    host_id = str(uuid.uuid4())
    vm = marked_vm(other, host_id)
    other.vms_service().vm_service(vm.id).start()

    # the guest powers itself off just before the stop arrives: the engine skips the stop, no error
    server.state.before("stop", lambda state, vm_id: state.set_status(vm_id, types.VmStatus.DOWN))
    await provider.destroy(host_id)
    assert vm.id not in server.state.vms


# -- statuses only the hosts produce ------------------------------------------------------------


def dhcp_spec(template: str = "rhel9-template") -> MachineSpec:
    hostname = f"node-{uuid.uuid4().hex[:8]}"
    return MachineSpec(host_id=str(uuid.uuid4()), hostname=hostname, fqdn=f"{hostname}.lab.example",
                       profile={"template": template}, network=NetworkAssignment(domain="lab.example"))


async def test_a_launch_that_falls_back_to_down_is_retryable_at_once(
    inproc: tuple[OVirtSimServer, OVirtProvider, Any],
) -> None:
    server, provider, other = inproc
    spec = dhcp_spec()
    server.state.before("start", lambda state, vm_id: state.fail_next_launch(vm_id))
    machine = await provider.create_or_find(spec)
    started = time.monotonic()
    with pytest.raises(RetryableError, match="could not launch"):
        await provider.wait_ready(machine, 10.0)
    assert time.monotonic() - started < 3.0, "the provider waited for a VM that was down again"
    assert other.vms_service().vm_service(machine.machine_id).get().status is types.VmStatus.DOWN
    # the retry starts the same VM again, and this time it comes up
    again = await provider.create_or_find(spec)
    assert again.machine_id == machine.machine_id
    ready = await provider.wait_ready(again, 10.0)
    assert ready.addresses and ready.power is PowerState.ON


async def test_wait_ready_waits_out_what_the_engine_recovers_from(
    inproc: tuple[OVirtSimServer, OVirtProvider, Any],
) -> None:
    server, provider, other = inproc
    machine = await provider.create_or_find(dhcp_spec())
    # the host stops answering, the engine finds the VM paused on an I/O error, then resumes it
    server.state.set_status(machine.machine_id, types.VmStatus.NOT_RESPONDING, then=[
        (0.2, types.VmStatus.UNKNOWN), (0.2, types.VmStatus.PAUSED), (0.2, types.VmStatus.MIGRATING),
        (0.2, types.VmStatus.UP)])
    assert await provider.power_state(machine.machine_id) is PowerState.UNKNOWN
    ready = await provider.wait_ready(machine, 10.0)
    assert ready.power is PowerState.ON and ready.addresses
    assert other.vms_service().vm_service(machine.machine_id).get().status is types.VmStatus.UP


async def test_a_start_that_someone_else_made_first_is_no_failure(
    inproc: tuple[OVirtSimServer, OVirtProvider, Any],
) -> None:
    server, provider, other = inproc
    spec = dhcp_spec()
    # another client starts the VM between the provider's read and its start: the engine refuses
    # the second run with its status ("...because the VM is in Wait for Launch status.")
    server.state.before("start", lambda state, vm_id: state.start_vm(vm_id, types.Action()))
    machine = await provider.create_or_find(spec)
    assert machine.power is PowerState.ON
    assert (await provider.wait_ready(machine, 10.0)).addresses


async def test_a_start_on_a_host_that_does_not_answer_is_retryable(
    inproc: tuple[OVirtSimServer, OVirtProvider, Any],
) -> None:
    server, provider, other = inproc
    spec = dhcp_spec()
    server.state.before("start", lambda state, vm_id: state.set_status(vm_id, types.VmStatus.NOT_RESPONDING))
    with pytest.raises(RetryableError, match="Not Responding"):
        await provider.create_or_find(spec)


async def test_a_start_refused_in_a_passing_status_is_retryable(
    inproc: tuple[OVirtSimServer, OVirtProvider, Any],
) -> None:
    server, provider, other = inproc
    spec = dhcp_spec()
    # someone else stops the VM after starting it, between the provider's read and its start
    server.state.before("start", lambda state, vm_id: state.set_status(
        vm_id, types.VmStatus.POWERING_DOWN, then=[(0.2, types.VmStatus.DOWN)]))
    with pytest.raises(RetryableError, match="Powering Down"):
        await provider.create_or_find(spec)
    machine = await provider.create_or_find(spec)  # the retry: settled down, started
    assert (await provider.wait_ready(machine, 10.0)).addresses


async def test_destroy_of_a_vm_in_status_unknown_is_retryable_then_succeeds(
    inproc: tuple[OVirtSimServer, OVirtProvider, Any],
) -> None:
    server, provider, other = inproc
    host_id = str(uuid.uuid4())
    vm = marked_vm(other, host_id)
    other.vms_service().vm_service(vm.id).start()
    server.state.set_status(vm.id, types.VmStatus.UNKNOWN)
    started = time.monotonic()
    with pytest.raises(RetryableError, match="status unknown"):
        await provider.destroy(host_id)
    assert time.monotonic() - started < 3.0
    assert other.vms_service().vm_service(vm.id).get().status is types.VmStatus.UNKNOWN
    # the host answers again and reports the VM not responding: now it can be stopped and removed
    server.state.set_status(vm.id, types.VmStatus.NOT_RESPONDING)
    await provider.destroy(host_id)
    assert vm.id not in server.state.vms


async def test_every_reported_address_but_link_local_ones_ipv4_first(
    inproc: tuple[OVirtSimServer, OVirtProvider, Any],
) -> None:
    server, provider, other = inproc
    server.state.ipv6_network = ipaddress.IPv6Network("2001:db8:7::/64")
    # the guest reports its link-local IPv6 address a while before its IPv4 one: not yet ready
    server.state.timing.address = 0.5
    machine = await provider.create_or_find(dhcp_spec())
    ready = await provider.wait_ready(machine, 10.0)
    service = other.vms_service().vm_service(machine.machine_id)
    [eth0] = service.reported_devices_service().list()
    v4, global_v6, link_local = (ip.address for ip in eth0.ips)
    assert ipaddress.ip_address(link_local).is_link_local
    assert ipaddress.ip_address(global_v6) in ipaddress.ip_network("2001:db8:7::/64")
    assert ready.addresses == (v4, global_v6)
    # a second device with more addresses: all of them, IPv4 first, link-local ones left out
    server.state.report_nic(machine.machine_id, "eth1", ["fd00::7", "fe80::1:7", "10.20.0.7"])
    found = await provider.find(machine.host_id or "")
    assert found is not None and found.addresses == (v4, "10.20.0.7", global_v6, "fd00::7")


# -- search ----------------------------------------------------------------------------------------


async def test_a_marker_in_another_case_is_found_by_the_engine_but_not_owned(
    inproc: tuple[OVirtSimServer, OVirtProvider, Any],
) -> None:
    server, provider, other = inproc
    host_id = str(uuid.uuid4())
    foreign = other.vms_service().add(types.Vm(
        name=f"shout-{host_id[:8]}", cluster=types.Cluster(name="Default"), template=types.Template(name="Blank"),
        comment=marker(host_id).upper()))
    # the engine's search ignores case by default: the provider's own query returns this VM...
    assert [vm.id for vm in other.vms_service().list(search=f"comment=*{host_id}")] == [foreign.id]
    # ...and the provider decides on the exact marker
    assert await provider.find(host_id) is None
    assert foreign.id not in {m.machine_id for m in await provider.list_owned()}
    await provider.destroy(host_id)
    assert other.vms_service().vm_service(foreign.id).get().status is types.VmStatus.DOWN


async def test_of_two_vms_with_one_marker_the_oldest_is_used_whatever_the_engines_order(
    inproc: tuple[OVirtSimServer, OVirtProvider, Any],
) -> None:
    server, provider, other = inproc
    host_id = str(uuid.uuid4())
    older = marked_vm(other, host_id, name=f"zz-{host_id[:8]}")
    newer = marked_vm(other, host_id, name=f"aa-{host_id[:8]}")
    # the engine answers in name order: the newer VM first
    assert [vm.id for vm in other.vms_service().list(search=f"comment=*{host_id}")] == [newer.id, older.id]
    found = await provider.find(host_id)
    assert found is not None and found.machine_id == older.id
    await provider.destroy(host_id)
    assert older.id not in server.state.vms and newer.id not in server.state.vms


# -- SSO sessions ----------------------------------------------------------------------------------


async def test_an_expired_token_is_replaced_and_a_refused_login_is_permanent(
    inproc: tuple[OVirtSimServer, OVirtProvider, Any],
) -> None:
    server, provider, other = inproc
    auth = server.app[AUTH_KEY]
    spec = dhcp_spec()
    machine = await provider.create_or_find(spec)
    issued = auth["issued"]
    expired = expire_tokens(server.app)
    # the engine forgot the session: ovirtsdk4 logs in again on the 401 and repeats the request
    found = await provider.find(spec.host_id)
    assert found is not None and found.machine_id == machine.machine_id
    assert auth["issued"] == issued + 1
    assert set(expired) <= set(auth["expired"])
    expire_tokens(server.app)
    await provider.destroy(spec.host_id)  # actions (POST, DELETE) are repeated too
    assert machine.machine_id not in server.state.vms
    # the session ends and the password was changed meanwhile: no retry will help
    expire_tokens(server.app)
    auth["password"] = "rotated"
    with pytest.raises(PermanentError, match="(?i)username or password"):
        await provider.find(spec.host_id)


# -- errors -----------------------------------------------------------------------------------


async def test_the_engines_fault_is_kept_for_a_missing_template(
    provider: OVirtProvider, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    bad = MachineSpec(**{**spec.__dict__, "profile": {"template": "no-such-template"}})
    with pytest.raises(PermanentError, match="Entity not found: Template: name=no-such-template") as caught:
        await provider.create_or_find(bad)
    assert caught.value.source == "rhv"


async def test_a_missing_cluster_is_permanent(
    ovirt_engine: OVirtEngine, monkeypatch: pytest.MonkeyPatch, spec_factory: Callable[..., MachineSpec]
) -> None:
    instance = make_provider(ovirt_engine, monkeypatch, cluster="Elsewhere")
    try:
        with pytest.raises(PermanentError, match="Entity not found: Cluster: name=Elsewhere"):
            await instance.create_or_find(spec_factory())
    finally:
        await instance.close()


async def test_a_bad_password_is_permanent(ovirt_engine: OVirtEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    instance = make_provider(ovirt_engine, monkeypatch, password="not-the-password")
    with pytest.raises(PermanentError, match="access_denied.*The username or password is incorrect"):
        await instance.start()
    await instance.close()


async def test_an_untrusted_certificate_is_permanent(
    ovirt_engine: OVirtEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance = make_provider(ovirt_engine, monkeypatch, ca_file=None)
    with pytest.raises(PermanentError, match="not trusted"):
        await instance.start()
    await instance.close()


async def test_a_stopped_engine_is_retryable(
    tmp_path: Path, ovirt_tls: TLSFiles, monkeypatch: pytest.MonkeyPatch, spec_factory: Callable[..., MachineSpec]
) -> None:
    engine = launch_ovirt_sim(tmp_path, ovirt_tls, name="ovirt-sim-doomed")
    instance = make_provider(engine, monkeypatch, call_timeout=5)
    try:
        await instance.start()
        assert await instance.list_owned() == []
        engine.stop()
        with pytest.raises(RetryableError):
            await instance.find(str(uuid.uuid4()))
        with pytest.raises(RetryableError):
            await instance.create_or_find(spec_factory())
    finally:
        engine.stop()
        await instance.close()


async def test_start_tolerates_an_engine_that_is_down(
    ovirt_engine: OVirtEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.providers.contract import free_port

    instance = make_provider(ovirt_engine, monkeypatch, url=f"https://127.0.0.1:{free_port()}/ovirt-engine/api")
    await instance.start()  # logged, not raised: the daemon starts without the engine
    with pytest.raises(RetryableError, match="cannot talk to"):
        await instance.list_owned()
    await instance.close()


async def test_server_errors_and_locks_are_retryable_client_errors_permanent(provider: OVirtProvider) -> None:
    assert isinstance(provider._translate(ovirtsdk4.Error("HTTP response code is 503.", code=503), "x"), RetryableError)
    locked = ovirtsdk4.Error('Fault detail is "[Cannot run VM: VM is locked. Please try again in a few minutes.]"',
                             code=409)
    assert isinstance(provider._translate(locked, "x"), RetryableError)
    assert isinstance(provider._translate(ovirtsdk4.Error("HTTP response code is 400.", code=400), "x"), PermanentError)


# -- connection lifetime and registration ----------------------------------------------------------


async def test_close_revokes_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    with OVirtSimServer(default_seed(), "governord@internal", "pw", timing=Timing.scaled(0.01)) as server:
        monkeypatch.setenv(PASSWORD_ENV, "pw")
        config = OVirtProvider.Config.model_validate({
            "type": "ovirt", "url": server.url, "username": "governord@internal",
            "password": {"env": PASSWORD_ENV}, "cluster": "Default",
        })
        instance = OVirtProvider("inproc", config)
        await instance.start()
        auth = server.app[AUTH_KEY]
        assert auth["issued"] == 1 and len(auth["tokens"]) == 1
        await instance.close()
        assert auth["tokens"] == {} and len(auth["revoked"]) == 1


def test_the_plugin_registers_the_type() -> None:
    registry = ProviderRegistry()
    governord_register_providers(registry)
    # registered lazily: the config models are known, the class is imported when loaded
    entry = registry.get("ovirt")
    assert entry is not None and entry.Config is OVirtProvider.Config and entry.Profile is OVirtProvider.Profile
    assert registry.load("ovirt") is OVirtProvider


def test_config_is_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "pw")
    base = {"type": "ovirt", "url": "https://engine/ovirt-engine/api", "username": "u@internal",
            "password": {"env": PASSWORD_ENV}, "cluster": "Default"}
    assert OVirtProvider.Config.model_validate(base).verify_tls is True
    for bad in ({"url": "engine"}, {"password": "plain-text"}, {"datacenter": "x"}):
        with pytest.raises(ValueError):
            OVirtProvider.Config.model_validate({**base, **bad})
    assert OVirtProvider.Profile.model_validate({"template": "t"}).cloud_init is True
