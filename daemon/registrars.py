"""The registrar contract: one class per configuration-management system (Foreman, Satellite, ...).

One instance per configured ``[registrars.NAME]`` section. A registrar turns a host's tags into
its own classification (``[tags.TAG.NAME]`` tables, validated by its ``TagMapping`` model),
registers the host with that classification, re-applies it after a tag change, and removes the
host again, verified gone.

Registration is at-least-once: after a crash the engine repeats the step, so :meth:`register` and
:meth:`deregister` must be idempotent (upsert; "already gone" is success).

Plugins make a registrar type known in ``governord_register_registrars``; the core wraps each
instance in a pluggy plugin that implements ``governord_classify_host``,
``governord_register_host`` and ``governord_deregister_host`` for it.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pydantic import Field

from .models import HostView
from .providers import ConfiguredInstance, StrictModel


class Phase(str, enum.Enum):
    """When a registrar's record is removed on retirement."""

    #: before the machine is destroyed (Foreman, Satellite, the Puppet certificate)
    BEFORE_MACHINE = "before-machine"
    #: after the machine is gone, so it cannot bring the record back (PuppetDB: a node that
    #: reports again is reactivated)
    AFTER_MACHINE = "after-machine"


class RegistrarConfig(StrictModel):
    """Keys every ``[registrars.NAME]`` section has; a registrar type adds its own."""

    #: the registrar type, as registered (``foreman``, ``satellite``, ...)
    type: str
    #: seconds one call to the system may take
    call_timeout: float = Field(default=60.0, gt=0)
    #: at most this many calls to the system at once
    max_concurrency: int = Field(default=4, ge=1, le=256)


class TagMapping(StrictModel):
    """What one tag means to one registrar. Registrar types subclass it."""


class Registrar(ConfiguredInstance, ABC):
    """Base class of every registrar. Subclasses set ``type_name``, ``Config`` and ``TagMapping``."""

    type_name: ClassVar[str]
    Config: ClassVar[type[RegistrarConfig]] = RegistrarConfig
    TagMapping: ClassVar[type[TagMapping]] = TagMapping
    #: when :meth:`deregister` runs on retirement
    deregister_phase: ClassVar[Phase] = Phase.BEFORE_MACHINE
    config: RegistrarConfig

    @abstractmethod
    def classify(self, mappings: list[tuple[str, Any]]) -> dict[str, Any]:
        """Merge the mappings of a host's tags (in tag order, ``(tag, TagMapping)``) into one
        JSON-serialisable classification for this registrar. Pure; no I/O."""

    async def prepare(self, host: HostView, classification: dict[str, Any]) -> dict[str, Any] | None:
        """Before the machine exists: authorise it in advance (e.g. a one-time Puppet autosign
        token for exactly its certificate name). Return a record stored with the host (it is
        given back as ``host.registrations[self.name]``); a ``"cloud_config"`` mapping in it is
        merged into the machine's cloud-init user data. Idempotent: called again after a crash,
        reuse what the first call made."""
        return None

    async def check_ready(self, host: HostView, waited: float) -> bool | None:
        """After registration: is the host configured as its classification demands (e.g. a
        successful Puppet report with the classes its tags need)? None if this registrar has no
        say, False to be asked again later. ``waited`` is how long the host has been waiting;
        raise :class:`~governord.errors.PermanentError` with the reason when it has waited too
        long or configuration failed."""
        return None

    @abstractmethod
    async def register(self, host: HostView, classification: dict[str, Any]) -> dict[str, Any]:
        """Create or update the host so that it matches ``classification``; return a record of
        what exists now (ids), stored with the host. Idempotent."""

    @abstractmethod
    async def deregister(self, host: HostView) -> None:
        """Remove the host and verify that it is gone. Removing what is already gone succeeds."""

    @abstractmethod
    async def lookup(self, host: HostView) -> dict[str, Any] | None:
        """What this system knows of the host now (None if nothing): used to verify and sweep."""


class RegistrarRegistry:
    """Registrar types known to this process, filled through ``governord_register_registrars``."""

    def __init__(self) -> None:
        self._types: dict[str, type[Registrar]] = {}

    def add(self, registrar_type: type[Registrar]) -> None:
        name = registrar_type.type_name
        if name in self._types and self._types[name] is not registrar_type:
            raise ValueError(f"registrar type {name!r} is registered twice")
        self._types[name] = registrar_type

    def get(self, name: str) -> type[Registrar] | None:
        return self._types.get(name)

    def names(self) -> list[str]:
        return sorted(self._types)
