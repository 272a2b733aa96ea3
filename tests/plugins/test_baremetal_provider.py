"""The bare-metal provider against real BMC simulators, checked from the hardware side.

What a machine "experienced" is read without governord's code: for ipmi_sim from the chassis
state files its chassis-control script keeps (``state.power``, ``state.boot``, the ``events``
log of every command carried out) and with ``ipmitool -C 3``; for sushy-emulator by a plain
HTTP GET of the System resource; for the OS from the simulated OS's own status and its sshd.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from governord.errors import PermanentError, RetryableError
from governord.models import MachineSpec, PowerState
from governord.plugins.baremetal import governord_register_providers
from governord.plugins.baremetal.provider import BareMetalProvider
from governord.providers import ProviderRegistry
from lab.baremetal import BareMetalLab
from tests.fixtures.baremetal import PASSWORD_ENV
from tests.providers.contract import free_port

pytestmark = pytest.mark.integration

ProviderFactory = Callable[..., BareMetalProvider]


def spec(hostname: str = "metal", **profile: Any) -> MachineSpec:
    return MachineSpec(
        host_id=str(uuid.uuid4()), hostname=hostname, fqdn=f"{hostname}.lab.example", profile=profile or {}
    )


def allocations(provider: BareMetalProvider) -> dict[str, Any]:
    """The allocation file as it is on disk."""
    data: dict[str, Any] = json.loads(provider.state_file.read_text())["allocations"]
    return data


def sshd_answers(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1) as conn:
            return conn.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


@pytest.fixture(params=["ipmi", "redfish"])
def lab(request: pytest.FixtureRequest) -> BareMetalLab:
    """Each test with this fixture runs once per BMC protocol, on the module's shared pool."""
    fixture = "ipmi_lab" if request.param == "ipmi" else "redfish_lab"
    result: BareMetalLab = request.getfixturevalue(fixture)
    return result


# -- provision and release ---------------------------------------------------------------------


async def test_provision_sets_network_boot_then_powers_on(
    lab: BareMetalLab, baremetal_provider_factory: ProviderFactory
) -> None:
    provider = baremetal_provider_factory(lab)
    host = spec("web-1")
    machine = await provider.create_or_find(host)
    hw = lab.machine(machine.machine_id)
    assert machine.machine_id == "bm-small-1"  # the first machine of the pool
    assert machine.addresses == (hw.address,)
    assert hw.power() == "on"
    assert hw.boot_device() == "pxe"
    if hw.ipmi is not None:
        assert hw.ipmi.events() == ["set boot pxe", "set power 1"]  # boot device first, then power
        assert "Chassis Power is on" in hw.ipmi.ipmitool("chassis", "power", "status")
    assert allocations(provider) == {
        "bm-small-1": {
            "host_id": host.host_id,
            "hostname": "web-1",
            "allocated_at": pytest.approx(time.time(), abs=30),
            "powered_on_at": pytest.approx(time.time(), abs=30),
        }
    }

    ready = await provider.wait_ready(machine, 10)
    assert ready.power is PowerState.ON
    assert hw.os.status() == {"power": "on", "os": "up"}
    assert sshd_answers(hw.address, lab.ready_port)
    await provider.destroy(host.host_id)


async def test_release_powers_off_clears_boot_and_frees(
    lab: BareMetalLab, baremetal_provider_factory: ProviderFactory
) -> None:
    provider = baremetal_provider_factory(lab)
    host = spec("web-2")
    machine = await provider.wait_ready(await provider.create_or_find(host), 10)
    hw = lab.machine(machine.machine_id)

    await provider.destroy(host.host_id)
    assert hw.power() == "off"
    assert hw.boot_device() in {"none", "hdd"}  # override gone (ipmi: none; Redfish: Hdd, Disabled)
    if hw.ipmi is not None:
        assert hw.ipmi.events()[-2:] == ["set power 0", "set boot none"]
    hw.wait_os("off")
    assert not sshd_answers(hw.address, lab.ready_port)
    assert allocations(provider) == {}
    assert await provider.find(host.host_id) is None


