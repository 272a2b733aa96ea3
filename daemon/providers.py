"""The provider contract: one class per platform, one instance per configured ``[providers.NAME]``.

A provider creates machines that carry governord's ownership marker (``governord:host-id=<uuid>``),
finds them again by that marker, reports their power state and addresses, destroys them (verified
gone) and lists every machine governord owns on it (for the sweep). Vendor SDKs are synchronous:
implementations call them through :meth:`Provider.call_sync`, which runs them in a thread under the
instance's concurrency limit, so the event loop is never blocked.

Plugins make a provider type known in ``governord_register_providers``, by its name and config
models only, so that its vendor SDK is not imported unless a config uses the type
(:class:`LazyProvider`; the class itself, already imported, may be given too)::

    @hookimpl
    def governord_register_providers(registry):
        from .config import VSphereConfig, VSphereProfile   # no SDK in that module
        registry.add(LazyProvider("vsphere", "governord.plugins.vsphere.provider:VSphereProvider",
                                  Config=VSphereConfig, Profile=VSphereProfile, requires=["pyVmomi"]))
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import importlib.util
import types
import typing
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .errors import PermanentError, RetryableError
from .models import Machine, MachineSpec, PowerState

T = TypeVar("T")
C = TypeVar("C", bound=type)


def _scalar_kinds(annotation: Any) -> tuple[set[type], set[str]] | None:
    """What a field made only of numbers, booleans, literal strings and None takes: the types,
    and the literal strings. ``None`` for any other field (strings, paths, lists, models...)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _scalar_kinds(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        values = typing.get_args(annotation)
        return {type(v) for v in values}, {v for v in values if isinstance(v, str)}
    if origin in (typing.Union, types.UnionType):
        kinds: set[type] = set()
        literals: set[str] = set()
        for arg in typing.get_args(annotation):
            if arg is type(None):
                continue
            found = _scalar_kinds(arg)
            if found is None:
                return None
            kinds |= found[0]
            literals |= found[1]
        return kinds, literals
    if annotation in (bool, int, float):
        return {annotation}, set()
    return None


def _kind_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(value), "a value")


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, not silently ignored, and a
    number, boolean or choice is taken only as itself (pydantic would read ``"4"`` as 4,
    ``true`` as 1 and ``"yes"`` as true)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        field_name = info.field_name or ""
        found = _scalar_kinds(cls.model_fields[field_name].annotation) if field_name in cls.model_fields else None
        if found is None or value is None:
            return value
        kinds, literals = found
        if isinstance(value, bool):
            taken = bool in kinds
        elif isinstance(value, int):
            taken = int in kinds or float in kinds
        elif isinstance(value, float):
            taken = float in kinds
        elif isinstance(value, str):
            taken = value in literals
        else:
            return value  # lists, tables: pydantic says what is wrong with them
        if not taken:
            wanted = [name for kind, name in ((int, "an integer"), (float, "a number"), (bool, "true or false"))
                      if kind in kinds]
            wanted += [repr(v) for v in sorted(literals)]
            raise ValueError(f"must be {' or '.join(wanted)}, not {_kind_name(value)} ({value!r})")
        return value


class ProviderConfig(StrictModel):
    """Keys every ``[providers.NAME]`` section has; a provider type adds its own."""

    #: the provider type, as registered (``vsphere``, ``openstack``, ...)
    type: str
    #: at most this many SDK calls of this instance run at once
    max_concurrency: int = Field(default=4, ge=1, le=256)
    #: seconds one SDK call may take before it is abandoned as a retryable failure
    call_timeout: float = Field(default=300.0, gt=0)
    #: seconds a new machine may take to come up with an address
    ready_timeout: float = Field(default=900.0, gt=0)
    #: tries of a provision or deprovision step that failed with a passing error (default: [engine])
    retry_limit: int | None = Field(default=None, ge=0)
    #: first delay between those tries, doubled each time (default: [engine])
    retry_backoff: float | None = Field(default=None, ge=0)
    #: longest delay between those tries (default: [engine])
    retry_backoff_max: float | None = Field(default=None, ge=0)


@dataclass(frozen=True)
class NodeShape:
    """What a role's profile says of the machines it makes: for the Kubernetes node template
    (the Cluster Autoscaler's scale-up from zero). None where the profile does not say (a
    template's own size, a flavor known only to the cloud)."""

    cpus: int | None = None
    memory_mb: int | None = None
    #: the instance type or flavor name, for the node.kubernetes.io/instance-type label
    instance_type: str | None = None


class ProviderProfile(StrictModel):
    """Per-role settings for a provider (template, size, ...). Provider types subclass it."""

    def node_shape(self) -> NodeShape:
        """What this profile says of its machines' size; a type whose profile sets one overrides it."""
        return NodeShape()


def backoff_delay(backoff: float, attempt: int) -> float:
    """Seconds a plugin waits before repeating a call after try ``attempt`` failed in transit:
    none before the first repeat, then ``backoff * 2**(n-1)`` before the n-th (urllib3's
    schedule, which the requests-based plugins get from urllib3 itself)."""
    return 0.0 if attempt <= 1 else backoff * 2 ** (attempt - 1)


