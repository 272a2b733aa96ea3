"""The vSphere provider against a real vcsim, checked from the other side with its own connection.

vcsim 0.24.2 gaps these tests work around (see lab/vcsim/__init__.py): it has no DHCP, so a
DHCP guest gets its address from the test through vcsim's ``SET.guest.ipAddress`` extraConfig
hook; and it ignores the clone spec's size and notes, which the provider re-applies anyway.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from governord.errors import PermanentError, RetryableError
from governord.models import OWNERSHIP_KEY, MachineSpec, NetworkAssignment, PowerState
from governord.plugins.vsphere import governord_register_providers
from governord.plugins.vsphere.provider import CUSTOMIZED_KEY, MARKER_KEY, READ_ONLY_METHODS, VSphereProvider
from governord.providers import ProviderRegistry
from lab.faultproxy import (
    FaultRates,
    FaultSettings,
    TryOutcome,
    describe_tries,
    one_try_each,
    proxy_stats,
    set_proxy_rates,
    start_faultproxy,
)
from lab.vcsim import make_tls_files, wait_for_task
from tests.fixtures.vcsim import VcsimLab

pytestmark = pytest.mark.integration

PASSWORD_ENV = "VCSIM_PASSWORD"


# -- helpers: the other side -------------------------------------------------------------------


def all_vms(si: Any) -> list[Any]:
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return list(view.view)
    finally:
        view.Destroy()


def extra_config(vm: Any) -> dict[str, str]:
    return {opt.key: opt.value for opt in vm.config.extraConfig or ()}


def marked(si: Any, host_id: str) -> list[Any]:
    return [vm for vm in all_vms(si) if extra_config(vm).get(MARKER_KEY) == host_id]


def custom_field(si: Any, vm: Any, name: str = OWNERSHIP_KEY) -> str | None:
    keys = {f.key for f in si.RetrieveContent().customFieldsManager.field or () if f.name == name}
    return next((v.value for v in vm.customValue or () if v.key in keys), None)


def template(si: Any, name: str) -> Any:
    return next(vm for vm in all_vms(si) if vm.name == name)


def clone_like_a_crash(si: Any, lab: VcsimLab, name: str, host_id: str | None) -> Any:
    """Clone the template with the marker, as the provider does, and stop there (powered off).

    Without ``host_id``: a plain clone, as someone else would make it.
    """
    index = si.RetrieveContent().searchIndex
    folder = index.FindByInventoryPath(f"{lab.datacenter}/vm/{lab.folder}")
    pool = index.FindByInventoryPath(f"{lab.datacenter}/host/{lab.cluster}/Resources/{lab.resource_pool}")
    spec = vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(pool=pool),
        config=vim.vm.ConfigSpec(
            extraConfig=[vim.option.OptionValue(key=MARKER_KEY, value=host_id)] if host_id else []
        ),
        powerOn=False,
        template=False,
    )
    return wait_for_task(template(si, lab.template).CloneVM_Task(folder=folder, name=name, spec=spec))


# -- fixtures -------------------------------------------------------------------------------------


def make_provider(lab: VcsimLab, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> VSphereProvider:
    monkeypatch.setenv(PASSWORD_ENV, lab.password)
    config = VSphereProvider.Config.model_validate(lab.provider_config(PASSWORD_ENV, **overrides))
    return VSphereProvider("vcsim", config)


@pytest.fixture
async def provider(vcsim: VcsimLab, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[VSphereProvider]:
    instance = make_provider(vcsim, monkeypatch)
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
def peer(vcsim: VcsimLab) -> Iterator[Any]:
    """A separate pyvmomi connection to the same vcsim: the other side."""
    yield vcsim.connect()


@pytest.fixture
def spec_factory(vcsim: VcsimLab) -> Callable[..., MachineSpec]:
    counter = iter(range(20, 250))

    def factory(*, static: bool = True, **profile: Any) -> MachineSpec:
        n = next(counter)
        hostname = f"node-{n:03d}"
        network = (
            NetworkAssignment(
                address=f"198.51.100.{n}",
                prefix_length=24,
                gateway="198.51.100.1",
                dns_servers=("198.51.100.2", "198.51.100.3"),
                domain="lab.example",
            )
            if static
            else NetworkAssignment(domain="lab.example")
        )
        return MachineSpec(
            host_id=str(uuid.uuid4()),
            hostname=hostname,
            fqdn=f"{hostname}.lab.example",
            profile={"template": vcsim.template, **profile},
            network=network,
        )

    return factory


# -- create_or_find ----------------------------------------------------------------------------


async def test_create_clones_marks_customizes_and_starts(
    provider: VSphereProvider, peer: Any, vcsim: VcsimLab, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory(cpus=2, memory_mb=2048, annotation="made by governord")

    machine = await provider.create_or_find(spec)

    assert machine.host_id == spec.host_id
    assert machine.name == spec.hostname
    assert machine.power is PowerState.ON
    assert machine.addresses == (spec.network.address,)
    [vm] = marked(peer, spec.host_id)
    assert vm._moId == machine.machine_id
    assert vm.name == spec.hostname
    assert vm.parent.name == vcsim.folder
    assert vm.resourcePool.name == vcsim.resource_pool
    assert not vm.config.template
    assert extra_config(vm)[MARKER_KEY] == spec.host_id
    assert extra_config(vm)[CUSTOMIZED_KEY] == "1"
    assert custom_field(peer, vm) == spec.host_id
    assert vm.runtime.powerState == "poweredOn"
    assert vm.config.hardware.numCPU == 2
    assert vm.config.hardware.memoryMB == 2048
    assert vm.config.annotation == "made by governord"
    assert vm.guest.hostName == spec.hostname
    assert vm.guest.ipAddress == spec.network.address
    [nic] = vm.guest.net
    assert list(nic.ipAddress) == [spec.network.address]
    assert nic.dnsConfig.domainName == "lab.example"
    assert list(nic.dnsConfig.ipAddress) == ["198.51.100.2", "198.51.100.3"]


async def test_create_or_find_again_returns_the_same_vm(
    provider: VSphereProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    first = await provider.create_or_find(spec)
    before = len(all_vms(peer))

    second = await provider.create_or_find(spec)

    assert second.machine_id == first.machine_id
    assert len(all_vms(peer)) == before
    assert [vm._moId for vm in marked(peer, spec.host_id)] == [first.machine_id]
    assert [vm.name for vm in all_vms(peer)].count(spec.hostname) == 1


async def test_vm_left_by_a_crash_after_the_clone_is_completed_not_duplicated(
    provider: VSphereProvider, peer: Any, vcsim: VcsimLab, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory(cpus=3, memory_mb=1024)
    orphan = clone_like_a_crash(peer, vcsim, spec.hostname, spec.host_id)
    assert orphan.runtime.powerState == "poweredOff"
    assert custom_field(peer, orphan) is None

    found = await provider.find(spec.host_id)
    assert found is not None and found.machine_id == orphan._moId and found.power is PowerState.OFF

    machine = await provider.create_or_find(spec)

    assert machine.machine_id == orphan._moId
    [vm] = marked(peer, spec.host_id)
    assert vm._moId == orphan._moId
    assert [v.name for v in all_vms(peer)].count(spec.hostname) == 1
    assert vm.runtime.powerState == "poweredOn"
    assert custom_field(peer, vm) == spec.host_id
    assert vm.config.hardware.numCPU == 3
    assert vm.config.hardware.memoryMB == 1024
    assert vm.guest.hostName == spec.hostname
    assert vm.guest.ipAddress == spec.network.address


async def test_vm_left_by_a_crash_after_customizing_is_powered_on(
    provider: VSphereProvider, peer: Any, vcsim: VcsimLab, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    orphan = clone_like_a_crash(peer, vcsim, spec.hostname, spec.host_id)
    customization = vim.vm.customization.Specification(
        identity=vim.vm.customization.LinuxPrep(
            hostName=vim.vm.customization.FixedName(name=spec.hostname), domain="lab.example"
        ),
        globalIPSettings=vim.vm.customization.GlobalIPSettings(),
        nicSettingMap=[
            vim.vm.customization.AdapterMapping(
                adapter=vim.vm.customization.IPSettings(
                    ip=vim.vm.customization.FixedIp(ipAddress=spec.network.address), subnetMask="255.255.255.0"
                )
            )
        ],
    )
    wait_for_task(orphan.CustomizeVM_Task(spec=customization))
    assert orphan.config.tools.pendingCustomization

    machine = await provider.create_or_find(spec)

    assert machine.machine_id == orphan._moId
    assert len(marked(peer, spec.host_id)) == 1
    assert orphan.runtime.powerState == "poweredOn"
    assert orphan.guest.hostName == spec.hostname
    assert orphan.guest.ipAddress == spec.network.address


async def test_a_vm_powered_off_after_customization_is_not_customized_again(
    provider: VSphereProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    machine = await provider.create_or_find(spec)
    [vm] = marked(peer, spec.host_id)
    wait_for_task(vm.PowerOffVM_Task())

    again = await provider.create_or_find(spec)

    assert again.machine_id == machine.machine_id
    assert vm.runtime.powerState == "poweredOn"
    assert list(extra_config(vm)).count(CUSTOMIZED_KEY) == 1


async def test_network_profile_connects_the_port_group(
    provider: VSphereProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    distributed = spec_factory(network="DC0_DVPG0")
    standard = spec_factory(network="VM Network")

    await provider.create_or_find(distributed)
    await provider.create_or_find(standard)

    [vm] = marked(peer, distributed.host_id)
    nic: Any
    [nic] = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    portgroup = next(
        n for n in peer.RetrieveContent().searchIndex.FindByInventoryPath("DC0").network if n.name == "DC0_DVPG0"
    )
    assert nic.backing.port.portgroupKey == portgroup.key
    [vm] = marked(peer, standard.host_id)
    [nic] = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    assert isinstance(nic.backing, vim.vm.device.VirtualEthernetCard.NetworkBackingInfo)
    assert nic.backing.deviceName == "VM Network"


async def test_datastore_from_config(
    vcsim: VcsimLab, peer: Any, monkeypatch: pytest.MonkeyPatch, spec_factory: Callable[..., MachineSpec]
) -> None:
    instance = make_provider(vcsim, monkeypatch, datastore="LocalDS_0")
    await instance.start()
    try:
        spec = spec_factory()
        await instance.create_or_find(spec)
        [vm] = marked(peer, spec.host_id)
        assert [ds.name for ds in vm.datastore] == ["LocalDS_0"]
        assert vm.config.files.vmPathName.startswith("[LocalDS_0]")
    finally:
        await instance.close()


# -- wait_ready, power_state ------------------------------------------------------------------


async def test_wait_ready_gives_the_static_address(
    provider: VSphereProvider, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    machine = await provider.create_or_find(spec)

    ready = await provider.wait_ready(machine, 5)

    assert ready.addresses == (spec.network.address,)
    assert ready.power is PowerState.ON
    assert ready.details["guest_hostname"] == spec.hostname
    assert await provider.power_state(machine.machine_id) is PowerState.ON


async def test_wait_ready_with_dhcp_waits_for_the_guest_address(
    provider: VSphereProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory(static=False)
    machine = await provider.create_or_find(spec)
    assert machine.addresses == ()
    [vm] = marked(peer, spec.host_id)
    assert vm.guest.hostName == spec.hostname

    waiting = asyncio.create_task(provider.wait_ready(machine, 10))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    # vcsim has no DHCP server: play its part through vcsim's guest-address hook
    lease = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key="SET.guest.ipAddress", value="203.0.113.7")])
    await asyncio.to_thread(lambda: wait_for_task(vm.ReconfigVM_Task(spec=lease)))

    ready = await asyncio.wait_for(waiting, 10)
    assert ready.addresses == ("203.0.113.7",)


async def test_wait_ready_times_out_retryably(
    provider: VSphereProvider, spec_factory: Callable[..., MachineSpec]
) -> None:
    machine = await provider.create_or_find(spec_factory(static=False))

    with pytest.raises(RetryableError, match="not ready after"):
        await provider.wait_ready(machine, 0.5)


async def test_power_state_follows_the_vm(
    provider: VSphereProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    machine = await provider.create_or_find(spec)
    [vm] = marked(peer, spec.host_id)
    wait_for_task(vm.SuspendVM_Task())
    assert await provider.power_state(machine.machine_id) is PowerState.SUSPENDED
    wait_for_task(vm.PowerOffVM_Task())
    assert await provider.power_state(machine.machine_id) is PowerState.OFF
    with pytest.raises(PermanentError, match="no VM vm-99999"):
        await provider.power_state("vm-99999")


# -- list_owned -------------------------------------------------------------------------------


async def test_list_owned_lists_only_marked_vms(
    provider: VSphereProvider, peer: Any, vcsim: VcsimLab, spec_factory: Callable[..., MachineSpec]
) -> None:
    specs = [spec_factory(), spec_factory()]
    made = {spec.host_id: (await provider.create_or_find(spec)).machine_id for spec in specs}
    # a VM someone else made from the same template, with other guestinfo: not ours
    stranger = clone_like_a_crash(peer, vcsim, "stranger", None)
    wait_for_task(
        stranger.ReconfigVM_Task(
            spec=vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key="guestinfo.other", value="x")])
        )
    )

    owned = await provider.list_owned()

    assert {m.host_id: m.machine_id for m in owned} == made
    assert all(m.provider == "vcsim" for m in owned)
    names = {m.name for m in owned}
    assert not names & {"DC0_H0_VM0", "DC0_H0_VM1", "DC0_C0_RP0_VM1", vcsim.template}


async def test_custom_field_alone_marks_a_vm(provider: VSphereProvider, peer: Any) -> None:
    """A VM that carries only the custom field (e.g. tagged by hand in the client) is owned too."""
    vm = next(v for v in all_vms(peer) if v.name == "DC0_H0_VM0")
    manager = peer.RetrieveContent().customFieldsManager
    if not any(f.name == OWNERSHIP_KEY for f in manager.field or ()):
        manager.AddCustomFieldDef(name=OWNERSHIP_KEY, moType=vim.VirtualMachine)
    vm.setCustomValue(key=OWNERSHIP_KEY, value="by-hand")

    found = await provider.find("by-hand")

    assert found is not None and found.machine_id == vm._moId
    assert "by-hand" in {m.host_id for m in await provider.list_owned()}


# -- destroy ----------------------------------------------------------------------------------


async def test_destroy_removes_the_vm_and_again_succeeds(
    provider: VSphereProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    machine = await provider.create_or_find(spec)
    keep = [vm._moId for vm in all_vms(peer) if vm._moId != machine.machine_id]

    await provider.destroy(spec.host_id)

    assert marked(peer, spec.host_id) == []
    assert machine.machine_id not in {vm._moId for vm in all_vms(peer)}
    assert sorted(vm._moId for vm in all_vms(peer)) == sorted(keep)
    assert await provider.find(spec.host_id) is None
    await provider.destroy(spec.host_id)
    await provider.destroy(str(uuid.uuid4()))


async def test_destroy_a_powered_off_half_made_vm(
    provider: VSphereProvider, peer: Any, vcsim: VcsimLab, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    clone_like_a_crash(peer, vcsim, spec.hostname, spec.host_id)

    await provider.destroy(spec.host_id)

    assert marked(peer, spec.host_id) == []


# -- errors -----------------------------------------------------------------------------------


async def test_bad_template_is_permanent_and_makes_nothing(
    provider: VSphereProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    before = len(all_vms(peer))
    spec = spec_factory()
    spec = MachineSpec(**{**spec.__dict__, "profile": {"template": "no-such-template"}})

    with pytest.raises(PermanentError, match="no-such-template") as err:
        await provider.create_or_find(spec)

    assert err.value.source == "vcsim"
    assert len(all_vms(peer)) == before


async def test_bad_profile_is_permanent(provider: VSphereProvider, spec_factory: Callable[..., MachineSpec]) -> None:
    spec = spec_factory(cpus=0)
    with pytest.raises(PermanentError, match="cpus"):
        await provider.create_or_find(spec)


async def test_unknown_network_is_permanent(
    provider: VSphereProvider, spec_factory: Callable[..., MachineSpec]
) -> None:
    with pytest.raises(PermanentError, match="no-such-net"):
        await provider.create_or_find(spec_factory(network="no-such-net"))


async def test_unknown_folder_is_permanent(
    vcsim: VcsimLab, monkeypatch: pytest.MonkeyPatch, spec_factory: Callable[..., MachineSpec]
) -> None:
    instance = make_provider(vcsim, monkeypatch, folder="nowhere")
    await instance.start()
    try:
        with pytest.raises(PermanentError, match="nowhere"):
            await instance.create_or_find(spec_factory())
    finally:
        await instance.close()


async def test_bad_password_is_permanent(vcsim: VcsimLab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    config = VSphereProvider.Config.model_validate(vcsim.provider_config(PASSWORD_ENV))
    instance = VSphereProvider("vcsim", config)

    with pytest.raises(PermanentError, match="InvalidLogin") as err:
        await instance.start()
    assert "wrong" not in str(err.value)
    with pytest.raises(PermanentError, match="InvalidLogin"):
        await instance.find("x")
    await instance.close()


async def test_untrusted_certificate_is_permanent(vcsim: VcsimLab, monkeypatch: pytest.MonkeyPatch) -> None:
    # pyVim itself skips verification for 127.0.0.1 unless given a context: the provider must not.
    strict = make_provider(vcsim, monkeypatch, verify_tls=True)
    with pytest.raises(PermanentError, match="not trusted"):
        await strict.start()
    await strict.close()


async def test_ca_file_makes_the_certificate_trusted(
    vcsim_factory: Callable[..., VcsimLab], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tls = make_tls_files(tmp_path / "tls")
    lab = vcsim_factory(["-tlscert", str(tls.cert), "-tlskey", str(tls.key)])
    without_ca = make_provider(lab, monkeypatch, verify_tls=True)
    with pytest.raises(PermanentError, match="not trusted"):
        await without_ca.start()
    await without_ca.close()

    pinned = make_provider(lab, monkeypatch, verify_tls=True, ca_file=str(tls.ca))
    await pinned.start()
    try:
        assert await pinned.list_owned() == []
    finally:
        await pinned.close()


async def test_stopped_vcsim_is_retryable(
    provider: VSphereProvider, vcsim: VcsimLab, spec_factory: Callable[..., MachineSpec]
) -> None:
    assert await provider.find("x") is None
    vcsim.stop()

    with pytest.raises(RetryableError) as err:
        await provider.find("x")
    assert err.value.source == "vcsim"
    with pytest.raises(RetryableError):
        await provider.create_or_find(spec_factory())
    with pytest.raises(RetryableError):
        await provider.destroy("x")


async def test_start_while_vcsim_is_down_is_not_fatal(vcsim: VcsimLab, monkeypatch: pytest.MonkeyPatch) -> None:
    vcsim.stop()
    instance = make_provider(vcsim, monkeypatch)
    await instance.start()  # not fatal: vCenter may come back
    try:
        with pytest.raises(RetryableError, match="cannot talk to"):
            await instance.list_owned()
    finally:
        await instance.close()


async def test_cut_and_refused_answers_are_passing_failures(
    vcsim: VcsimLab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Through lab.faultproxy: connections cut (before vCenter answered, or mid-answer, which
    pyVmomi sees as bad XML) and 5xx from a front end are retryable, at login (SmartConnect's
    version probe) and after it; none may fail a host for good."""
    settings = FaultSettings(rates=FaultRates(), seed=3, slow_seconds=2.0, client_timeout=1.0)
    proxy = start_faultproxy(vcsim.process, settings, seed=3, workdir=tmp_path)
    try:
        instance = make_provider(vcsim, monkeypatch, url=proxy.url)
        await instance.start()
        try:
            assert await instance.find("x") is None  # logged in, through the proxy
            for rates in (FaultRates(drop=1.0), FaultRates(error=1.0)):
                set_proxy_rates(proxy, rates)
                for _ in range(6):
                    with pytest.raises(RetryableError):
                        await instance.find("x")
                await instance.close()  # and logging in again meets the same faults
                for _ in range(3):
                    with pytest.raises(RetryableError):
                        await instance.find("x")
        finally:
            await instance.close()
        counts = proxy_stats(proxy)["counts"]
        assert counts["drop-before"] and counts["drop-after"] and counts["error-before"] and counts["error-after"]
    finally:
        proxy.stop()


