"""The registrar contract: one class per configuration-management system (Foreman, Satellite, ...).

One instance per configured ``[registrars.NAME]`` section. A registrar turns a host's tags into
its own classification (``[tags.TAG.NAME]`` tables, validated by its ``TagMapping`` model),
registers the host with that classification, re-applies it after a tag change, and removes the
host again, verified gone.

Registration is at-least-once: after a crash the engine repeats the step, so :meth:`register` and
:meth:`deregister` must be idempotent (upsert; "already gone" is success).

For the sweep, a registrar lists the entries it holds that carry governord's ownership marker
(:meth:`Registrar.list_owned`) and removes one such entry by its own id (:meth:`Registrar.remove_owned`),
never by name: a name may already belong to a newer host.

Plugins make a registrar type known in ``governord_register_registrars``, as a
:class:`LazyRegistrar` (its name and config models; the class and its client library are
imported only when a config uses the type) or as the class itself; the core wraps each
instance in a pluggy plugin that implements ``governord_classify_host``,
``governord_register_host``, ``governord_deregister_host`` and the sweep's hooks for it.
"""

from __future__ import annotations

import builtins
import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import Field

from .models import OWNERSHIP_KEY, HostView
from .providers import ConfiguredInstance, LazyType, StrictModel, resolve_type


class Phase(str, enum.Enum):
    """When a registrar's record is removed on retirement."""

    #: before the machine is destroyed (Foreman, Satellite, the Puppet certificate)
    BEFORE_MACHINE = "before-machine"
    #: after the machine is gone, so it cannot bring the record back (PuppetDB: a node that
    #: reports again is reactivated)
    AFTER_MACHINE = "after-machine"


_MARKER = re.compile(re.escape(OWNERSHIP_KEY) + r"=([0-9A-Za-z-]+)")


def marker_of(text: str | None) -> str | None:
    """The host id an ownership marker (``governord:host-id=<uuid>``) in ``text`` names, or None.

    A marker is a line (or a whole value) of its own; text that merely mentions the key elsewhere
    does not count."""
    if not text:
        return None
    for line in str(text).splitlines():
        match = _MARKER.fullmatch(line.strip())
        if match:
            return match.group(1)
    return None


@dataclass(frozen=True)
class Registration:
    """One entry a registrar holds that carries governord's ownership marker (for the sweep)."""

    #: the registrar instance (``[registrars.NAME]``) that holds it
    system: str
    #: the system's own id of the entry (Foreman host id, Satellite system id, certname, ...)
    entry_id: str
    #: the name the system knows it by (FQDN or certname)
    name: str
    #: the governord host id its marker names
    host_id: str
    #: JSON-serialisable particulars worth showing (state, comment, ...)
    details: dict[str, Any] = field(default_factory=dict)


class RegistrarConfig(StrictModel):
    """Keys every ``[registrars.NAME]`` section has; a registrar type adds its own."""

    #: the registrar type, as registered (``foreman``, ``satellite``, ...)
    type: str
    #: seconds one call to the system may take
    call_timeout: float = Field(default=60.0, gt=0)
    #: at most this many calls to the system at once
    max_concurrency: int = Field(default=4, ge=1, le=256)

    def check_peers(
        self, registrars: Mapping[str, RegistrarConfig], mappings: Mapping[str, builtins.type[TagMapping]]
    ) -> None:
        """Rules that reach beyond this section, checked once every section is valid on its own:
        ``registrars`` are all configured ``[registrars.NAME]`` sections by name, ``mappings``
        each one's ``TagMapping`` model. Raise :class:`~governord.errors.FieldError` naming the
        key of this section to fix (reported as ``registrars.NAME.KEY``). None by default."""


class TagMapping(StrictModel):
    """What one tag means to one registrar. Registrar types subclass it."""


#: the base class under a name no class attribute called ``TagMapping`` shadows
AnyTagMapping = TagMapping