def call_budget(timeout: float, tries: int, backoff: float) -> float:
    """Seconds one SDK call may take in all when the plugin repeats it: every try up to
    ``timeout``, and the waits between them. The instance's ``call_timeout`` (the thread's limit
    in :meth:`ConfiguredInstance.call_sync`) must allow that much."""
    return tries * timeout + sum(backoff_delay(backoff, n) for n in range(1, tries))


class ConfiguredInstance:
    """What providers and registrars share: one instance per config section, a lazy start, and
    blocking SDK calls run in threads, at most ``max_concurrency`` at once, each under
    ``call_timeout``.

    Each instance has its own pool of ``max_concurrency`` threads. asyncio's default executor
    has ``min(32, cores + 4)`` threads for the whole process (6 on two cores), which every
    instance would share: with three instances of limit 10 that capped the daemon at 6 SDK
    calls at once, and one slow peer holding those threads stalled the others."""

    def __init__(self, name: str, config: Any, *, state_dir: Path | None = None) -> None:
        self.name = name
        self.config = config
        #: governord's state directory, for caches an instance may keep (None in some tests)
        self.state_dir = state_dir
        self._limit = asyncio.Semaphore(config.max_concurrency)
        self._call_timeout: float = config.call_timeout
        self._executor: ThreadPoolExecutor | None = None
        self._started = False
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        """Connect to the system. Called (again) by :meth:`ensure_started` until it succeeds."""

    async def ensure_started(self) -> None:
        """Start once; a start that failed (peer down at boot) is tried again on next use."""
        if self._started:
            return
        async with self._start_lock:
            if not self._started:
                await self.start()
                self._started = True

    async def close(self) -> None:
        """Release connections (log out). Called once at shutdown."""

    async def list_owned(self) -> Any:
        """What carries governord's ownership marker here (Provider and Registrar say more)."""
        return None

    async def probe(self) -> bool:
        """Ask the system something that needs the connection and the credentials to work, for
        the health checks (``[health]``, ``/readyz``); raise when it cannot be reached or refuses
        (the exception says why). True when it answered, False when this type cannot be asked.

        The default lists what carries the ownership marker (:meth:`list_owned`): honest, but a
        listing that costs a call per entry should be replaced by one cheap authenticated call."""
        await self.ensure_started()
        return await self.list_owned() is not None

    def require_readable(self, *keys: str, label: str) -> None:
        """Fail for good, naming the key, if a configured file (certificate, key, CA) is not
        readable: a typo in a path will not go away by retrying."""
        for key in keys:
            path: Path | None = getattr(self.config, key)
            if path is None:
                continue
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise PermanentError(f"{label} {key} {path}: {exc.strerror}", source=self.name) from None

    def _threads(self) -> ThreadPoolExecutor:
        """This instance's thread pool, made on first use; its idle threads end when the
        instance is dropped (a reload builds new instances) or the process exits."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.config.max_concurrency, thread_name_prefix=f"governord-{self.name}"
            )
            weakref.finalize(self, self._executor.shutdown, wait=False)
        return self._executor

    async def call_sync(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call in a thread, under the concurrency limit and the call timeout.

        A timeout is a :class:`RetryableError`; the thread itself cannot be killed and finishes
        in the background, which is why every step must be idempotent. A cancellation (the
        step's lease was lost, or shutdown) always propagates, even when the call has just
        finished: Python 3.11's ``asyncio.wait_for`` returned the result then and swallowed
        the cancellation, and the step went on making calls.
        """
        async with self._limit:
            context = contextvars.copy_context()
            call = functools.partial(context.run, func, *args, **kwargs)
            try:
                async with asyncio.timeout(self._call_timeout):
                    return await asyncio.get_running_loop().run_in_executor(self._threads(), call)
            except TimeoutError as exc:
                raise RetryableError(
                    f"{getattr(func, '__name__', func)} took longer than {self._call_timeout}s",
                    source=self.name,
                ) from exc


class Provider(ConfiguredInstance, ABC):
    """Base class of every provider. Subclasses set ``type_name``, ``Config`` and ``Profile``."""

    #: name used in ``type = "..."`` of a ``[providers.NAME]`` section
    type_name: ClassVar[str]
    #: the pydantic model of this type's ``[providers.NAME]`` section
    Config: ClassVar[type[ProviderConfig]] = ProviderConfig
    #: the pydantic model of a role's ``profile`` table for this type
    Profile: ClassVar[type[ProviderProfile]] = ProviderProfile
    config: ProviderConfig

    # -- the contract ---------------------------------------------------------------------

    @abstractmethod
    async def create_or_find(self, spec: MachineSpec) -> Machine:
        """Return the machine carrying ``spec.host_id`` as ownership marker, creating it if none does.

        Must be idempotent: called again after a crash, it finds the machine made the first time.
        Starts the machine.
        """

    @abstractmethod
    async def wait_ready(self, machine: Machine, timeout: float) -> Machine:
        """Wait until the machine is powered on and has an address; return it with its addresses."""

    @abstractmethod
    async def find(self, host_id: str) -> Machine | None:
        """Return the machine with this ownership marker, or None."""

    @abstractmethod
    async def power_state(self, machine_id: str) -> PowerState:
        """The machine's current power state, as read from the platform."""

    @abstractmethod
    async def destroy(self, host_id: str) -> None:
        """Stop and delete the machine with this marker, and verify that it is gone.

        Destroying what is already gone succeeds.
        """

    @abstractmethod
    async def list_owned(self) -> list[Machine]:
        """Every machine on this provider that carries governord's ownership marker."""


