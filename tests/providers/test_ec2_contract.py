"""The provider contract, run for EC2 against moto's server (one process for the run)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from governord.models import MachineSpec, NetworkAssignment
from governord.plugins.ec2.provider import EC2Provider
from tests.fixtures.ec2 import MotoLab
from tests.providers.contract import ProviderContract, free_port

pytestmark = pytest.mark.integration

#: host numbers in the lab subnet (10.77.1.0/24), never reused within a run: moto is shared
_HOSTS = itertools.count(10)


@pytest.fixture
async def provider(moto_ec2: MotoLab) -> AsyncIterator[EC2Provider]:
    """A started EC2 provider on the run's moto."""
    instance = EC2Provider("moto", EC2Provider.Config.model_validate(moto_ec2.provider_config()))
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
def machine_spec_factory(moto_ec2: MotoLab) -> Callable[..., MachineSpec]:
    """Specs in the lab subnet with a static private address (moto honours PrivateIpAddress)."""
    profile = moto_ec2.profile()

    def factory(**overrides: Any) -> MachineSpec:
        n = next(_HOSTS)
        assert n < 250, "the lab subnet has run out of addresses for this run"
        hostname = f"ec2-contract-{n:03d}"
        values: dict[str, Any] = {
            "host_id": str(uuid.uuid4()),
            "hostname": hostname,
            "fqdn": f"{hostname}.lab.example",
            "profile": dict(profile),
            "network": NetworkAssignment(address=f"10.77.1.{n}", prefix_length=24, gateway="10.77.1.1"),
        }
        values.update(overrides)
        return MachineSpec(**values)

    return factory


@pytest.fixture
def bad_profile(moto_ec2: MotoLab) -> dict[str, Any]:
    """A well-formed AMI id that moto's catalogue does not have: InvalidAMIID.NotFound."""
    return moto_ec2.profile(image_id="ami-0badc0ffee0000000")


@pytest.fixture
async def unreachable_provider(moto_ec2: MotoLab) -> AsyncIterator[EC2Provider]:
    settings = moto_ec2.provider_config(endpoint_url=f"http://127.0.0.1:{free_port()}", call_timeout=10)
    instance = EC2Provider("unreachable", EC2Provider.Config.model_validate(settings))
    yield instance
    await instance.close()


class TestEC2Contract(ProviderContract):
    """EC2 (boto3) against moto_server."""

    ready_timeout = 10.0