class Registrar(ConfiguredInstance, ABC):
    """Base class of every registrar. Subclasses set ``type_name``, ``Config`` and ``TagMapping``."""

    type_name: ClassVar[str]
    Config: ClassVar[type[RegistrarConfig]] = RegistrarConfig
    TagMapping: ClassVar[type[TagMapping]] = TagMapping
    #: when :meth:`deregister` runs on retirement
    deregister_phase: ClassVar[Phase] = Phase.BEFORE_MACHINE
    #: The keys of this registrar's records (what :meth:`prepare` and :meth:`register` return)
    #: and of its classification that an application may see in the views of its hosts (host
    #: lists, request status, callbacks). Every other key is for operators (the admin API) and
    #: the machine only: one-time tokens, activation keys, cloud-config. Each registrar type
    #: declares it itself (tests/meta checks every entry-point plugin's); the base class
    #: declares nothing on purpose, and the records of a type that declares nothing are
    #: withheld from applications entirely (see :meth:`application_view`).
    application_keys: ClassVar[frozenset[str]]
    config: RegistrarConfig

    @classmethod
    def application_view(cls, record: Any) -> dict[str, Any]:
        """What an application may see of one of this type's records (or classifications):
        the declared :attr:`application_keys`, nothing else."""
        return application_view(record, declared_keys(cls))

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

    async def list_owned(self) -> list[Registration] | None:
        """Every entry in this system that carries governord's ownership marker, whoever's it is
        (live, gone or unknown hosts alike). None: this registrar cannot list what it holds, and
        the sweep says so."""
        return None

    async def check_mappings(self, mappings: Mapping[str, AnyTagMapping]) -> dict[tuple[str, str], str]:
        """Ask the system whether what the tags' mappings for this registrar name exists there
        (``mappings``: tag -> this registrar's ``[tags.TAG.NAME]`` table), before a host fails on
        it. Return ``{(TAG, KEY): why}`` for each that does not (raise
        :class:`~governord.errors.MissingAtPeer` inside, catch it here); let any other failure
        (the system cannot be asked) propagate. Checked at start and before a reload is taken.
        Nothing by default."""
        return {}

    async def remove_owned(self, entry: Registration) -> bool:
        """Remove exactly this entry (by ``entry.entry_id``), verified gone, if it still carries the
        marker of ``entry.host_id``. Returns False when there was nothing to remove: already gone,
        or the entry now belongs to another host (then it is left alone). Idempotent."""
        raise NotImplementedError(f"{type(self).__name__} cannot remove entries it listed")


def declared_keys(registrar_type: type[Registrar]) -> frozenset[str]:
    """The :attr:`Registrar.application_keys` a registrar type declares (none if it does not)."""
    keys = getattr(registrar_type, "application_keys", None)
    return frozenset(keys) if isinstance(keys, (frozenset, set)) else frozenset()


def application_view(record: Any, keys: frozenset[str] | None) -> dict[str, Any]:
    """Only the ``keys`` of ``record``: what an application may see of it. A record that is not
    a mapping, or a system that declared no keys (``None``), shows nothing."""
    if not keys or not isinstance(record, Mapping):
        return {}
    return {key: value for key, value in record.items() if key in keys}


class LazyRegistrar(LazyType["type[Registrar]"]):
    """A registrar type registered without importing its client library (see
    :class:`~governord.providers.LazyType`)."""

    Config: type[RegistrarConfig]
    TagMapping: type[AnyTagMapping]

    def __init__(self, type_name: str, implementation: str, *, Config: type[RegistrarConfig],  # noqa: N803
                 TagMapping: type[AnyTagMapping] = AnyTagMapping, requires: Iterable[str] = ()) -> None:  # noqa: N803
        super().__init__(type_name, implementation, requires=requires, Config=Config, TagMapping=TagMapping)


class RegistrarRegistry:
    """Registrar types known to this process, filled through ``governord_register_registrars``:
    classes, or :class:`LazyRegistrar` entries whose class is imported when first loaded."""

    def __init__(self) -> None:
        self._types: dict[str, type[Registrar] | LazyRegistrar] = {}

    def add(self, registrar_type: type[Registrar] | LazyRegistrar) -> None:
        name = registrar_type.type_name
        if name in self._types and self._types[name] != registrar_type:
            raise ValueError(f"registrar type {name!r} is registered twice")
        self._types[name] = registrar_type

    def get(self, name: str) -> type[Registrar] | LazyRegistrar | None:
        """The entry: the class, or the lazy entry with its config models (nothing imported)."""
        return self._types.get(name)

    def load(self, name: str) -> type[Registrar]:
        """The class of type ``name``, imported now if it was registered lazily.

        :raises KeyError: no such type. Whatever importing its module raises (ImportError...)."""
        return resolve_type(self._types[name])

    def names(self) -> list[str]:
        return sorted(self._types)
