"""The oVirt/RHV provider: add VMs from a template, start them with cloud-init, find, destroy them.

A machine is a VM made from the role's template in the configured cluster. Ownership is the VM's
comment, ``governord:host-id=<uuid>``: the comment is part of the ``POST /vms`` that creates the
VM, so the VM carries the marker from the moment it exists (a crash between "add" and "recorded"
cannot lead to a second VM), it is shown in the Administration Portal, and the engine's search
finds it (``comment=...``). Every search result is checked for the exact marker, because search
values are patterns. ``create_or_find`` always finds first and then *completes* what it found
(waits out ``image_locked``, starts a VM that is down), so it resumes a VM left half-made by a
crash instead of making another.

ovirtsdk4 is synchronous (pycurl); every SDK call runs in a worker thread through
:meth:`~governord.providers.ConfiguredInstance.call_sync`, and waiting for status changes is
done on the event loop with ``asyncio.sleep`` between short calls. The connection is made in
:meth:`OVirtProvider.start` (which fetches the SSO token) and closed in :meth:`close` (which
revokes it); ovirtsdk4 itself fetches a new token when the engine answers 401.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ovirtsdk4 as sdk
import pycurl
from ovirtsdk4 import types
from pydantic import ValidationError

from governord.errors import PermanentError, RetryableError, StepError, http_error
from governord.models import OWNERSHIP_KEY, Machine, MachineSpec, PowerState
from governord.providers import Provider, ProviderConfig

from .config import OVirtConfig, OVirtProfile

T = TypeVar("T")

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: What the VM's comment starts with; the host id follows.
MARKER_PREFIX = f"{OWNERSHIP_KEY}="

_S = types.VmStatus
_POWER = {
    _S.UP: PowerState.ON,
    _S.POWERING_UP: PowerState.ON,
    _S.WAIT_FOR_LAUNCH: PowerState.ON,
    _S.POWERING_DOWN: PowerState.ON,
    _S.REBOOT_IN_PROGRESS: PowerState.ON,
    _S.MIGRATING: PowerState.ON,
    _S.RESTORING_STATE: PowerState.ON,
    _S.DOWN: PowerState.OFF,
    _S.SUSPENDED: PowerState.SUSPENDED,
    _S.PAUSED: PowerState.SUSPENDED,
    _S.SAVING_STATE: PowerState.SUSPENDED,
}
#: Statuses from which ``start`` brings a VM up.
_STARTABLE = frozenset({_S.DOWN, _S.SUSPENDED, _S.PAUSED})
#: Statuses that end by themselves; wait for them to pass.
_TRANSIENT = frozenset({_S.IMAGE_LOCKED, _S.POWERING_DOWN, _S.SAVING_STATE})

#: The engine's refusal to run a VM in a status its action matrix forbids (RunVmValidator
#: .validateVmStatusUsingMatrix, ACTION_TYPE_FAILED_VM_STATUS_ILLEGAL, 409), naming the status
#: the way LocalizedVmStatus does.
_REFUSED_STATUS = re.compile(r"because the VM is in (.+?) status")
#: Statuses (as named in that refusal) of a VM that someone else has started already.
_STARTED_TEXTS = frozenset({"Up", "Powering Up", "Wait for Launch", "Reboot in Progress", "Migrating"})
#: Statuses (as named there) of a VM whose host does not answer: no action helps until it does.
_HOST_TROUBLE_TEXTS = frozenset({"Not Responding", "Unknown"})
#: Statuses (as named there) that end by themselves: a later start can succeed.
_PASSING_TEXTS = frozenset({"Powering Down", "Saving State", "Restoring State", "Image Locked"})

#: pycurl errors that a retry will not fix: the engine's certificate is not trusted.
_TLS_CURL_ERRORS = frozenset({51, 58, 60, 77, 83, 90, 91})


def _vanished(exc: sdk.Error) -> bool:
    """Whether the engine refused an action because the VM no longer exists.

    Actions the REST layer passes to a command without looking the VM up first (stop, shutdown,
    start) and a remove that loses the race after the lookup fail the command's validation with
    ACTION_TYPE_FAILED_VM_NOT_FOUND, a 400 "[Cannot <action> VM. VM is not found.]", not a 404.
    """
    return exc.code == 400 and "VM is not found" in str(exc)


def marker(host_id: str) -> str:
    """The comment of the VM that carries ``host_id``."""
    return f"{MARKER_PREFIX}{host_id}"


def host_id_of(vm: types.Vm) -> str | None:
    """The host id in a VM's comment, or None if it carries no marker."""
    comment = (vm.comment or "").strip()
    if comment.startswith(MARKER_PREFIX) and len(comment) > len(MARKER_PREFIX):
        return comment[len(MARKER_PREFIX):]
    return None