async def test_one_create_try_survives_faults_on_reads_and_repeats_no_write(
    vcsim: VcsimLab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, peer: Any,
    spec_factory: Callable[..., MachineSpec], caplog: pytest.LogCaptureFixture,
) -> None:
    """Behind the fault proxy (10% of requests: 502/503/504, held past the timeout, or cut, before
    or after vCenter acted), a create_or_find try survives faults on its read-only SOAP calls,
    which are repeated; a faulted clone, reconfigure or power-on fails the try retryably and is
    not repeated (all calls are POSTs to the proxy, so which ones were repeated is read from the
    provider's own log). Step-level tries then finish every machine: exactly one VM each."""
    caplog.set_level(logging.INFO, logger="governord.plugins.vsphere.provider")
    settings = FaultSettings(rates=FaultRates(), seed=9, slow_seconds=1.5, client_timeout=1.0)
    proxy = start_faultproxy(vcsim.process, settings, seed=9, workdir=tmp_path)
    rate, count = 0.1, 10
    try:
        results: dict[int, list[TryOutcome]] = {}
        specs: list[MachineSpec] = []
        for tries in (1, 3):
            instance = make_provider(vcsim, monkeypatch, url=proxy.url, call_timeout=settings.client_timeout,
                                     call_tries=tries, call_backoff=0.1)
            set_proxy_rates(proxy, FaultRates())
            await instance.start()
            assert await instance.find("x") is None  # logged in, inventory looked up
            set_proxy_rates(proxy, FaultRates.spread(rate))
            batch = [spec_factory() for _ in range(count)]
            specs += batch
            results[tries] = await one_try_each(
                proxy, [functools.partial(instance.create_or_find, spec) for spec in batch],
                (RetryableError, PermanentError))
            set_proxy_rates(proxy, FaultRates())
            await instance.close()
        for outcomes in results.values():
            print([str(e)[:150] for _, _, e in outcomes if e])
        print(describe_tries(f"\none create_or_find try each, {count} machines, {rate:.0%} faults:", results))

        # a try without faults succeeds either way; with call-level retries some survived faults,
        # only listed reads were repeated, and nothing failed for good
        assert all(ok for outcomes in results.values() for ok, faults, _ in outcomes if not faults)
        assert any(ok and faults for ok, faults, _ in results[3]), results[3]
        assert all(error is None or isinstance(error, RetryableError) for _, _, error in results[3]), results[3]
        repeated = {r.args[1] for r in caplog.records if "failed in transit" in r.getMessage()}
        assert repeated and repeated <= READ_ONLY_METHODS, repeated

        # step-level tries finish the rest; then each machine exists once, carrying its marker
        instance = make_provider(vcsim, monkeypatch, url=proxy.url, call_timeout=settings.client_timeout,
                                 call_backoff=0.1)
        await instance.start()
        set_proxy_rates(proxy, FaultRates.spread(rate))
        try:
            for spec in specs:
                for _ in range(30):
                    try:
                        await instance.create_or_find(spec)
                        break
                    except RetryableError:
                        continue
                else:
                    pytest.fail(f"{spec.hostname} not made in 30 tries")
        finally:
            set_proxy_rates(proxy, FaultRates())
            await instance.close()
        for spec in specs:
            [vm] = marked(peer, spec.host_id)
            assert vm.runtime.powerState == "poweredOn" and extra_config(vm)[CUSTOMIZED_KEY] == "1"
    finally:
        proxy.stop()