class LazyType(Generic[C]):
    """A provider or registrar type made known by its name and config models, without importing
    its class: the module that defines the class (and the vendor SDK that module imports) is
    imported by :meth:`load`, when a config uses the type. Vendor SDKs are large (pyvmomi,
    openstacksdk, boto3, ovirtsdk4: about 100 MB of RSS in all), and most sites use one or two.

    :param implementation: ``"package.module:Class"``.
    :param requires: top-level modules the implementation imports (``"boto3"``). Each is looked
        up, not imported, here: one that is not installed raises ModuleNotFoundError at
        registration, so the plugin is reported unavailable as if it had imported the SDK.
    :param models: the config models the class carries (``Config``, and ``Profile`` or
        ``TagMapping``), from a module without the SDK; :meth:`load` checks the class has
        these very models.
    """

    def __init__(self, type_name: str, implementation: str, *, requires: Iterable[str] = (),
                 **models: type[BaseModel]) -> None:
        module, _, attribute = implementation.partition(":")
        if not module or not attribute:
            raise ValueError(f"implementation of type {type_name!r} must be 'module:Class', not {implementation!r}")
        for required in requires:
            if importlib.util.find_spec(required.partition(".")[0]) is None:
                raise ModuleNotFoundError(f"No module named {required!r} (needed by type {type_name!r})",
                                          name=required)
        self.type_name = type_name
        self.implementation = implementation
        self.requires = tuple(requires)
        self.models = models
        self._class: C | None = None

    def __getattr__(self, name: str) -> Any:
        # the config models (Config, Profile, TagMapping) without loading the class
        models = self.__dict__.get("models", {})
        if name in models:
            return models[name]
        raise AttributeError(name)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, LazyType) and other.type_name == self.type_name
                and other.implementation == self.implementation)

    def __hash__(self) -> int:
        return hash((self.type_name, self.implementation))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.type_name!r}, {self.implementation!r})"

    @property
    def loaded(self) -> bool:
        return self._class is not None

    def load(self) -> C:
        """The class, imported on first use (with its SDK). Raises what the import raises."""
        if self._class is None:
            module, _, attribute = self.implementation.partition(":")
            cls = getattr(importlib.import_module(module), attribute)
            if getattr(cls, "type_name", None) != self.type_name:
                raise TypeError(f"{self.implementation} is type {getattr(cls, 'type_name', None)!r}, "
                                f"registered as {self.type_name!r}")
            for name, model in self.models.items():
                if getattr(cls, name, None) is not model:
                    raise TypeError(f"{self.implementation}.{name} is not the {model.__name__} "
                                    f"type {self.type_name!r} was registered with")
            self._class = cls
        return self._class


def resolve_type(entry: C | LazyType[C]) -> C:
    """A registry entry's class: loaded (with its SDK) if it was registered lazily."""
    return entry.load() if isinstance(entry, LazyType) else entry


class LazyProvider(LazyType["type[Provider]"]):
    """A provider type registered without importing its SDK (see :class:`LazyType`)."""

    Config: type[ProviderConfig]
    Profile: type[ProviderProfile]

    def __init__(self, type_name: str, implementation: str, *, Config: type[ProviderConfig],  # noqa: N803
                 Profile: type[ProviderProfile] = ProviderProfile, requires: Iterable[str] = ()) -> None:
        super().__init__(type_name, implementation, requires=requires, Config=Config, Profile=Profile)


class ProviderRegistry:
    """Provider types known to this process, filled through ``governord_register_providers``:
    classes, or :class:`LazyProvider` entries whose class is imported when first loaded."""

    def __init__(self) -> None:
        self._types: dict[str, type[Provider] | LazyProvider] = {}

    def add(self, provider_type: type[Provider] | LazyProvider) -> None:
        name = provider_type.type_name
        if name in self._types and self._types[name] != provider_type:
            raise ValueError(f"provider type {name!r} is registered twice")
        self._types[name] = provider_type

    def get(self, name: str) -> type[Provider] | LazyProvider | None:
        """The entry: the class, or the lazy entry with its config models (nothing imported)."""
        return self._types.get(name)

    def load(self, name: str) -> type[Provider]:
        """The class of type ``name``, imported now if it was registered lazily.

        :raises KeyError: no such type. Whatever importing its module raises (ImportError...)."""
        return resolve_type(self._types[name])

    def names(self) -> list[str]:
        return sorted(self._types)


__all__ = [
    "LazyProvider",
    "LazyType",
    "PermanentError",
    "Provider",
    "ProviderConfig",
    "ProviderProfile",
    "ProviderRegistry",
    "RetryableError",
    "ConfiguredInstance",
    "StrictModel",
]