async def test_allocation_survives_a_restart(
    lab: BareMetalLab, baremetal_provider_factory: ProviderFactory, tmp_path: Path
) -> None:
    state_dir = tmp_path / "governord-state"
    first = baremetal_provider_factory(lab, state_dir=state_dir)
    host = spec("db-1", labels=["gpu"])
    machine = await first.create_or_find(host)
    await first.close()

    second = baremetal_provider_factory(lab, state_dir=state_dir)
    await second.start()
    again = await second.create_or_find(host)
    assert again.machine_id == machine.machine_id == "bm-big-1"
    assert list(allocations(second)) == ["bm-big-1"]
    assert [m.host_id for m in await second.list_owned()] == [host.host_id]
    hw = lab.machine("bm-big-1")
    if hw.ipmi is not None:
        assert hw.ipmi.events().count("set power 1") == 1  # found on, not powered on again
    for other in ("bm-small-1", "bm-small-2"):
        assert lab.machine(other).power() == "off"
    await second.destroy(host.host_id)


async def test_a_crash_between_allocation_and_power_on_resumes_on_the_same_machine(
    ipmi_lab: BareMetalLab, baremetal_provider_factory: ProviderFactory, tmp_path: Path
) -> None:
    host = spec("resumed")
    state_file = tmp_path / "state" / "baremetal" / "pool.json"
    state_file.parent.mkdir(parents=True)
    # what the file holds when governord died after recording the allocation, before the BMC call
    state_file.write_text(
        json.dumps(
            {
                "version": 1,
                "allocations": {
                    "bm-small-2": {"host_id": host.host_id, "hostname": "resumed", "allocated_at": time.time()}
                },
                "unusable": {},
            }
        )
    )
    provider = baremetal_provider_factory(ipmi_lab, state_dir=tmp_path / "state")
    machine = await provider.create_or_find(host)
    assert machine.machine_id == "bm-small-2"
    assert ipmi_lab.machine("bm-small-2").ipmi.events() == ["set boot pxe", "set power 1"]  # type: ignore[union-attr]
    assert ipmi_lab.machine("bm-small-1").ipmi.events() == []  # type: ignore[union-attr]
    await provider.wait_ready(machine, 10)
    await provider.destroy(host.host_id)


# -- act only on a confirmed power state -------------------------------------------------------


async def test_a_machine_whose_power_cannot_be_read_is_never_touched(
    ipmi_lab: BareMetalLab, baremetal_provider_factory: ProviderFactory
) -> None:
    broken = ipmi_lab.machine("bm-small-1")
    broken.ipmi.break_sensor_reads()  # type: ignore[union-attr]
    provider = baremetal_provider_factory(ipmi_lab)

    machine = await provider.create_or_find(spec("skips-broken"))
    assert machine.machine_id == "bm-small-2"
    assert broken.ipmi.events() == []  # type: ignore[union-attr]
    assert broken.power() == "off"
    assert await provider.power_state("bm-small-1") is PowerState.UNKNOWN
    marks = {row["name"]: row["unusable"] for row in await provider.pool()}
    assert "power state unreadable" in marks["bm-small-1"]
    assert marks["bm-small-2"] is None

    # once it reads "off" again, an allocation that needs it re-checks the mark and clears it
    broken.ipmi.break_sensor_reads(False)  # type: ignore[union-attr]
    second = spec("after-repair", rack="r1")
    assert (await provider.create_or_find(second)).machine_id == "bm-small-1"
    assert {row["name"]: row["unusable"] for row in await provider.pool()}["bm-small-1"] is None
    await provider.destroy(second.host_id)
    await provider.destroy(machine.host_id)  # type: ignore[arg-type]