async def test_expired_session_logs_in_again(
    provider: VSphereProvider, peer: Any, spec_factory: Callable[..., MachineSpec]
) -> None:
    spec = spec_factory()
    await provider.create_or_find(spec)
    manager = peer.RetrieveContent().sessionManager
    own = manager.currentSession.key
    others = [s.key for s in manager.sessionList if s.key != own]
    assert others
    manager.TerminateSession(sessionId=others)

    found = await provider.find(spec.host_id)

    assert found is not None
    assert len(manager.sessionList) == 2


# -- the event loop ---------------------------------------------------------------------------


async def test_event_loop_keeps_running_during_sdk_calls(
    vcsim_factory: Callable[..., VcsimLab], monkeypatch: pytest.MonkeyPatch, spec_factory: Callable[..., MachineSpec]
) -> None:
    delay_ms = 50
    slow = vcsim_factory(["-delay", str(delay_ms)])  # every SOAP call takes 50 ms
    instance = make_provider(slow, monkeypatch)
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    await instance.start()
    running = asyncio.create_task(ticker())
    try:
        started = time.monotonic()
        await instance.create_or_find(spec_factory())
        elapsed = time.monotonic() - started
    finally:
        running.cancel()
        await instance.close()

    assert elapsed > 5 * delay_ms / 1000  # it did make many slow calls
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) > elapsed / 0.01 / 3
    # A blocked loop would stall for at least one SOAP delay on every call; allow a few stalls
    # from a busy machine, not one per call.
    assert len([gap for gap in gaps if gap >= delay_ms / 1000]) <= 2


