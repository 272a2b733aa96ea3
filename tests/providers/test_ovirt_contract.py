"""The provider contract, run for oVirt against the project's engine simulator (over HTTPS)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from governord.models import MachineSpec, NetworkAssignment
from governord.plugins.ovirt.provider import OVirtProvider
from tests.fixtures.ovirt import OVirtEngine
from tests.providers.contract import ProviderContract, free_port

pytestmark = pytest.mark.integration

PASSWORD_ENV = "OVIRT_PASSWORD"


@pytest.fixture
async def provider(ovirt_engine: OVirtEngine, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OVirtProvider]:
    """A started oVirt provider on the run's engine simulator."""
    monkeypatch.setenv(PASSWORD_ENV, ovirt_engine.password)
    instance = OVirtProvider("ovirt-sim", OVirtProvider.Config.model_validate(ovirt_engine.provider_config()))
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
def machine_spec_factory(ovirt_engine: OVirtEngine) -> Callable[..., MachineSpec]:
    """Specs with unique names (the engine is shared by the run); every other one has a static address."""
    counter = itertools.count(10)

    def factory(**overrides: Any) -> MachineSpec:
        n = next(counter)
        hostname = f"contract-{uuid.uuid4().hex[:8]}"
        network = (
            NetworkAssignment(
                address=f"198.51.100.{n}",
                prefix_length=24,
                gateway="198.51.100.1",
                dns_servers=("198.51.100.2",),
                domain="lab.example",
            )
            if n % 2 == 0
            else NetworkAssignment(domain="lab.example")
        )
        values: dict[str, Any] = {
            "host_id": str(uuid.uuid4()),
            "hostname": hostname,
            "fqdn": f"{hostname}.lab.example",
            "profile": {"template": ovirt_engine.template, "cpus": 2, "memory_mb": 2048},
            "network": network,
        }
        values.update(overrides)
        return MachineSpec(**values)

    return factory


@pytest.fixture
def bad_profile() -> dict[str, Any]:
    """A template the engine does not have: its 404 fault must come back as a PermanentError."""
    return {"template": "no-such-template", "cpus": 1}


@pytest.fixture
async def unreachable_provider(
    ovirt_engine: OVirtEngine, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[OVirtProvider]:
    monkeypatch.setenv(PASSWORD_ENV, ovirt_engine.password)
    settings = ovirt_engine.provider_config(url=f"https://127.0.0.1:{free_port()}/ovirt-engine/api", call_timeout=10)
    instance = OVirtProvider("unreachable", OVirtProvider.Config.model_validate(settings))
    yield instance
    await instance.close()


class TestOVirtContract(ProviderContract):
    """oVirt (ovirtsdk4) against lab.ovirt_sim."""

    ready_timeout = 10.0
