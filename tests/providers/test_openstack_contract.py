"""The provider contract, run for OpenStack against keystone + nova's API (novabox)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from governord.models import MachineSpec
from governord.plugins.openstack.provider import OpenStackProvider
from lab.openstack import OpenStackLab
from tests.fixtures.openstack import openstack_provider_config
from tests.providers.contract import ProviderContract, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def provider(openstack_cloud: OpenStackLab, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OpenStackProvider]:
    """A started OpenStack provider logged in to the lab's keystone as the lab user."""
    monkeypatch.setenv("OPENSTACK_PASSWORD", openstack_cloud.password)
    config = OpenStackProvider.Config.model_validate(openstack_provider_config(openstack_cloud))
    instance = OpenStackProvider("novabox", config)
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
def machine_spec_factory(openstack_cloud: OpenStackLab) -> Callable[..., MachineSpec]:
    """Specs on the lab network; the neutron stand-in gives each port its own address."""
    counter = itertools.count(1)

    def factory(**overrides: Any) -> MachineSpec:
        hostname = f"contract-{uuid.uuid4().hex[:6]}-{next(counter):02d}"
        values: dict[str, Any] = {
            "host_id": str(uuid.uuid4()),
            "hostname": hostname,
            "fqdn": f"{hostname}.lab.example",
            "profile": {
                "flavor": openstack_cloud.flavor,
                "image": openstack_cloud.image_id,
                "network": openstack_cloud.network,
            },
        }
        values.update(overrides)
        return MachineSpec(**values)

    return factory


@pytest.fixture
def bad_profile(openstack_cloud: OpenStackLab) -> dict[str, Any]:
    """An image id glance does not know: nova itself rejects the create (HTTP 400)."""
    return {"flavor": openstack_cloud.flavor, "image": str(uuid.uuid4()), "network": openstack_cloud.network}


@pytest.fixture
async def unreachable_provider(
    openstack_cloud: OpenStackLab, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[OpenStackProvider]:
    monkeypatch.setenv("OPENSTACK_PASSWORD", openstack_cloud.password)
    settings = openstack_provider_config(
        openstack_cloud, auth_url=f"http://127.0.0.1:{free_port()}/v3", call_timeout=10.0
    )
    instance = OpenStackProvider("unreachable", OpenStackProvider.Config.model_validate(settings))
    yield instance
    await instance.close()


class TestOpenStackContract(ProviderContract):
    """OpenStack (openstacksdk) against keystone 30 + nova 34 (fake virt driver)."""

    ready_timeout = 30.0
