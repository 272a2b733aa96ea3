"""The bare-metal provider: a declared pool of machines, driven through their BMCs.

Provisioning allocates a free pool machine that meets the role's constraints, records the
allocation, sets a one-time network (PXE) boot and powers the machine on; the site's PXE and
install setup does the rest, and the machine counts as up once its sshd (``ready_port``)
accepts a TCP connection on its configured address. Releasing powers it off, clears the boot
override and frees the allocation.

Act only on a confirmed power state. Every power or boot command is preceded by a successful
power read in the same step; a machine whose power cannot be read is never power-cycled: it is
marked unusable with the reason (kept in the allocation file, logged, shown by :meth:`pool`)
and allocation passes it by. A free machine found powered on is not ours to touch (someone may
be using it): it is marked and passed by the same way. Marks are re-checked, last, when no
unmarked machine is left: a mark is cleared only by a confirmed "off" reading.

Ownership: the allocation file (:mod:`.state`) is the marker, and it is written *before* the
BMC is touched, so a crash between the two finds the allocation again instead of taking a
second machine.

Error decisions:

- no machine in the pool could ever meet the constraints: :class:`PermanentError`;
- every matching machine is allocated: :class:`PermanentError` (capacity returns only when
  another host is retired, usually far beyond the engine's retry window; the request fails
  with the reason instead of hanging in retries);
- matching machines are free but none usable right now (BMC unreachable, power unreadable,
  found powered on): :class:`RetryableError`, unless every one failed for a reason no retry
  fixes (credentials rejected), then :class:`PermanentError`;
- ``wait_ready``: the caller's timeout running out is :class:`RetryableError`; the machine's
  ``boot_timeout`` (counted from the recorded power-on, across retries and restarts) running
  out is :class:`PermanentError` (the install did not come up; power-cycling blindly again
  would not help and might hide the reason).
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator

from governord.config import ReadableFile, SecretRef
from governord.errors import PermanentError, RetryableError, StepError
from governord.models import Machine, MachineSpec, PowerState
from governord.providers import NodeShape, Provider, ProviderConfig, ProviderProfile, StrictModel

from .bmc import Bmc, BmcError
from .state import Allocation, AllocationStore, PoolState, StateFileError

T = TypeVar("T")

log = logging.getLogger(__name__)

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class BmcConfig(StrictModel):
    """The ``bmc`` table of one pool machine."""

    #: how the BMC is spoken to
    protocol: Literal["ipmi", "redfish"]
    #: host name or IP address of the BMC
    address: str = Field(min_length=1)
    #: default: 623 (IPMI, UDP), 443 (Redfish over https) or 80 (Redfish over http)
    port: int | None = Field(default=None, ge=1, le=65535)
    username: str = Field(min_length=1)
    #: a secret reference, ``{ env = "NAME" }`` or ``{ file = "/path" }``
    password: SecretRef
    #: Redfish only: the ComputerSystem id; empty: the service's only System
    system_id: str | None = None
    #: Redfish only: ``https`` (default) or ``http``
    scheme: Literal["https", "http"] = "https"
    #: Redfish only: check the BMC's TLS certificate (against ``ca_file`` or the system's CAs)
    verify_tls: bool = True
    #: Redfish only: PEM file of the CA that signed the BMC's certificate
    ca_file: ReadableFile | None = None

    @model_validator(mode="after")
    def _redfish_only(self) -> BmcConfig:
        if self.protocol == "ipmi" and self.system_id is not None:
            raise ValueError("system_id is for redfish BMCs only")
        return self

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        if self.protocol == "ipmi":
            return 623
        return 443 if self.scheme == "https" else 80

    @property
    def key(self) -> tuple[str, str, int, str | None]:
        return (self.protocol, self.address, self.effective_port, self.system_id)


class MachineConfig(StrictModel):
    """One machine of the pool: its BMC and its hardware facts."""

    #: the machine's name in the pool (its ``machine_id``)
    name: str = Field(min_length=1, max_length=63)
    bmc: BmcConfig
    #: MAC address of the NIC it PXE-boots from (for the DHCP/PXE setup; informational here)
    mac: str | None = None
    #: the IP address its installed OS comes up with (DHCP reservation or kickstart)
    address: str
    cpus: int = Field(ge=1)
    memory_mb: int = Field(ge=1)
    rack: str | None = None
    #: free-form capabilities a role can ask for (``gpu``, ``ssd``, ...)
    labels: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"not a machine name (letters, digits, . _ -): {value!r}")
        return value

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is None:
            return None
        normalised = value.lower().replace("-", ":")
        if not _MAC.match(normalised):
            raise ValueError(f"not a MAC address: {value!r}")
        return normalised

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"not an IP address: {value!r}") from None


class BareMetalConfig(ProviderConfig):
    """A ``[providers.NAME]`` section of ``type = "baremetal"``."""

    #: the pool: every machine governord may allocate, with its BMC
    machines: list[MachineConfig] = Field(min_length=1)
    #: TCP port on a machine's address that accepts connections once its OS is up (sshd)
    ready_port: int = Field(default=22, ge=1, le=65535)
    #: seconds from power-on until the installed OS must answer on ready_port
    boot_timeout: float = Field(default=1800.0, gt=0)
    #: seconds a power change may take to show in the BMC's power reading
    power_timeout: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _unique(self) -> BareMetalConfig:
        for what, values in (
            ("name", [m.name for m in self.machines]),
            ("address", [m.address for m in self.machines]),
            ("bmc", [m.bmc.key for m in self.machines]),
        ):
            seen: set[Any] = set()
            for value in values:
                if value in seen:
                    raise ValueError(f"two machines share the {what} {value!r}")
                seen.add(value)
        return self


class BareMetalProfile(ProviderProfile):
    """A role's ``profile`` for a bare-metal provider: constraints a machine must meet."""

    #: at least this many CPUs
    min_cpus: int = Field(default=1, ge=1)
    #: at least this much memory, MiB
    min_memory_mb: int = Field(default=0, ge=0)
    #: only machines in this rack; empty: any rack
    rack: str | None = None
    #: only machines carrying every one of these labels
    labels: list[str] = Field(default_factory=list)

    def node_shape(self) -> NodeShape:
        # the least a machine of the role has: any admitted machine has at least this much
        return NodeShape(cpus=self.min_cpus, memory_mb=self.min_memory_mb or None)

    def admits(self, machine: MachineConfig) -> bool:
        return (
            machine.cpus >= self.min_cpus
            and machine.memory_mb >= self.min_memory_mb
            and (self.rack is None or machine.rack == self.rack)
            and set(self.labels) <= set(machine.labels)
        )

    def describe(self) -> str:
        parts = [f"cpus >= {self.min_cpus}", f"memory_mb >= {self.min_memory_mb}"]
        if self.rack is not None:
            parts.append(f"rack = {self.rack}")
        if self.labels:
            parts.append(f"labels ⊇ {sorted(self.labels)}")
        return ", ".join(parts)