# -- config and registration ------------------------------------------------------------------


def test_config_is_strict(vcsim: VcsimLab, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv(PASSWORD_ENV, "secret")
    config = VSphereProvider.Config.model_validate(vcsim.provider_config(PASSWORD_ENV))
    assert config.password.reveal() == "secret"
    assert "secret" not in repr(config)
    with pytest.raises(ValidationError, match=r"unknown_key|Extra inputs"):
        VSphereProvider.Config.model_validate({**vcsim.provider_config(PASSWORD_ENV), "unknown_key": 1})
    with pytest.raises(ValidationError, match="by reference"):
        VSphereProvider.Config.model_validate({**vcsim.provider_config(PASSWORD_ENV), "password": "inline"})
    with pytest.raises(ValidationError, match="SDK URL"):
        VSphereProvider.Config.model_validate({**vcsim.provider_config(PASSWORD_ENV), "url": "vcenter"})
    with pytest.raises(ValidationError):
        VSphereProvider.Profile.model_validate({"cpus": 2})


def test_plugin_registers_the_type() -> None:
    registry = ProviderRegistry()
    governord_register_providers(registry)
    # registered lazily: the config models are known, the class is imported when loaded
    entry = registry.get("vsphere")
    assert entry is not None and entry.Config is VSphereProvider.Config and entry.Profile is VSphereProvider.Profile
    assert registry.load("vsphere") is VSphereProvider