async def test_release_with_unreadable_power_refuses_and_marks(
    ipmi_lab: BareMetalLab, baremetal_provider_factory: ProviderFactory
) -> None:
    provider = baremetal_provider_factory(ipmi_lab)
    host = spec("stuck")
    machine = await provider.create_or_find(host)
    hw = ipmi_lab.machine(machine.machine_id)
    events_before = hw.ipmi.events()  # type: ignore[union-attr]
    hw.ipmi.break_sensor_reads()  # type: ignore[union-attr]

    with pytest.raises(RetryableError, match="not releasing bm-small-1 blind"):
        await provider.destroy(host.host_id)
    assert hw.ipmi.events() == events_before  # type: ignore[union-attr]  # no power-off sent blind
    assert hw.power() == "on"
    assert list(allocations(provider)) == ["bm-small-1"]  # still held: nothing was released
    assert "power state unreadable" in (await provider.pool())[0]["unusable"]

    hw.ipmi.break_sensor_reads(False)  # type: ignore[union-attr]
    await provider.destroy(host.host_id)
    assert hw.power() == "off"
    assert (await provider.pool())[0]["unusable"] is None


async def test_a_free_machine_found_powered_on_is_not_touched(
    lab: BareMetalLab, baremetal_provider_factory: ProviderFactory
) -> None:
    busy = lab.machine("bm-small-1")
    if busy.ipmi is not None:
        busy.ipmi.press_power_button(True)
    else:
        assert busy.redfish is not None
        busy.redfish.post(f"/redfish/v1/Systems/{busy.system_id}/Actions/ComputerSystem.Reset", {"ResetType": "On"})
    provider = baremetal_provider_factory(lab)

    machine = await provider.create_or_find(spec("not-that-one"))
    assert machine.machine_id == "bm-small-2"
    assert busy.power() == "on"  # left as it was
    if busy.ipmi is not None:
        assert busy.ipmi.events() == []
    assert "powered on although free" in (await provider.pool())[0]["unusable"]
    await provider.destroy(machine.host_id)  # type: ignore[arg-type]


async def test_an_unreachable_redfish_bmc_is_skipped_and_marked(
    redfish_lab: BareMetalLab, baremetal_provider_factory: ProviderFactory
) -> None:
    table = redfish_lab.provider_config(PASSWORD_ENV)
    dead = {**table["machines"][0], "name": "bm-dead", "address": "127.0.0.250"}
    dead["bmc"] = {**dead["bmc"], "port": free_port()}
    table["machines"].insert(0, dead)
    provider = baremetal_provider_factory(redfish_lab, **table)

    machine = await provider.create_or_find(spec("around-the-dead"))
    assert machine.machine_id == "bm-small-1"
    rows = {row["name"]: row["unusable"] for row in await provider.pool()}
    assert "unreachable" in rows["bm-dead"]
    assert await provider.power_state("bm-dead") is PowerState.UNKNOWN
    await provider.destroy(machine.host_id)  # type: ignore[arg-type]


# -- choosing machines -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ({}, "bm-small-1"),
        ({"labels": ["gpu"]}, "bm-big-1"),
        ({"rack": "r2"}, "bm-small-2"),
        ({"min_memory_mb": 65536}, "bm-big-1"),
        ({"min_cpus": 16, "rack": "r2", "labels": ["general"]}, "bm-big-1"),
    ],
)
async def test_constraints_select_the_machine(
    ipmi_lab: BareMetalLab, baremetal_provider_factory: ProviderFactory, profile: dict[str, Any], expected: str
) -> None:
    provider = baremetal_provider_factory(ipmi_lab)
    host = spec("picky", **profile)
    machine = await provider.create_or_find(host)
    assert machine.machine_id == expected
    assert [m.name for m in ipmi_lab.machines if m.power() == "on"] == [expected]
    await provider.destroy(host.host_id)


