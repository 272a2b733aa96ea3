"""The provider contract as a reusable test class.

A provider's test module subclasses :class:`ProviderContract` and supplies two fixtures:

``provider``
    a started :class:`governord.providers.Provider` talking to the real peer (or the lab
    simulator), closed after the test;
``machine_spec_factory``
    a callable ``factory(**overrides) -> MachineSpec`` giving a new host id and host name on
    every call, with a profile and network for which the peer reports an address once the
    machine runs.
``bad_profile``
    a profile (dict) the peer itself rejects (an image, template or flavor that does not
    exist there): the provider must raise :class:`PermanentError` with the peer's message.
``unreachable_provider``
    a provider of the same type configured against an address where nothing listens: its
    first call must raise :class:`RetryableError`.

Every test cleans up the machines it makes, through the provider itself.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from governord.errors import PermanentError, RetryableError
from governord.models import Machine, MachineSpec, PowerState
from governord.providers import Provider

SpecFactory = Callable[..., MachineSpec]


def free_port() -> int:
    """A loopback port nothing listens on (bound, read, released): for ``unreachable_provider``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProviderContract:
    """Tests every provider passes: mix into a ``Test...`` class of the provider's test module."""

    #: seconds wait_ready may take against this peer
    ready_timeout: ClassVar[float] = 60.0

    async def _create(self, provider: Provider, spec: MachineSpec) -> Machine:
        machine = await provider.create_or_find(spec)
        assert machine.host_id == spec.host_id
        assert machine.provider == provider.name
        assert machine.machine_id
        return machine

    async def test_create_or_find_is_idempotent(self, provider: Provider, machine_spec_factory: SpecFactory) -> None:
        spec = machine_spec_factory()
        first = await self._create(provider, spec)
        try:
            second = await provider.create_or_find(spec)
            assert second.machine_id == first.machine_id
            owned = [m for m in await provider.list_owned() if m.host_id == spec.host_id]
            assert [m.machine_id for m in owned] == [first.machine_id]
            found = await provider.find(spec.host_id)
            assert found is not None and found.machine_id == first.machine_id
        finally:
            await provider.destroy(spec.host_id)

    async def test_wait_ready_gives_addresses(self, provider: Provider, machine_spec_factory: SpecFactory) -> None:
        spec = machine_spec_factory()
        machine = await self._create(provider, spec)
        try:
            ready = await provider.wait_ready(machine, self.ready_timeout)
            assert ready.machine_id == machine.machine_id
            assert ready.power is PowerState.ON
            assert ready.addresses
            if spec.network.address:
                assert spec.network.address in ready.addresses
        finally:
            await provider.destroy(spec.host_id)

    async def test_power_state_is_on(self, provider: Provider, machine_spec_factory: SpecFactory) -> None:
        spec = machine_spec_factory()
        machine = await self._create(provider, spec)
        try:
            assert await provider.power_state(machine.machine_id) is PowerState.ON
        finally:
            await provider.destroy(spec.host_id)

    async def test_list_owned_includes_it(self, provider: Provider, machine_spec_factory: SpecFactory) -> None:
        specs = [machine_spec_factory(), machine_spec_factory()]
        machines = [await self._create(provider, spec) for spec in specs]
        try:
            owned: dict[str | None, Any] = {m.host_id: m.machine_id for m in await provider.list_owned()}
            for spec, machine in zip(specs, machines, strict=True):
                assert owned.get(spec.host_id) == machine.machine_id
        finally:
            for spec in specs:
                await provider.destroy(spec.host_id)

    async def test_destroy_is_verified_and_repeatable(
        self, provider: Provider, machine_spec_factory: SpecFactory
    ) -> None:
        spec = machine_spec_factory()
        await self._create(provider, spec)
        await provider.destroy(spec.host_id)
        assert await provider.find(spec.host_id) is None
        assert spec.host_id not in {m.host_id for m in await provider.list_owned()}
        await provider.destroy(spec.host_id)  # already gone: still a success
        assert await provider.find(spec.host_id) is None

    async def test_find_unknown_is_none(self, provider: Provider) -> None:
        assert await provider.find(str(uuid.uuid4())) is None

    async def test_a_bad_profile_is_permanent_and_leaves_nothing(
        self, provider: Provider, machine_spec_factory: SpecFactory, bad_profile: dict[str, Any]
    ) -> None:
        spec = machine_spec_factory(profile=bad_profile)
        try:
            with pytest.raises(PermanentError) as caught:
                await provider.create_or_find(spec)
            assert str(caught.value).strip(), "the peer's message is kept"
            assert caught.value.source == provider.name
            assert await provider.find(spec.host_id) is None
        finally:
            await provider.destroy(spec.host_id)

    async def test_an_unreachable_peer_is_retryable(
        self, unreachable_provider: Provider, machine_spec_factory: SpecFactory
    ) -> None:
        with pytest.raises(RetryableError):
            await unreachable_provider.ensure_started()
            await unreachable_provider.create_or_find(machine_spec_factory())
