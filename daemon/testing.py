"""Helpers for testing governord and its plugins: an in-process provider and registrar that
keep their "other side" in plain dicts a test can inspect, with failures and delays on demand.

They are for engine tests and benchmarks; integrations are tested against their real peers
(vcsim, the lab's Foreman and Satellite simulators). Use them by registering
:data:`plugin` in a :class:`~governord.dispatch.pluginmanager.PluginManager`::

    plugins.register(governord.testing.plugin, "testing")
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import hookimpl
from .errors import PermanentError, RetryableError
from .models import HostView, Machine, MachineSpec, PowerState
from .providers import Provider, ProviderConfig, ProviderProfile
from .registrars import Phase, Registrar, RegistrarConfig, Registration, TagMapping

#: every external action of the in-memory provider and registrars, in order: (what, who, host)
journal: list[tuple[str, str, str]] = []


@dataclass
class Faults:
    """Failures to inject: the next ``count`` calls of ``method`` raise."""

    plan: dict[str, list[Exception]] = field(default_factory=dict)
    delay: float = 0.0

    def fail(self, method: str, error: Exception, count: int = 1) -> None:
        self.plan.setdefault(method, []).extend([error] * count)

    async def check(self, method: str) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        pending = self.plan.get(method)
        if pending:
            raise pending.pop(0)


class MemoryProviderConfig(ProviderConfig):
    pass


class MemoryProfile(ProviderProfile):
    size: str = "small"


class MemoryProvider(Provider):
    """Machines are dict entries in ``MemoryProvider.worlds[instance name]``."""

    type_name = "memory"
    Config = MemoryProviderConfig
    Profile = MemoryProfile
    worlds: ClassVar[dict[str, dict[str, Machine]]] = {}
    faults: ClassVar[dict[str, Faults]] = {}
    _ids = itertools.count(1)
    #: host id -> machine id per world, so that finding is not a scan (the engine benchmark
    #: keeps 10,000 machines); rebuilt whenever a test changed the world by hand
    _by_host: ClassVar[dict[str, tuple[dict[str, Machine], dict[str, str]]]] = {}

    @property
    def world(self) -> dict[str, Machine]:
        return self.worlds.setdefault(self.name, {})

    @property
    def fault(self) -> Faults:
        return self.faults.setdefault(self.name, Faults())

    async def create_or_find(self, spec: MachineSpec) -> Machine:
        await self.fault.check("create_or_find")
        found = await self.find(spec.host_id)
        if found is not None:
            return found
        if not spec.profile:
            raise PermanentError("empty profile", source=self.name)
        machine = Machine(
            provider=self.name, machine_id=f"m-{next(self._ids)}", name=spec.hostname, host_id=spec.host_id,
            power=PowerState.ON, addresses=(spec.network.address or f"10.0.0.{len(self.world) + 1}",),
        )
        index = self._index()
        self.world[machine.machine_id] = machine
        index[spec.host_id] = machine.machine_id
        return machine

    def _index(self) -> dict[str, str]:
        world = self.world
        indexed, index = self._by_host.get(self.name, (None, {}))
        if indexed is not world or len(index) != len(world):
            index = {m.host_id: m.machine_id for m in world.values() if m.host_id}
            self._by_host[self.name] = (world, index)
        return index

    async def wait_ready(self, machine: Machine, timeout: float) -> Machine:
        await self.fault.check("wait_ready")
        return self.world[machine.machine_id]

    async def find(self, host_id: str) -> Machine | None:
        machine = self.world.get(self._index().get(host_id, ""))
        return machine if machine is not None and machine.host_id == host_id else None

    async def power_state(self, machine_id: str) -> PowerState:
        machine = self.world.get(machine_id)
        return machine.power if machine else PowerState.UNKNOWN

    async def destroy(self, host_id: str) -> None:
        await self.fault.check("destroy")
        machine = await self.find(host_id)
        if machine is not None:
            index = self._index()
            del self.world[machine.machine_id]
            index.pop(host_id, None)
            journal.append(("destroy", self.name, machine.name))

    async def probe(self) -> bool:
        """The health checks' question: its own fault (``probe``), apart from the listing's."""
        await self.fault.check("probe")
        return True

    async def list_owned(self) -> list[Machine]:
        await self.fault.check("list_owned")
        return [m for m in self.world.values() if m.host_id]


class MemoryTagMapping(TagMapping):
    group: str | None = None
    classes: list[str] = []


class MemoryRegistrar(Registrar):
    """Registrations are dict entries in ``MemoryRegistrar.worlds[instance name]``."""

    type_name = "memory"
    Config = RegistrarConfig
    TagMapping = MemoryTagMapping
    #: the registration's name and the classification; not the token nor its cloud-config
    application_keys: ClassVar[frozenset[str]] = frozenset({"name", "group", "classes"})
    worlds: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}
    faults: ClassVar[dict[str, Faults]] = {}
    #: per instance: fqdn -> whether check_ready says ready (absent: no opinion)
    readiness: ClassVar[dict[str, dict[str, bool]]] = {}
    #: per instance: whether prepare hands out a one-time token with cloud-config
    preauthorise: ClassVar[dict[str, bool]] = {}
    #: per instance: fqdn -> the token prepare handed out, until deregister takes it back (what a
    #: CA's or DNS server's side of a prepare would keep)
    tokens: ClassVar[dict[str, dict[str, str]]] = {}

    @property
    def world(self) -> dict[str, dict[str, Any]]:
        return self.worlds.setdefault(self.name, {})

    @property
    def fault(self) -> Faults:
        return self.faults.setdefault(self.name, Faults())

    def classify(self, mappings: list[tuple[str, Any]]) -> dict[str, Any]:
        group = next((m.group for _, m in mappings if m.group), None)
        classes: list[str] = []
        for _, m in mappings:
            classes += [c for c in m.classes if c not in classes]
        return {"group": group, "classes": classes}

    async def prepare(self, host: HostView, classification: dict[str, Any]) -> dict[str, Any] | None:
        if not self.preauthorise.get(self.name):
            return None
        await self.fault.check("prepare")
        earlier = host.registrations.get(self.name)
        if earlier:
            return earlier
        journal.append(("prepare", self.name, host.name))
        token = f"token-{host.id[:8]}"
        self.tokens.setdefault(self.name, {})[host.fqdn] = token
        return {"autosign_token": token, "cloud_config": {self.name: {"token": token}}}

    async def register(self, host: HostView, classification: dict[str, Any]) -> dict[str, Any]:
        await self.fault.check("register")
        self.world[host.fqdn] = {"host_id": host.id, "address": host.primary_address, **classification}
        journal.append(("register", self.name, host.name))
        return {"name": host.fqdn}

    async def check_ready(self, host: HostView, waited: float) -> bool | None:
        return self.readiness.get(self.name, {}).get(host.fqdn)

    async def deregister(self, host: HostView) -> None:
        await self.fault.check("deregister")
        self.tokens.get(self.name, {}).pop(host.fqdn, None)
        if self.world.pop(host.fqdn, None) is not None:
            journal.append(("deregister", self.name, host.name))

    async def lookup(self, host: HostView) -> dict[str, Any] | None:
        return self.world.get(host.fqdn)

    async def probe(self) -> bool:
        """The health checks' question: its own fault (``probe``), apart from the listing's."""
        await self.fault.check("probe")
        return True

    async def list_owned(self) -> list[Registration] | None:
        """Every entry (they all carry the host id they were registered for)."""
        await self.fault.check("list_owned")
        return [
            Registration(self.name, fqdn, fqdn, entry["host_id"], {"group": entry.get("group")})
            for fqdn, entry in self.world.items() if entry.get("host_id")
        ]

    async def remove_owned(self, entry: Registration) -> bool:
        await self.fault.check("remove_owned")
        current = self.world.get(entry.entry_id)
        if current is None or current.get("host_id") != entry.host_id:
            return False
        del self.world[entry.entry_id]
        journal.append(("remove", self.name, entry.name))
        return True


class MemoryLateRegistrar(MemoryRegistrar):
    """Like MemoryRegistrar, but its records are removed after the machine is gone (as PuppetDB's)."""

    type_name = "memory-late"
    deregister_phase = Phase.AFTER_MACHINE


class _Plugin:
    @hookimpl
    def governord_register_providers(self, registry: Any) -> None:
        registry.add(MemoryProvider)

    @hookimpl
    def governord_register_registrars(self, registry: Any) -> None:
        registry.add(MemoryRegistrar)
        registry.add(MemoryLateRegistrar)


#: Register this to make the ``memory`` provider and registrar types known.
plugin = _Plugin()

__all__ = ["Faults", "MemoryProvider", "MemoryRegistrar", "RetryableError", "plugin"]