async def test_pool_exhaustion_is_permanent_and_touches_nothing(
    ipmi_lab: BareMetalLab, baremetal_provider_factory: ProviderFactory
) -> None:
    provider = baremetal_provider_factory(ipmi_lab)
    first = spec("gpu-1", labels=["gpu"])
    await provider.create_or_find(first)
    events = {m.name: m.ipmi.events() for m in ipmi_lab.machines}  # type: ignore[union-attr]

    with pytest.raises(PermanentError, match="no free machine matches") as caught:
        await provider.create_or_find(spec("gpu-2", labels=["gpu"]))
    assert caught.value.source == "pool"
    assert "bm-big-1" in str(caught.value)
    assert {m.name: m.ipmi.events() for m in ipmi_lab.machines} == events  # type: ignore[union-attr]
    assert list(allocations(provider)) == ["bm-big-1"]

    with pytest.raises(PermanentError, match="no machine in pool pool matches"):
        await provider.create_or_find(spec("huge", min_cpus=512))
    await provider.destroy(first.host_id)


async def test_a_wrong_bmc_password_is_permanent(
    lab: BareMetalLab, baremetal_provider_factory: ProviderFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WRONG_BMC_PASSWORD", "not-the-password")
    table = lab.provider_config("WRONG_BMC_PASSWORD")
    provider = baremetal_provider_factory(config=table)

    with pytest.raises(PermanentError) as caught:
        await provider.create_or_find(spec("locked-out"))
    text = str(caught.value).lower()
    assert "password" in text or "access denied" in text
    assert all(m.power() == "off" for m in lab.machines)
    assert not provider.state_file.exists() or allocations(provider) == {}
    assert await provider.power_state("bm-small-1") is PowerState.UNKNOWN
    if lab.protocol == "ipmi":
        assert all(m.ipmi.events() == [] for m in lab.machines)  # type: ignore[union-attr]


# -- waiting for the OS ------------------------------------------------------------------------


async def test_wait_ready_retryable_then_permanent_past_the_boot_window(
    ipmi_lab: BareMetalLab, baremetal_provider_factory: ProviderFactory, tmp_path: Path
) -> None:
    # a ready_port where no OS ever answers: the install "failed"
    provider = baremetal_provider_factory(ipmi_lab, ready_port=free_port(), boot_timeout=600.0)
    host = spec("never-up")
    machine = await provider.create_or_find(host)

    with pytest.raises(RetryableError, match="not up yet"):
        await provider.wait_ready(machine, 0.2)

    # the boot window counts from the power-on on record, also for a provider started later
    record = json.loads(provider.state_file.read_text())
    record["allocations"][machine.machine_id]["powered_on_at"] -= 601
    provider.state_file.write_text(json.dumps(record))
    restarted = baremetal_provider_factory(
        ipmi_lab, state_dir=tmp_path / "state", ready_port=free_port(), boot_timeout=600.0
    )
    with pytest.raises(PermanentError, match="600.0s after power-on"):
        await restarted.wait_ready(machine, 5)
    await restarted.destroy(host.host_id)


# -- registration and config -------------------------------------------------------------------


def test_the_type_is_registered() -> None:
    registry = ProviderRegistry()
    governord_register_providers(registry)
    assert registry.get("baremetal") is BareMetalProvider


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t["machines"].append(dict(t["machines"][0])), "share the name"),
        (lambda t: t["machines"][0]["bmc"].update(system_id="1"), "redfish BMCs only"),
        (lambda t: t["machines"][0]["bmc"].update(password="inline"), "by reference"),
        (lambda t: t["machines"][0].update(address="not-an-ip"), "not an IP address"),
        (lambda t: t["machines"][0].update(colour="blue"), "Extra inputs"),
    ],
)
def test_config_is_validated_strictly(
    ipmi_lab: BareMetalLab, monkeypatch: pytest.MonkeyPatch, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, ipmi_lab.password)
    table = ipmi_lab.provider_config(PASSWORD_ENV)
    change(table)
    with pytest.raises(ValueError, match=message):
        BareMetalProvider.Config.model_validate(table)