def _make_bmc(config: BmcConfig, timeout: float) -> Bmc:
    # imported here: a pool of one protocol does not need the other's SDK
    if config.protocol == "ipmi":
        from .ipmi import IpmiBmc

        return IpmiBmc(config.address, config.effective_port, config.username, config.password.reveal())
    from .redfish import RedfishBmc

    host = f"[{config.address}]" if ":" in config.address else config.address
    verify: bool | Path = config.ca_file if (config.verify_tls and config.ca_file) else config.verify_tls
    return RedfishBmc(
        f"{config.scheme}://{host}:{config.effective_port}",
        config.username,
        config.password.reveal(),
        system_id=config.system_id,
        verify=verify,
        timeout=timeout,
    )


class BareMetalProvider(Provider):
    """Machines from a declared pool, provisioned by PXE through IPMI or Redfish BMCs."""

    type_name = "baremetal"
    Config = BareMetalConfig
    Profile = BareMetalProfile

    def __init__(self, name: str, config: ProviderConfig, *, state_dir: Path | None = None) -> None:
        if not isinstance(config, BareMetalConfig):
            raise TypeError(f"{type(self).__name__} needs a BareMetalConfig, not {type(config).__name__}")
        if state_dir is None:
            raise ValueError("the baremetal provider keeps its allocations under the state directory: none given")
        for protocol, module in (("ipmi", "pyghmi"), ("redfish", "sushy")):
            if any(m.bmc.protocol == protocol for m in config.machines) and importlib.util.find_spec(module) is None:
                raise ImportError(f"{protocol} BMCs need {module}: pip install governord[baremetal]", name=module)
        super().__init__(name, config, state_dir=state_dir)
        self.cfg: BareMetalConfig = config
        self._machines = {m.name: m for m in config.machines}
        self._store = AllocationStore(state_dir / "baremetal" / f"{name}.json")
        self._bmcs: dict[str, Bmc] = {}
        self._allocate_lock = asyncio.Lock()
        self._machine_locks: dict[str, asyncio.Lock] = {}

    @property
    def state_file(self) -> Path:
        """Where the allocations are kept."""
        return self._store.path

    # -- plumbing ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Check that the allocation file is readable (a broken one stops the provider here)."""
        await self._load()

    async def close(self) -> None:
        bmcs, self._bmcs = list(self._bmcs.values()), {}
        for bmc in bmcs:
            await asyncio.to_thread(bmc.close)

    def _bmc(self, machine: MachineConfig) -> Bmc:
        bmc = self._bmcs.get(machine.name)
        if bmc is None:
            bmc = self._bmcs[machine.name] = _make_bmc(machine.bmc, self.cfg.call_timeout)
        return bmc

    def _lock(self, machine: str) -> asyncio.Lock:
        return self._machine_locks.setdefault(machine, asyncio.Lock())

    async def _store_call(self, func: Callable[..., T], *args: Any) -> T:
        try:
            return await self.call_sync(func, *args)
        except StateFileError as exc:
            raise PermanentError(str(exc), source=self.name) from exc
        except OSError as exc:
            raise RetryableError(f"allocation file {self._store.path}: {exc}", source=self.name) from exc

    async def _load(self) -> PoolState:
        return await self._store_call(self._store.load)

    async def _update(self, change: Callable[[PoolState], T]) -> T:
        return await self._store_call(self._store.update, change)

    async def _mark(self, machine: str, reason: str) -> None:
        log.warning("%s: machine %s marked unusable: %s", self.name, machine, reason)
        await self._update(lambda state: state.mark(machine, reason))

    async def _bmc_call(self, machine: MachineConfig, func: Callable[[Bmc], T]) -> T:
        """Run one BMC call in a thread; failures become Retryable/PermanentError."""
        bmc = self._bmc(machine)
        try:
            return await self.call_sync(func, bmc)
        except BmcError as exc:
            kind = RetryableError if exc.retryable else PermanentError
            raise kind(f"{machine.name}: {exc}", source=self.name) from exc

    async def _read_power(self, machine: MachineConfig) -> PowerState:
        """A confirmed power reading, or a StepError (the machine is then marked)."""
        try:
            return await self._bmc_call(machine, lambda bmc: bmc.power())
        except StepError as exc:
            await self._mark(machine.name, f"power state unreadable: {exc}")
            raise

    async def _await_power(self, machine: MachineConfig, wanted: PowerState) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.power_timeout
        delay = 0.05
        while True:
            state = await self._read_power(machine)
            if state is wanted:
                return
            if loop.time() >= deadline:
                raise RetryableError(
                    f"{machine.name}: power still {state.value} {self.cfg.power_timeout}s after asking for "
                    f"{wanted.value}",
                    source=self.name,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _machine(self, name: str, allocation: Allocation | None, power: PowerState) -> Machine:
        config = self._machines.get(name)
        details: dict[str, Any] = {}
        if allocation is not None:
            details.update(hostname=allocation.hostname, allocated_at=allocation.allocated_at)
        if config is not None:
            details.update(
                bmc=self._bmc(config).endpoint,
                mac=config.mac,
                cpus=config.cpus,
                memory_mb=config.memory_mb,
                rack=config.rack,
                labels=list(config.labels),
            )
        return Machine(
            provider=self.name,
            machine_id=name,
            name=name,
            host_id=allocation.host_id if allocation else None,
            power=power,
            addresses=(config.address,) if config is not None else (),
            details=details,
        )

    async def _power_or_unknown(self, name: str) -> PowerState:
        config = self._machines.get(name)
        if config is None:
            return PowerState.UNKNOWN
        try:
            return await self._read_power(config)
        except StepError:
            return PowerState.UNKNOWN

    # -- the contract ------------------------------------------------------------------------

    async def create_or_find(self, spec: MachineSpec) -> Machine:
        """The machine allocated to ``spec.host_id``, allocating one if none is; powered on
        with a one-time network boot (unless it is on already)."""
        try:
            profile = BareMetalProfile.model_validate(spec.profile)
        except ValidationError as exc:
            raise PermanentError(f"invalid baremetal profile: {exc}", source=self.name) from None
        async with self._allocate_lock:
            state = await self._load()
            name = state.machine_of(spec.host_id)
            if name is None:
                name = await self._allocate(spec, profile, state)
        machine = self._machines.get(name)
        if machine is None:
            raise PermanentError(
                f"host {spec.host_id} holds machine {name}, which is no longer in the pool config", source=self.name
            )
        async with self._lock(name):
            await self._power_on(machine, spec.host_id)
            allocation = (await self._load()).allocations.get(name)
        return self._machine(name, allocation, PowerState.ON)

    async def _allocate(self, spec: MachineSpec, profile: BareMetalProfile, state: PoolState) -> str:
        wanted = profile.describe()
        matching = [m for m in self.cfg.machines if profile.admits(m)]
        if not matching:
            raise PermanentError(f"no machine in pool {self.name} matches {wanted}", source=self.name)
        free = [m for m in matching if m.name not in state.allocations]
        if not free:
            raise PermanentError(
                f"no free machine matches {wanted}: all {len(matching)} matching machines are allocated "
                f"({', '.join(m.name for m in matching)})",
                source=self.name,
            )
        # known-bad machines last: each costs a BMC round trip (or a timeout) to re-check
        free.sort(key=lambda m: m.name in state.unusable)
        skipped: list[str] = []
        retryable = False
        for machine in free:
            try:
                power = await self._read_power(machine)
            except StepError as exc:
                skipped.append(f"{machine.name}: {exc}")
                retryable = retryable or exc.retryable
                continue
            if power is not PowerState.OFF:
                reason = f"powered {power.value} although free: not touched (someone may be using it)"
                await self._mark(machine.name, reason)
                skipped.append(f"{machine.name}: {reason}")
                retryable = True
                continue

            def claim(current: PoolState, name: str = machine.name) -> bool:
                if name in current.allocations:
                    return False  # another process took it meanwhile
                current.allocations[name] = Allocation(spec.host_id, spec.hostname, time.time())
                current.unusable.pop(name, None)
                return True

            if await self._update(claim):
                log.info("%s: allocated %s to host %s (%s)", self.name, machine.name, spec.host_id, spec.hostname)
                return machine.name
            skipped.append(f"{machine.name}: allocated meanwhile")
            retryable = True
        kind = RetryableError if retryable else PermanentError
        raise kind(f"no usable free machine matches {wanted}: " + "; ".join(skipped), source=self.name)

    async def _power_on(self, machine: MachineConfig, host_id: str) -> None:
        power = await self._read_power(machine)
        if power is PowerState.ON:
            return
        if power is not PowerState.OFF:
            raise RetryableError(f"{machine.name}: power is {power.value}; not touching it", source=self.name)
        await self._bmc_call(machine, lambda bmc: bmc.set_network_boot_once())

        def stamp(state: PoolState) -> None:
            allocation = state.allocations.get(machine.name)
            if allocation is not None and allocation.host_id == host_id:
                allocation.powered_on_at = time.time()

        # stamped before the command: a crash right after it still counts the boot window
        await self._update(stamp)
        await self._bmc_call(machine, lambda bmc: bmc.power_on())
        await self._await_power(machine, PowerState.ON)
        log.info("%s: %s powered on for a network boot (host %s)", self.name, machine.name, host_id)

    async def wait_ready(self, machine: Machine, timeout: float) -> Machine:
        """Wait until the machine's OS accepts a TCP connection on ``address:ready_port``."""
        config = self._machines.get(machine.machine_id)
        if config is None:
            raise PermanentError(f"no machine {machine.machine_id} in pool {self.name}", source=self.name)
        allocation = (await self._load()).allocations.get(config.name)
        if allocation is None or (machine.host_id is not None and allocation.host_id != machine.host_id):
            raise PermanentError(f"{config.name} is not allocated to host {machine.host_id}", source=self.name)
        started = allocation.powered_on_at or time.time()
        boot_deadline = started + self.cfg.boot_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.05
        last_error = "no attempt"
        while True:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(config.address, self.cfg.ready_port),
                    timeout=max(0.1, min(5.0, deadline - loop.time())),
                )
            except (OSError, TimeoutError) as exc:
                last_error = str(exc) or type(exc).__name__
            else:
                writer.close()
                try:
                    await writer.wait_closed()
                except OSError:
                    pass
                power = await self._power_or_unknown(config.name)
                return self._machine(config.name, allocation, power)
            if time.time() >= boot_deadline:
                raise PermanentError(
                    f"{config.name} ({allocation.hostname}): nothing answers on {config.address}:"
                    f"{self.cfg.ready_port} {self.cfg.boot_timeout}s after power-on ({last_error}); "
                    "check its console: the network boot or the install failed",
                    source=self.name,
                )
            if loop.time() >= deadline:
                raise RetryableError(
                    f"{config.name} ({allocation.hostname}): not up yet after {timeout}s: "
                    f"{config.address}:{self.cfg.ready_port}: {last_error}",
                    source=self.name,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    async def find(self, host_id: str) -> Machine | None:
        state = await self._load()
        name = state.machine_of(host_id)
        if name is None:
            return None
        return self._machine(name, state.allocations[name], await self._power_or_unknown(name))

    async def power_state(self, machine_id: str) -> PowerState:
        """Read from the BMC; UNKNOWN (never a guess) if it cannot be read."""
        if machine_id not in self._machines:
            raise PermanentError(f"no machine {machine_id} in pool {self.name}", source=self.name)
        return await self._power_or_unknown(machine_id)

    async def destroy(self, host_id: str) -> None:
        """Power the host's machine off (confirmed), clear its boot override, free it."""
        name = (await self._load()).machine_of(host_id)
        if name is None:
            return
        machine = self._machines.get(name)
        if machine is None:
            raise PermanentError(
                f"host {host_id} holds machine {name}, which is no longer in the pool config: "
                "power it off by hand, then remove the allocation from " + str(self._store.path),
                source=self.name,
            )
        async with self._lock(name):
            try:
                power = await self._read_power(machine)
            except StepError as exc:
                raise type(exc)(f"not releasing {name} blind: {exc}", source=self.name) from exc
            if power is not PowerState.OFF:
                await self._bmc_call(machine, lambda bmc: bmc.power_off())
                await self._await_power(machine, PowerState.OFF)
            await self._bmc_call(machine, lambda bmc: bmc.clear_boot_override())

            def free(state: PoolState) -> None:
                allocation = state.allocations.get(name)
                if allocation is not None and allocation.host_id == host_id:
                    del state.allocations[name]
                state.unusable.pop(name, None)

            await self._update(free)
        if (await self._load()).machine_of(host_id) is not None:
            raise RetryableError(f"{name} is still allocated to {host_id} after release", source=self.name)
        log.info("%s: released %s (host %s)", self.name, name, host_id)

    async def list_owned(self) -> list[Machine]:
        state = await self._load()
        names = sorted(state.allocations)
        powers = await asyncio.gather(*(self._power_or_unknown(name) for name in names))
        return [self._machine(n, state.allocations[n], p) for n, p in zip(names, powers, strict=True)]

    # -- reporting ---------------------------------------------------------------------------

    async def pool(self) -> list[dict[str, Any]]:
        """Every pool machine with its allocation and, if marked, why it is unusable (no BMC calls)."""
        state = await self._load()
        rows: list[dict[str, Any]] = []
        for machine in self.cfg.machines:
            allocation = state.allocations.get(machine.name)
            mark = state.unusable.get(machine.name)
            rows.append(
                {
                    "name": machine.name,
                    "host_id": allocation.host_id if allocation else None,
                    "hostname": allocation.hostname if allocation else None,
                    "unusable": mark.reason if mark else None,
                    "unusable_since": mark.since if mark else None,
                }
            )
        return rows


__all__ = ["BareMetalConfig", "BareMetalProfile", "BareMetalProvider", "BmcConfig", "MachineConfig"]