def _addresses(vm: types.Vm) -> tuple[str, ...]:
    seen: list[str] = []
    for device in vm.reported_devices or ():
        for ip in device.ips or ():
            try:
                address = ipaddress.ip_address(ip.address or "")
            except ValueError:
                continue
            # link-local and loopback addresses are never how anyone reaches the machine
            if address.is_link_local or address.is_loopback or str(address) in seen:
                continue
            seen.append(str(address))
    # IPv4 first: that is what the registrars and DNS records are made from
    return tuple(sorted(seen, key=lambda a: ipaddress.ip_address(a).version))


class OVirtProvider(Provider):
    """Machines on an oVirt/RHV engine: VMs from a template, started with cloud-init."""

    type_name = "ovirt"
    Config = OVirtConfig
    Profile = OVirtProfile

    def __init__(self, name: str, config: ProviderConfig, *, state_dir: Path | None = None) -> None:
        if not isinstance(config, OVirtConfig):
            raise TypeError(f"{type(self).__name__} needs an OVirtConfig, not {type(config).__name__}")
        super().__init__(name, config, state_dir=state_dir)
        self.cfg: OVirtConfig = config
        self._connection_lock = threading.Lock()
        self._connection: sdk.Connection | None = None

    # -- connection ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and fetch the SSO token.

        Bad credentials or an untrusted certificate fail here (PermanentError); an unreachable
        engine does not stop the daemon: the first call that needs it connects again.
        """
        try:
            await self._call("log in", lambda system: None)
        except RetryableError as exc:
            log.warning("%s: engine not reachable yet, will log in on first use: %s", self.name, exc)

    async def close(self) -> None:
        """Revoke the SSO token and release the connection."""
        with self._connection_lock:
            connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            await self.call_sync(connection.close)
        except Exception as exc:  # noqa: BLE001 - logging out is best effort at shutdown
            log.debug("%s: logout failed: %s", self.name, exc)

    def _connect_sync(self) -> sdk.Connection:
        connection = sdk.Connection(
            url=self.cfg.url,
            username=self.cfg.username,
            password=self.cfg.password.reveal(),
            insecure=not self.cfg.verify_tls,
            ca_file=str(self.cfg.ca_file) if self.cfg.ca_file is not None else None,
            # pycurl must give up on its own: a thread cannot be cancelled
            timeout=max(1, int(self.cfg.call_timeout)),
        )
        try:
            connection.authenticate()
        except BaseException:
            connection.close(logout=False)
            raise
        return connection

    def _system_sync(self) -> Any:
        with self._connection_lock:
            if self._connection is None:
                self._connection = self._connect_sync()
            return self._connection.system_service()

    def _guarded(self, what: str, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(system_service, *args)`` with a live connection; failures become StepErrors."""
        try:
            return func(self._system_sync(), *args)
        except StepError:
            raise
        except Exception as exc:
            raise self._translate(exc, what) from exc

    def _translate(self, exc: BaseException, what: str) -> StepError:
        if isinstance(exc, (sdk.ConnectionError, sdk.TimeoutError)):
            return RetryableError(f"{what}: cannot talk to {self.cfg.url}: {exc}", source=self.name)
        if isinstance(exc, sdk.AuthError):
            return PermanentError(f"{what}: {exc}", source=self.name)
        if isinstance(exc, sdk.Error):
            return self._translate_sdk_error(exc, what)
        if isinstance(exc, pycurl.error):
            return self._translate_sdk_error(sdk.Error(f"Error while sending HTTP request: {exc}"), what)
        if isinstance(exc, (OSError, TimeoutError, EOFError)):
            return RetryableError(f"{what}: cannot talk to {self.cfg.url}: {exc!r}", source=self.name)
        return PermanentError(f"{what}: {type(exc).__name__}: {exc}", source=self.name)

    def _translate_sdk_error(self, exc: sdk.Error, what: str) -> StepError:
        text = str(exc)
        code = exc.code
        if code is None:
            curl = re.search(r"\((\d+), ", text)
            if curl and int(curl.group(1)) in _TLS_CURL_ERRORS:
                return PermanentError(
                    f"{what}: TLS certificate of {self.cfg.url} not trusted ({text}); set ca_file, or verify_tls = false",
                    source=self.name,
                )
            if "Is the path" in text or "CA file" in text:
                return PermanentError(f"{what}: {text}", source=self.name)
            # no HTTP status: a broken transfer, or a proxy's error page instead of the engine
            return RetryableError(f"{what}: {text}", source=self.name)
        if code == 409 and "locked" in text.lower():
            return RetryableError(f"{what}: {text}", source=self.name)  # the engine's "VM is locked": busy
        return http_error(code, f"{what}: {text}", source=self.name)

    async def _call(self, what: str, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(system_service, *args)`` in a worker thread (see :meth:`_guarded`)."""

        def run() -> T:
            return self._guarded(what, func, *args)

        run.__name__ = what  # call_sync names the call in its timeout message
        return await self.call_sync(run)

    # -- reading ---------------------------------------------------------------------------

    @staticmethod
    def _get_vm_sync(system: Any, vm_id: str) -> types.Vm | None:
        try:
            return system.vms_service().vm_service(vm_id).get(follow="reported_devices")
        except sdk.NotFoundError:
            return None

    @staticmethod
    def _marked_sync(system: Any, host_id: str | None) -> list[types.Vm]:
        # search values are LIKE patterns: narrow with the search, decide on the exact comment
        query = f"comment=*{host_id}" if host_id else "comment=governord*"
        vms = system.vms_service().list(search=query, follow="reported_devices")
        owned = [vm for vm in vms if host_id_of(vm) is not None]
        if host_id is not None:
            owned = [vm for vm in owned if host_id_of(vm) == host_id]
        return sorted(owned, key=lambda vm: (vm.creation_time is None, vm.creation_time, vm.id))

    async def _get_vm(self, vm_id: str, what: str = "read VM") -> types.Vm | None:
        return await self._call(what, self._get_vm_sync, vm_id)

    async def _find_vms(self, host_id: str | None) -> list[types.Vm]:
        return await self._call("find", self._marked_sync, host_id)

    async def _find_one(self, host_id: str) -> types.Vm | None:
        vms = await self._find_vms(host_id)
        if len(vms) > 1:
            log.warning(
                "%s: %d VMs carry %s: %s; using %s",
                self.name, len(vms), marker(host_id), [vm.id for vm in vms], vms[0].id,
            )
        return vms[0] if vms else None

    def _machine(self, vm: types.Vm) -> Machine:
        status = vm.status
        return Machine(
            provider=self.name,
            machine_id=vm.id,
            name=vm.name,
            host_id=host_id_of(vm),
            power=_POWER.get(status, PowerState.UNKNOWN) if status is not None else PowerState.UNKNOWN,
            addresses=_addresses(vm),
            details={
                "status": status.value if status is not None else None,
                "fqdn": vm.fqdn,
                "template_id": vm.template.id if vm.template is not None else None,
                "cluster_id": vm.cluster.id if vm.cluster is not None else None,
            },
        )

    async def _wait_vm(
        self, vm_id: str, done: Callable[[types.Vm], bool], timeout: float, what: str
    ) -> types.Vm | None:
        """Poll until ``done(vm)``; None once the VM is gone (404). Timeout: RetryableError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.05
        while True:
            vm = await self._get_vm(vm_id, what)
            if vm is None or done(vm):
                return vm
            remaining = deadline - loop.time()
            if remaining <= 0:
                status = vm.status.value if vm.status is not None else "unknown"
                raise RetryableError(f"{what}: VM {vm_id} ({vm.name}) still {status} after {timeout}s", source=self.name)
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 2.0)

    # -- the contract ----------------------------------------------------------------------

    async def find(self, host_id: str) -> Machine | None:
        """The VM whose comment is ``governord:host-id=<host_id>``, or None."""
        vm = await self._find_one(host_id)
        return self._machine(vm) if vm is not None else None

    async def list_owned(self) -> list[Machine]:
        """Every VM on the engine whose comment carries governord's marker."""
        return [self._machine(vm) for vm in await self._find_vms(None)]

    async def power_state(self, machine_id: str) -> PowerState:
        """The VM's status as a power state; a VM that does not exist is a PermanentError."""
        vm = await self._get_vm(machine_id, "power state")
        if vm is None:
            raise PermanentError(f"power state: no VM {machine_id} on {self.cfg.url}", source=self.name)
        return self._machine(vm).power

    async def create_or_find(self, spec: MachineSpec) -> Machine:
        """Find the VM marked with ``spec.host_id`` or add it from the template; then start it."""
        try:
            profile = OVirtProfile.model_validate(spec.profile)
        except ValidationError as exc:
            raise PermanentError(f"invalid oVirt profile: {exc}", source=self.name) from None
        initialization = self._initialization(spec, profile) if profile.cloud_init else None
        vm = await self._find_one(spec.host_id)
        if vm is None:
            vm = await self._add(spec, profile)
        settled = await self._wait_vm(
            vm.id, lambda v: v.status not in _TRANSIENT, self.cfg.ready_timeout, f"wait for {spec.hostname} to settle"
        )
        if settled is None:
            raise RetryableError(f"VM {vm.id} ({spec.hostname}) vanished while being made", source=self.name)
        if settled.status in _STARTABLE:
            await self._start(settled, initialization)
        final = await self._get_vm(vm.id)
        if final is None:
            raise RetryableError(f"VM {vm.id} ({spec.hostname}) vanished while being started", source=self.name)
        return self._machine(final)

    async def wait_ready(self, machine: Machine, timeout: float) -> Machine:
        """Poll until the VM is up and its guest agent reports an address.

        A VM that falls back to down has failed to launch (the engine tried it on every host it
        could): that is a RetryableError at once, and the next create_or_find starts it again.
        Paused (an I/O error), not responding, unknown and migrating are waited out: the engine
        resumes, reconnects or finishes them by itself.
        """
        vm = await self._wait_vm(
            machine.machine_id,
            lambda v: v.status is _S.DOWN or (v.status is _S.UP and bool(_addresses(v))),
            timeout,
            f"wait for {machine.name} to be up with an address",
        )
        if vm is None:
            raise RetryableError(f"VM {machine.machine_id} ({machine.name}) no longer exists", source=self.name)
        if vm.status is _S.DOWN:
            raise RetryableError(
                f"VM {machine.machine_id} ({machine.name}) is down again: the engine could not launch it "
                "(see the engine's events)",
                source=self.name,
            )
        return self._machine(vm)

    async def destroy(self, host_id: str) -> None:
        """Stop and remove every VM carrying ``host_id``; verify that none is left."""
        for vm in await self._find_vms(host_id):
            await self._destroy_vm(vm.id)
        left = await self._find_vms(host_id)
        if left:
            raise RetryableError(
                f"destroy: VM {', '.join(vm.id for vm in left)} with {marker(host_id)} still exists",
                source=self.name,
            )

    # -- steps -----------------------------------------------------------------------------

    def _initialization(self, spec: MachineSpec, profile: OVirtProfile) -> types.Initialization:
        net = spec.network
        domain = net.domain or spec.fqdn.partition(".")[2] or None
        nics: list[types.NicConfiguration] | None = None
        if net.address:
            try:
                address = ipaddress.ip_address(net.address)
            except ValueError:
                raise PermanentError(f"not an IP address: {net.address!r}", source=self.name) from None
            if address.version != 4:
                raise PermanentError(f"static IPv6 addresses are not supported: {net.address}", source=self.name)
            if net.prefix_length is None:
                raise PermanentError(f"static address {net.address} has no prefix length", source=self.name)
            nics = [
                types.NicConfiguration(
                    name=profile.nic_name,
                    on_boot=True,
                    boot_protocol=types.BootProtocol.STATIC,
                    ip=types.Ip(
                        address=str(address),
                        netmask=str(ipaddress.IPv4Network(f"0.0.0.0/{net.prefix_length}").netmask),
                        gateway=net.gateway,
                        version=types.IpVersion.V4,
                    ),
                )
            ]
        return types.Initialization(
            host_name=spec.fqdn,
            nic_configurations=nics,
            dns_servers=" ".join(net.dns_servers) or None,
            dns_search=domain,
            custom_script=spec.user_data,
        )

    def _add_sync(self, system: Any, spec: MachineSpec, profile: OVirtProfile) -> types.Vm:
        memory = profile.memory_mb * MIB if profile.memory_mb is not None else None
        policy = None
        if memory is not None:
            # The engine refuses guaranteed > memory and max < memory: derive both from the template.
            found = [t for t in system.templates_service().list(search=f"name={profile.template}")
                     if t.name == profile.template]
            template_policy = found[0].memory_policy if found and found[0].memory_policy else None
            guaranteed = template_policy.guaranteed if template_policy and template_policy.guaranteed else memory
            max_memory = template_policy.max if template_policy and template_policy.max else 4 * memory
            policy = types.MemoryPolicy(guaranteed=min(guaranteed, memory), max=max(max_memory, memory))
        vm = types.Vm(
            name=spec.hostname,
            cluster=types.Cluster(name=self.cfg.cluster),
            template=types.Template(name=profile.template),
            # the marker is in the add request itself: the VM never exists without it
            comment=marker(spec.host_id),
            description=f"governord host {spec.fqdn}",
            memory=memory,
            memory_policy=policy,
            cpu=types.Cpu(topology=types.CpuTopology(sockets=profile.cpus, cores=1, threads=1))
            if profile.cpus is not None
            else None,
        )
        return system.vms_service().add(vm)

    async def _add(self, spec: MachineSpec, profile: OVirtProfile) -> types.Vm:
        what = f"add VM {spec.hostname!r} from template {profile.template!r} in cluster {self.cfg.cluster!r}"
        log.info("%s: %s for host %s", self.name, what, spec.host_id)
        try:
            return await self._call(what, self._add_sync, spec, profile)
        except PermanentError as exc:
            if "name is already in use" not in str(exc):
                raise
            # An add of this host that we did not see finish (timeout, crash) may have won the name.
            vm = await self._find_one(spec.host_id)
            if vm is not None:
                return vm
            raise PermanentError(f"{exc} (the VM of that name does not carry {marker(spec.host_id)})",
                                 source=self.name) from exc

    async def _start(self, vm: types.Vm, initialization: types.Initialization | None) -> None:
        def start(system: Any) -> None:
            service = system.vms_service().vm_service(vm.id)
            try:
                if initialization is None:
                    service.start()
                else:
                    service.start(use_cloud_init=True, vm=types.Vm(initialization=initialization))
            except sdk.Error as exc:
                if _vanished(exc):
                    return  # removed meanwhile: the read that follows says so
                if exc.code != 409:
                    raise
                refused = _REFUSED_STATUS.search(str(exc))
                status = refused.group(1) if refused else None
                # started by someone else between our read and our call (a run still being
                # initiated is RunVmValidator.vmDuringInitialization's "VM is running"): what we wanted
                if status in _STARTED_TEXTS or "VM is running" in str(exc):
                    return
                if status in _HOST_TROUBLE_TEXTS:
                    raise RetryableError(
                        f"start VM {vm.id} ({vm.name}): the engine cannot reach its host (VM is {status})",
                        source=self.name,
                    ) from exc
                if status in _PASSING_TEXTS:
                    raise RetryableError(f"start VM {vm.id} ({vm.name}): VM is {status}, try again",
                                         source=self.name) from exc
                raise

        await self._call(f"start VM {vm.id} ({vm.name})", start)

    async def _destroy_vm(self, vm_id: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.ready_timeout
        while True:
            vm = await self._get_vm(vm_id, "destroy")
            if vm is None:
                return
            if loop.time() > deadline:
                raise RetryableError(f"destroy: VM {vm_id} ({vm.name}) still {vm.status.value}", source=self.name)
            remaining = max(deadline - loop.time(), 0.1)
            if vm.status is _S.UNKNOWN:
                # its host is unreachable: the engine refuses to stop (StopVmCommandBase.validate)
                # and to remove it until the host is fenced or answers again
                raise RetryableError(
                    f"destroy: VM {vm_id} ({vm.name}) is in status unknown (its host does not answer); "
                    "it can be stopped once the engine knows its state again",
                    source=self.name,
                )
            if vm.status is _S.IMAGE_LOCKED:
                # being made, or already being removed: wait for either to finish
                await self._wait_vm(vm_id, lambda v: v.status is not _S.IMAGE_LOCKED, remaining, f"destroy {vm_id}")
                continue
            if vm.status is not _S.DOWN:
                await self._call(f"stop VM {vm_id} ({vm.name})", self._stop_sync, vm_id)
                await self._wait_vm(vm_id, lambda v: v.status is _S.DOWN, remaining, f"stop {vm_id}")
                continue
            removed = await self._call(f"remove VM {vm_id} ({vm.name})", self._remove_sync, vm_id)
            if removed:
                gone = await self._wait_vm(vm_id, lambda v: False, remaining, f"remove {vm_id}")
                if gone is None:
                    return

    @staticmethod
    def _stop_sync(system: Any, vm_id: str) -> None:
        """Power the VM off; one that is already down, or already gone, needs nothing more."""
        try:
            system.vms_service().vm_service(vm_id).stop()
        except sdk.NotFoundError:
            return
        except sdk.Error as exc:
            if _vanished(exc):
                return
            if exc.code != 409 or "VM is not running" not in str(exc):
                raise

    @staticmethod
    def _remove_sync(system: Any, vm_id: str) -> bool:
        """Ask for removal; False when the VM changed under us (started again, locked) and needs another look."""
        try:
            system.vms_service().vm_service(vm_id).remove()
        except sdk.NotFoundError:
            return True
        except sdk.Error as exc:
            if _vanished(exc):
                return True
            if exc.code == 409 and ("VM is running" in str(exc) or "locked" in str(exc)):
                return False
            raise
        return True


__all__ = ["MARKER_PREFIX", "OVirtConfig", "OVirtProfile", "OVirtProvider", "host_id_of", "marker"]
