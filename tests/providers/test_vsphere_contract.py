"""The provider contract, run for vSphere against a fresh vcsim."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from governord.models import MachineSpec, NetworkAssignment
from governord.plugins.vsphere.provider import VSphereProvider
from tests.fixtures.vcsim import VcsimLab
from tests.providers.contract import ProviderContract, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def provider(vcsim: VcsimLab, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[VSphereProvider]:
    """A started vSphere provider on the test's vcsim."""
    monkeypatch.setenv("VCSIM_PASSWORD", vcsim.password)
    config = VSphereProvider.Config.model_validate(vcsim.provider_config())
    instance = VSphereProvider("vcsim", config)
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
def machine_spec_factory(vcsim: VcsimLab) -> Callable[..., MachineSpec]:
    """Specs with static addresses: vcsim has no DHCP, a fixed-IP customization is what it reports."""
    counter = itertools.count(10)

    def factory(**overrides: Any) -> MachineSpec:
        n = next(counter)
        hostname = f"contract-{n:02d}"
        values: dict[str, Any] = {
            "host_id": str(uuid.uuid4()),
            "hostname": hostname,
            "fqdn": f"{hostname}.lab.example",
            "profile": {"template": vcsim.template, "cpus": 2, "memory_mb": 2048},
            "network": NetworkAssignment(
                address=f"198.51.100.{n}",
                prefix_length=24,
                gateway="198.51.100.1",
                dns_servers=("198.51.100.2",),
                domain="lab.example",
            ),
        }
        values.update(overrides)
        return MachineSpec(**values)

    return factory


@pytest.fixture
def bad_profile(vcsim: VcsimLab) -> dict[str, Any]:
    return {"template": "no-such-template", "cpus": 1}


@pytest.fixture
async def unreachable_provider(vcsim: VcsimLab, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[VSphereProvider]:
    monkeypatch.setenv("VCSIM_PASSWORD", vcsim.password)
    port = free_port()
    settings = {**vcsim.provider_config(), "url": f"https://127.0.0.1:{port}/sdk", "call_timeout": 10}
    instance = VSphereProvider("unreachable", VSphereProvider.Config.model_validate(settings))
    yield instance
    await instance.close()


class TestVSphereContract(ProviderContract):
    """vSphere (pyvmomi) against vcsim."""

    ready_timeout = 10.0
