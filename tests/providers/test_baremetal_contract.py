"""The provider contract, run twice for bare metal: a pool behind ipmi_sim BMCs and a pool of
sushy-emulator Redfish Systems, each machine with a simulated OS that comes up after a PXE boot."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from governord.models import MachineSpec
from governord.plugins.baremetal.provider import BareMetalProvider
from lab.baremetal import BareMetalLab
from tests.providers.contract import ProviderContract, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def provider(
    pool: BareMetalLab, baremetal_provider_factory: Callable[..., BareMetalProvider]
) -> BareMetalProvider:
    """A started provider on the class's pool, with a fresh allocation file."""
    instance = baremetal_provider_factory(pool, name=f"{pool.protocol}-pool")
    await instance.start()
    return instance


@pytest.fixture
def machine_spec_factory() -> Callable[..., MachineSpec]:
    """Specs any pool machine satisfies; no static address (bare metal has its own)."""
    counter = itertools.count(1)

    def factory(**overrides: Any) -> MachineSpec:
        hostname = f"metal-{next(counter):02d}"
        values: dict[str, Any] = {
            "host_id": str(uuid.uuid4()),
            "hostname": hostname,
            "fqdn": f"{hostname}.lab.example",
            "profile": {"min_cpus": 2, "labels": ["general"]},
        }
        values.update(overrides)
        return MachineSpec(**values)

    return factory


@pytest.fixture
def bad_profile() -> dict[str, Any]:
    """Constraints no machine of the pool meets."""
    return {"min_cpus": 4096, "labels": ["quantum"]}


@pytest.fixture
async def unreachable_provider(
    pool: BareMetalLab, baremetal_provider_factory: Callable[..., BareMetalProvider], tmp_path: Path
) -> BareMetalProvider:
    """A pool whose only machine's BMC port has nothing listening."""
    table = pool.provider_config("BAREMETAL_LAB_BMC_PASSWORD", call_timeout=10.0)
    machine = table["machines"][0]
    table["machines"] = [{**machine, "bmc": {**machine["bmc"], "port": free_port()}}]
    return baremetal_provider_factory(pool, name="unreachable", state_dir=tmp_path / "unreachable", **table)


class TestIpmiContract(ProviderContract):
    """IPMI (pyghmi) against ipmi_sim."""

    ready_timeout = 10.0

    @pytest.fixture
    def pool(self, ipmi_lab: BareMetalLab) -> BareMetalLab:
        return ipmi_lab


class TestRedfishContract(ProviderContract):
    """Redfish (sushy) against sushy-emulator's fake driver."""

    ready_timeout = 10.0

    @pytest.fixture
    def pool(self, redfish_lab: BareMetalLab) -> BareMetalLab:
        return redfish_lab
