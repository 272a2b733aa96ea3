"""OpenStack provider specifics, checked on the other side with a separate openstacksdk connection.

The peer is the lab's real keystone and nova API (novabox, fake virt driver); nothing is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from openstack import exceptions as os_exc

from governord.errors import PermanentError
from governord.models import OWNERSHIP_KEY, MachineSpec, NetworkAssignment, PowerState
from governord.plugins.openstack.provider import TAG_PREFIX, OpenStackProvider
from lab.openstack import OpenStackLab
from tests.fixtures.openstack import openstack_provider_config

pytestmark = pytest.mark.integration

ProviderFactory = Callable[..., OpenStackProvider]


@pytest.fixture
async def make_provider(
    openstack_cloud: OpenStackLab, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ProviderFactory]:
    """``make_provider(name, **config overrides)``: providers closed when the test ends."""
    monkeypatch.setenv("OPENSTACK_PASSWORD", openstack_cloud.password)
    made: list[OpenStackProvider] = []

    def factory(name: str = "novabox", **overrides: Any) -> OpenStackProvider:
        config = OpenStackProvider.Config.model_validate(openstack_provider_config(openstack_cloud, **overrides))
        instance = OpenStackProvider(name, config)
        made.append(instance)
        return instance

    yield factory
    for instance in made:
        await instance.close()


@pytest.fixture
async def provider(make_provider: ProviderFactory) -> OpenStackProvider:
    instance = make_provider()
    await instance.start()
    return instance


@pytest.fixture
def spec_for(openstack_cloud: OpenStackLab) -> Callable[..., MachineSpec]:
    def factory(**overrides: Any) -> MachineSpec:
        hostname = f"os-{uuid.uuid4().hex[:8]}"
        profile = {
            "flavor": openstack_cloud.flavor,
            "image": openstack_cloud.image_id,
            "network": openstack_cloud.network,
            **overrides.pop("profile", {}),
        }
        values: dict[str, Any] = {
            "host_id": str(uuid.uuid4()),
            "hostname": hostname,
            "fqdn": f"{hostname}.lab.example",
            "profile": profile,
        }
        values.update(overrides)
        return MachineSpec(**values)

    return factory


def _marked(conn: Any, host_id: str) -> list[Any]:
    """The servers carrying the host's marker, oldest first as the provider orders them (nova
    lists newest first, and servers made in the same second tie on created_at)."""
    servers = [s for s in conn.compute.servers(details=True) if (s.metadata or {}).get(OWNERSHIP_KEY) == host_id]
    return sorted(servers, key=lambda s: (s.created_at or "", s.id))


async def test_the_server_as_nova_and_keystone_see_it(
    provider: OpenStackProvider,
    spec_for: Callable[..., MachineSpec],
    openstack_cloud: OpenStackLab,
    openstack_admin: Any,
) -> None:
    spec = spec_for(
        user_data="#cloud-config\nhostname: set-by-governord\n",
        profile={"metadata": {"role": "node"}, "security_groups": ["default"]},
    )
    machine = await provider.create_or_find(spec)
    try:
        ready = await provider.wait_ready(machine, 30)
        server = openstack_admin.compute.get_server(machine.machine_id)
        assert server.status == "ACTIVE"
        assert server.name == spec.hostname
        assert server.metadata == {"role": "node", OWNERSHIP_KEY: spec.host_id}
        assert f"{TAG_PREFIX}{spec.host_id}" in server.tags
        assert server.flavor.original_name == openstack_cloud.flavor
        assert server.image.id == openstack_cloud.image_id
        assert base64.b64decode(server.user_data).decode() == spec.user_data
        # created in keystone's project by keystone's user: nova validated a real token
        assert server.project_id == openstack_cloud.project_id
        user = openstack_admin.identity.find_user(openstack_cloud.username, ignore_missing=False)
        assert server.user_id == user.id
        nova_addresses = {a["addr"] for entries in server.addresses.values() for a in entries}
        assert set(ready.addresses) == nova_addresses
        assert ready.power is PowerState.ON and ready.details["status"] == "ACTIVE"
    finally:
        await provider.destroy(spec.host_id)
    with pytest.raises(os_exc.NotFoundException):
        openstack_admin.compute.get_server(machine.machine_id)


async def test_create_is_idempotent_on_the_cloud(
    provider: OpenStackProvider, spec_for: Callable[..., MachineSpec], openstack_user: Any
) -> None:
    spec = spec_for()
    try:
        first, second = await asyncio.gather(provider.create_or_find(spec), provider.create_or_find(spec))
        third = await provider.create_or_find(spec)
        servers = _marked(openstack_user, spec.host_id)
        # Two racing first calls may both create (nova has no conditional create); each server
        # carries the marker, later calls settle on the oldest and destroy removes them all.
        assert {first.machine_id, second.machine_id} <= {s.id for s in servers}
        assert third.machine_id == servers[0].id
        fourth = await provider.create_or_find(spec)
        assert fourth.machine_id == third.machine_id
    finally:
        await provider.destroy(spec.host_id)
    assert _marked(openstack_user, spec.host_id) == []


async def test_sequential_create_makes_one_server(
    provider: OpenStackProvider, spec_for: Callable[..., MachineSpec], openstack_user: Any
) -> None:
    spec = spec_for()
    try:
        first = await provider.create_or_find(spec)
        second = await provider.create_or_find(spec)
        assert second.machine_id == first.machine_id
        assert [s.id for s in _marked(openstack_user, spec.host_id)] == [first.machine_id]
    finally:
        await provider.destroy(spec.host_id)


async def test_a_server_made_before_a_crash_is_found_not_duplicated(
    provider: OpenStackProvider,
    spec_for: Callable[..., MachineSpec],
    openstack_cloud: OpenStackLab,
    openstack_user: Any,
) -> None:
    spec = spec_for()
    # what a governord that crashed after "create sent" left behind: metadata only, no tag
    flavor = openstack_user.compute.find_flavor(openstack_cloud.flavor, ignore_missing=False)
    made = openstack_user.compute.create_server(
        name=spec.hostname,
        flavor_id=flavor.id,
        image_id=openstack_cloud.image_id,
        networks=[{"uuid": openstack_cloud.network}],
        metadata={OWNERSHIP_KEY: spec.host_id},
    )
    try:
        machine = await provider.create_or_find(spec)
        assert machine.machine_id == made.id
        assert machine.host_id == spec.host_id
        assert [s.id for s in _marked(openstack_user, spec.host_id)] == [made.id]
        assert (await provider.wait_ready(machine, 30)).addresses
    finally:
        await provider.destroy(spec.host_id)
    assert _marked(openstack_user, spec.host_id) == []


async def test_a_stopped_server_is_started_again(
    provider: OpenStackProvider, spec_for: Callable[..., MachineSpec], openstack_user: Any
) -> None:
    spec = spec_for()
    try:
        machine = await provider.create_or_find(spec)
        openstack_user.compute.stop_server(machine.machine_id)
        openstack_user.compute.wait_for_server(
            openstack_user.compute.get_server(machine.machine_id), status="SHUTOFF", wait=30, interval=0.2
        )
        assert await provider.power_state(machine.machine_id) is PowerState.OFF
        again = await provider.create_or_find(spec)
        assert again.machine_id == machine.machine_id
        assert await provider.power_state(machine.machine_id) is PowerState.ON
    finally:
        await provider.destroy(spec.host_id)


async def test_a_fixed_address_is_requested_from_neutron(
    provider: OpenStackProvider, spec_for: Callable[..., MachineSpec], openstack_user: Any
) -> None:
    spec = spec_for(network=NetworkAssignment(address="192.168.1.77", prefix_length=24, gateway="192.168.1.1"))
    try:
        ready = await provider.wait_ready(await provider.create_or_find(spec), 30)
        assert ready.addresses == ("192.168.1.77",)
        server = openstack_user.compute.get_server(ready.machine_id)
        assert [a["addr"] for a in server.addresses["private"]] == ["192.168.1.77"]
    finally:
        await provider.destroy(spec.host_id)


async def test_names_resolve_through_compute_and_ambiguity_is_permanent(
    provider: OpenStackProvider, spec_for: Callable[..., MachineSpec], openstack_cloud: OpenStackLab
) -> None:
    unique = next(i for i in openstack_cloud.images if [j["name"] for j in openstack_cloud.images].count(i["name"]) == 1)
    spec = spec_for(profile={"image": unique["name"], "network": openstack_cloud.network_name})
    try:
        machine = await provider.create_or_find(spec)
        assert machine.details["image_id"] == unique["id"]
    finally:
        await provider.destroy(spec.host_id)
    ambiguous = spec_for(profile={"image": "fakeimage123456"})
    with pytest.raises(PermanentError, match="not unique"):
        await provider.create_or_find(ambiguous)
    with pytest.raises(PermanentError, match="flavor 'm9.nothing' not found"):
        await provider.create_or_find(spec_for(profile={"flavor": "m9.nothing"}))
    assert await provider.find(ambiguous.host_id) is None


async def test_bad_credentials_are_permanent(make_provider: ProviderFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENSTACK_PASSWORD", "not-the-password")
    instance = make_provider("wrong-password")
    with pytest.raises(PermanentError) as caught:
        await instance.start()
    assert caught.value.source == "wrong-password"
    assert "401" in str(caught.value) or "authenticate" in str(caught.value).lower()


async def test_an_unknown_project_is_permanent(make_provider: ProviderFactory) -> None:
    instance = make_provider("no-project", project_name="no-such-project")
    with pytest.raises(PermanentError):
        await instance.start()


@pytest.fixture
def huge_flavor(openstack_admin: Any) -> Iterator[str]:
    """A flavor no compute host can hold: the scheduler finds no valid host."""
    name = f"huge-{uuid.uuid4().hex[:6]}"
    flavor = openstack_admin.compute.create_flavor(name=name, ram=50000, vcpus=1, disk=1)
    try:
        yield name
    finally:
        openstack_admin.compute.delete_flavor(flavor.id, ignore_missing=True)


async def test_error_state_is_permanent_with_novas_fault(
    provider: OpenStackProvider, spec_for: Callable[..., MachineSpec], huge_flavor: str, openstack_user: Any
) -> None:
    spec = spec_for(profile={"flavor": huge_flavor})
    try:
        machine = await provider.create_or_find(spec)
        assert machine.details["status"] == "ERROR"
        with pytest.raises(PermanentError, match="No valid host was found") as caught:
            await provider.wait_ready(machine, 30)
        assert caught.value.source == provider.name
    finally:
        await provider.destroy(spec.host_id)
    assert _marked(openstack_user, spec.host_id) == []


async def test_quota_exceeded_is_permanent(
    provider: OpenStackProvider,
    spec_for: Callable[..., MachineSpec],
    openstack_cloud: OpenStackLab,
    openstack_admin: Any,
) -> None:
    before = openstack_admin.compute.get_quota_set(openstack_cloud.project_id)
    openstack_admin.compute.update_quota_set(openstack_cloud.project_id, instances=0)
    spec = spec_for()
    try:
        with pytest.raises(PermanentError, match="(?i)quota"):
            await provider.create_or_find(spec)
    finally:
        openstack_admin.compute.update_quota_set(openstack_cloud.project_id, instances=before.instances)
        await provider.destroy(spec.host_id)


async def test_two_instances_side_by_side(
    make_provider: ProviderFactory, spec_for: Callable[..., MachineSpec], openstack_user: Any
) -> None:
    first, second = make_provider("cloud-a", max_concurrency=2), make_provider("cloud-b", max_concurrency=2)
    await asyncio.gather(first.start(), second.start())
    specs = [spec_for(), spec_for()]
    owners = [first, second]
    try:
        machines = await asyncio.gather(*(p.create_or_find(s) for p, s in zip(owners, specs, strict=True)))
        ready = await asyncio.gather(
            *(p.wait_ready(m, 30) for p, m in zip(owners, machines, strict=True))
        )
        assert [m.provider for m in ready] == ["cloud-a", "cloud-b"]
        assert len({m.machine_id for m in ready}) == 2
        assert len({m.addresses[0] for m in ready}) == 2
        # both log in to the same project: each sees every governord server there
        for instance in (first, second):
            owned = {m.host_id for m in await instance.list_owned()}
            assert {s.host_id for s in specs} <= owned
    finally:
        await asyncio.gather(*(p.destroy(s.host_id) for p, s in zip(owners, specs, strict=True)))
    for spec in specs:
        assert _marked(openstack_user, spec.host_id) == []
