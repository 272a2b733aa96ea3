"""The vSphere provider: clone, customize, power on, find, destroy VMs through pyvmomi.

A machine is a VM cloned from the role's template into the configured folder and resource pool.
Ownership is marked twice: ``extraConfig["guestinfo.governord.host-id"]`` is part of the clone's
own config spec, so the VM carries it from the moment it exists (a crash between "clone started"
and "recorded" cannot lead to a second clone), and the custom field ``governord:host-id`` makes the
owner visible in the vSphere client. ``create_or_find`` always finds first and then *completes*
whatever it found (custom field, size, guest customization, power on), so it resumes a VM left
half-made by a crash instead of making another.

pyvmomi is synchronous; every SDK call here runs in a worker thread through
:meth:`~governord.providers.ConfiguredInstance.call_sync`, and waiting (for tasks, for the guest) is done
on the event loop with ``asyncio.sleep`` between short calls. A read-only SOAP call
(:data:`READ_ONLY_METHODS`) that fails in transit is repeated in its thread, up to ``call_tries``
tries, by a stub in front of pyVmomi's (:class:`_ReadRetryStub`); a call that creates or changes
something never is.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import ipaddress
import logging
import re
import ssl
import threading
import time
import urllib.parse
import xml.etree.ElementTree
import xml.parsers.expat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl
from pyVmomi.SoapAdapter import StubAdapterBase

from governord.errors import PASSING_HTTP_STATUSES, PermanentError, RetryableError, StepError
from governord.models import OWNERSHIP_KEY, Machine, MachineSpec, PowerState
from governord.providers import Provider, ProviderConfig, backoff_delay, call_budget

from .config import VSphereConfig, VSphereProfile

T = TypeVar("T")

log = logging.getLogger(__name__)

#: extraConfig key of the ownership marker (``guestinfo.*`` keys are plain data to vSphere).
MARKER_KEY = "guestinfo.governord.host-id"
#: extraConfig key set once the guest customization has been handed to vSphere.
CUSTOMIZED_KEY = "guestinfo.governord.customized"

_POWER = {
    "poweredOn": PowerState.ON,
    "poweredOff": PowerState.OFF,
    "suspended": PowerState.SUSPENDED,
}

#: Properties read for every VM when searching for markers (one PropertyCollector call).
_SEARCH_PROPS = [
    "name",
    "config.template",
    "config.extraConfig",
    "config.instanceUuid",
    "customValue",
    "runtime.powerState",
    "guest.hostName",
    "guest.ipAddress",
    "guest.net",
]
#: Properties read for one VM when completing it.
_DETAIL_PROPS = [
    *_SEARCH_PROPS,
    "config.annotation",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "config.tools.pendingCustomization",
]

#: Faults that go away by themselves; every other fault is permanent.
_TRANSIENT_FAULT_NAMES = (
    "vim.fault.TaskInProgress",
    "vim.fault.Timedout",
    "vim.fault.ConcurrentAccess",
    "vim.fault.InvalidState",
    "vim.fault.ResourceInUse",
    "vim.fault.FileLocked",
    "vim.fault.HostConnectFault",
    "vim.fault.NotAuthenticated",
    "vim.fault.ToolsUnavailable",
    "vmodl.fault.HostCommunication",
    "vmodl.fault.RequestCanceled",
    "vmodl.fault.SystemError",
    "vmodl.fault.ManagedObjectNotFound",
)


def _fault_classes(names: Iterable[str]) -> tuple[type[BaseException], ...]:
    roots = {"vim": vim, "vmodl": vmodl}
    found: list[type[BaseException]] = []
    for name in names:
        root, *path = name.split(".")
        try:
            fault: Any = functools.reduce(getattr, path, roots[root])
            found.append(fault)
        except AttributeError:
            # an older pyvmomi without this fault: nothing can raise it either
            continue
    return tuple(found)


_TRANSIENT_FAULTS = _fault_classes(_TRANSIENT_FAULT_NAMES)
#: how pyVim.connect.SmartConnect reports that its API version probe got no usable answer
_SERVER_DOWN = re.compile(r"is down or is not a VIM server")


#: SOAP methods that only read, repeated when they fail in transit (every SOAP call is a POST, so
#: HTTP cannot tell). "Fetch" is how pyVmomi reads one property (``vm.runtime``, ``task.info``).
#: Any method not listed is sent once per step try.
READ_ONLY_METHODS = frozenset({
    "Fetch", "RetrieveServiceContent", "CurrentTime",
    "RetrieveProperties", "RetrievePropertiesEx", "ContinueRetrievePropertiesEx",
    "FindByInventoryPath", "FindChild", "FindByUuid", "FindAllByUuid", "FindByDnsName", "FindAllByDnsName",
    "FindByIp", "FindAllByIp", "FindByDatastorePath",
})
#: what the reverse proxy in front of vCenter (envoy, rhttpproxy) answers when its back end fails
RETRY_STATUSES = frozenset({502, 503, 504})


def _in_transit(exc: BaseException) -> bool:
    """A failure of the exchange itself, not an answer of vCenter's: worth repeating a read for."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False
    if isinstance(exc, http.client.HTTPException):
        # pyVmomi raises HTTPException("503 Service Unavailable") for an answer that is neither
        # 200 nor a SOAP fault; others (RemoteDisconnected, IncompleteRead) carry no status
        status = re.match(r"(\d{3})\b", str(exc))
        return status is None or int(status.group(1)) in RETRY_STATUSES
    # OSError: refused, reset, timed out, a TLS connection cut; bad XML: an answer cut off
    return isinstance(exc, (OSError, EOFError, xml.parsers.expat.ExpatError))


class _ReadRetryStub(StubAdapterBase):
    """A stub in front of pyVmomi's SOAP stub (as pyVmomi's SessionOrientedStub is) that repeats
    a read-only call (:data:`READ_ONLY_METHODS`) which failed in transit, up to ``tries`` tries;
    any other call goes through once. Managed objects in the answers are bound to this stub, so
    calls made on them come through here too. Blocking: runs in the provider's worker threads."""

    def __init__(self, soap_stub: Any, tries: int, backoff: float, name: str) -> None:
        super().__init__(version=soap_stub.version)
        self.soap_stub = soap_stub
        self._tries = tries
        self._backoff = backoff
        self._name = name

    def InvokeMethod(self, mo: Any, info: Any, args: Any) -> Any:  # noqa: N802 - pyVmomi's stub API
        tries = self._tries if info.wsdlName in READ_ONLY_METHODS else 1
        for attempt in range(1, tries + 1):
            try:
                # with an outer stub, the SOAP stub answers (status, result or fault)
                status, obj = self.soap_stub.InvokeMethod(mo, info, args, self)
            except Exception as exc:
                if attempt >= tries or not _in_transit(exc):
                    raise
                log.info("%s: %s failed in transit (try %d of %d), repeating: %r", self._name, info.wsdlName,
                         attempt, tries, exc)
                time.sleep(backoff_delay(self._backoff, attempt))
                continue
            if status == 200:
                return obj
            raise obj
        raise AssertionError("unreachable")

    def __getattr__(self, name: str) -> Any:
        # cookie, DropConnections, host, ...: the SOAP stub's own (only once it is set: the base
        # class's __init__ asks for attributes this stub has not got yet)
        soap_stub = self.__dict__.get("soap_stub")
        if soap_stub is None:
            raise AttributeError(name)
        return getattr(soap_stub, name)


@dataclass(frozen=True)
class _VmRecord:
    """What governord needs to know about one VM, from one PropertyCollector answer."""

    moid: str
    name: str
    host_id: str | None
    #: the custom field carries the same host id as the extraConfig marker
    has_custom_field: bool
    template: bool
    power: PowerState
    hostname: str | None
    addresses: tuple[str, ...]
    instance_uuid: str | None
    customized: bool
    props: dict[str, Any]


@dataclass(frozen=True)
class _Placement:
    """Where and from what a clone is made."""

    template: Any
    folder: Any
    pool: Any
    datastore: Any | None
    device_change: list[Any]


def _addresses(props: dict[str, Any]) -> tuple[str, ...]:
    seen: list[str] = []
    candidates: list[str] = []
    if props.get("guest.ipAddress"):
        candidates.append(props["guest.ipAddress"])
    for nic in props.get("guest.net") or ():
        candidates.extend(nic.ipAddress or ())
    for candidate in candidates:
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            continue
        # link-local addresses are never how anyone reaches the machine
        if address.is_link_local or candidate in seen:
            continue
        seen.append(candidate)
    return tuple(seen)


def _fault_text(fault: BaseException) -> str:
    name = type(fault).__name__
    message = getattr(fault, "msg", None) or ""
    if not message:
        for part in getattr(fault, "faultMessage", None) or ():
            message = getattr(part, "message", None) or ""
            if message:
                break
    return f"{name}: {message}" if message else name


class VSphereProvider(Provider):
    """Machines on vCenter: VMs cloned from a template, customized and powered on."""

    type_name = "vsphere"
    Config = VSphereConfig
    Profile = VSphereProfile

    def __init__(self, name: str, config: ProviderConfig, *, state_dir: Path | None = None) -> None:
        if not isinstance(config, VSphereConfig):
            raise TypeError(f"{type(self).__name__} needs a VSphereConfig, not {type(config).__name__}")
        super().__init__(name, config, state_dir=state_dir)
        self.cfg: VSphereConfig = config
        # call_timeout bounds each try of a SOAP call; the thread running the call gets room for all
        self._call_timeout = call_budget(config.call_timeout, config.call_tries, config.call_backoff)
        self._session_lock = threading.Lock()
        self._si: Any | None = None
        self._content: Any | None = None
        self._session_gen = 0
        self._datacenter: Any | None = None
        self._field_key: int | None = None

    # -- connection ------------------------------------------------------------------------

    async def start(self) -> None:
        """Log in to vCenter.

        Bad credentials or a bad URL fail here (PermanentError); an unreachable vCenter does not
        stop the daemon: the connection is made again by the first call that needs it.
        """
        try:
            await self._call("connect", lambda si: None)
        except RetryableError as exc:
            log.warning("%s: vCenter not reachable yet, will connect on first use: %s", self.name, exc)

    async def close(self) -> None:
        """Log out and drop the connection."""
        with self._session_lock:
            si, self._si, self._content = self._si, None, None
            self._datacenter = None
        if si is None:
            return
        try:
            await self.call_sync(Disconnect, si)
        except Exception as exc:  # noqa: BLE001 - logging out is best effort at shutdown
            log.debug("%s: logout failed: %s", self.name, exc)

    def _connect_sync(self) -> Any:
        parts = urllib.parse.urlsplit(self.cfg.url)
        kwargs: dict[str, Any] = {}
        if parts.scheme == "https":
            if not self.cfg.verify_tls:
                kwargs["disableSslCertValidation"] = True
            else:
                # Always explicit: without a context pyVim skips verification for localhost/127.0.0.1.
                cafile = str(self.cfg.ca_file) if self.cfg.ca_file is not None else None
                kwargs["sslContext"] = ssl.create_default_context(cafile=cafile)
        si = SmartConnect(
            protocol=parts.scheme,
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 80),
            path=parts.path or "/sdk",
            user=self.cfg.username,
            pwd=self.cfg.password.reveal(),
            # sockets must give up on their own: a thread cannot be cancelled
            httpConnectionTimeout=self.cfg.call_timeout,
            **kwargs,
        )
        # the same session through a stub that repeats reads failed in transit
        return vim.ServiceInstance("ServiceInstance", _ReadRetryStub(si._stub, self.cfg.call_tries,
                                                                     self.cfg.call_backoff, self.name))

    def _session_sync(self) -> tuple[Any, int]:
        with self._session_lock:
            if self._si is None:
                si = self._connect_sync()
                self._content = si.RetrieveContent()
                self._si = si
                self._session_gen += 1
            return self._si, self._session_gen

    def _relogin_sync(self, generation: int) -> None:
        with self._session_lock:
            if self._session_gen != generation or self._content is None:
                return  # another thread has logged in again already
            log.info("%s: session expired, logging in again", self.name)
            # Login on the same stub keeps every managed object reference we hold valid.
            self._sc().sessionManager.Login(userName=self.cfg.username, password=self.cfg.password.reveal())
            self._session_gen += 1

    def _guarded(self, what: str, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(si, *args)`` with a live session; translate every failure to a StepError."""
        try:
            si, generation = self._session_sync()
            try:
                return func(si, *args)
            except vim.fault.NotAuthenticated:
                self._relogin_sync(generation)
                return func(si, *args)
        except StepError:
            raise
        except Exception as exc:
            raise self._translate(exc, what) from exc

    def _translate(self, exc: BaseException, what: str) -> StepError:
        if isinstance(exc, vmodl.MethodFault):
            kind = RetryableError if isinstance(exc, _TRANSIENT_FAULTS) else PermanentError
            return kind(f"{what}: {_fault_text(exc)}", source=self.name)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return PermanentError(
                f"{what}: TLS certificate of {self.cfg.url} not trusted ({exc.verify_message}); "
                "set ca_file, or verify_tls = false",
                source=self.name,
            )
        if isinstance(exc, http.client.HTTPException):
            status = re.match(r"(\d{3})\b", str(exc))
            code = int(status.group(1)) if status else 0
            kind = PermanentError if 400 <= code < 500 and code not in PASSING_HTTP_STATUSES else RetryableError
            return kind(f"{what}: {self.cfg.url} answered {exc}", source=self.name)
        if isinstance(exc, (OSError, TimeoutError, EOFError)):
            return RetryableError(f"{what}: cannot talk to {self.cfg.url}: {exc!r}", source=self.name)
        if isinstance(exc, (xml.parsers.expat.ExpatError, xml.etree.ElementTree.ParseError)):
            # pyVmomi parses the answer as it arrives (SOAP with expat, SmartConnect's version probe
            # with ElementTree): a connection closed mid-answer shows as bad XML
            return RetryableError(f"{what}: unreadable answer from {self.cfg.url} (cut off?): {exc}",
                                  source=self.name)
        if _SERVER_DOWN.search(str(exc)):
            # SmartConnect's version probe says so for any failed or non-200 answer (a 503 included)
            return RetryableError(f"{what}: {exc}", source=self.name)
        return PermanentError(f"{what}: {type(exc).__name__}: {exc}", source=self.name)

    async def _call(self, what: str, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(si, *args)`` in a worker thread (see :meth:`_guarded`)."""

        def run() -> T:
            return self._guarded(what, func, *args)

        run.__name__ = what  # call_sync names the call in its timeout message
        return await self.call_sync(run)

    # -- reading the inventory -------------------------------------------------------------

    def _sc(self) -> Any:
        """The ServiceContent of the current connection."""
        if self._content is None:
            raise RetryableError(f"not connected to {self.cfg.url}", source=self.name)
        return self._content

    def _datacenter_sync(self, si: Any) -> Any:
        if self._datacenter is None:
            dc = self._sc().searchIndex.FindByInventoryPath(self.cfg.datacenter)
            if not isinstance(dc, vim.Datacenter):
                raise PermanentError(f"no datacenter {self.cfg.datacenter!r} on {self.cfg.url}", source=self.name)
            self._datacenter = dc
        return self._datacenter

    def _field_key_sync(self, si: Any, *, create: bool) -> int | None:
        if self._field_key is not None:
            return self._field_key
        manager = self._sc().customFieldsManager
        if manager is None:  # a standalone ESXi host has no custom fields
            return None

        def lookup() -> int | None:
            for field in manager.field or ():
                if field.name == OWNERSHIP_KEY and field.managedObjectType in (None, vim.VirtualMachine):
                    return int(field.key)
            return None

        key = lookup()
        if key is None and create:
            try:
                key = int(manager.AddCustomFieldDef(name=OWNERSHIP_KEY, moType=vim.VirtualMachine).key)
            except vim.fault.DuplicateName:
                key = lookup()  # another governord made it in the meantime
        if key is not None:
            self._field_key = key
        return key

    def _retrieve_sync(
        self, si: Any, object_spec: Any, obj_type: Any, paths: list[str]
    ) -> list[tuple[Any, dict[str, Any]]]:
        collector = self._sc().propertyCollector
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[object_spec],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=obj_type, pathSet=paths)],
        )
        result = collector.RetrievePropertiesEx(specSet=[spec], options=vmodl.query.PropertyCollector.RetrieveOptions())
        found: list[tuple[Any, dict[str, Any]]] = []
        while result is not None:
            for content in result.objects or ():
                found.append((content.obj, {prop.name: prop.val for prop in content.propSet or ()}))
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(token=result.token)
        return found

    def _scan_vms_sync(self, si: Any, paths: list[str]) -> list[tuple[Any, dict[str, Any]]]:
        """Every VM of the datacenter with ``paths``, in one PropertyCollector round trip."""
        dc = self._datacenter_sync(si)
        view = self._sc().viewManager.CreateContainerView(dc, [vim.VirtualMachine], True)
        try:
            traverse = vmodl.query.PropertyCollector.TraversalSpec(
                name="view", path="view", skip=False, type=vim.view.ContainerView
            )
            spec = vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[traverse])
            return self._retrieve_sync(si, spec, vim.VirtualMachine, paths)
        finally:
            try:
                view.Destroy()
            except Exception as exc:  # noqa: BLE001 - a leaked view dies with the session
                log.debug("%s: destroying a container view failed: %s", self.name, exc)

    def _record(self, obj: Any, props: dict[str, Any], field_key: int | None) -> _VmRecord:
        extra = {opt.key: opt.value for opt in props.get("config.extraConfig") or ()}
        marker = extra.get(MARKER_KEY) or None
        custom = None
        if field_key is not None:
            for value in props.get("customValue") or ():
                if value.key == field_key and getattr(value, "value", None):
                    custom = value.value
        return _VmRecord(
            moid=obj._moId,
            name=props.get("name", obj._moId),
            host_id=marker or custom,
            has_custom_field=custom is not None and (marker is None or custom == marker),
            template=bool(props.get("config.template")),
            power=_POWER.get(str(props.get("runtime.powerState")), PowerState.UNKNOWN),
            hostname=props.get("guest.hostName") or None,
            addresses=_addresses(props),
            instance_uuid=props.get("config.instanceUuid"),
            customized=bool(extra.get(CUSTOMIZED_KEY)),
            props=props,
        )

    def _owned_sync(self, si: Any, host_id: str | None) -> list[_VmRecord]:
        field_key = self._field_key_sync(si, create=False)
        records = [self._record(obj, props, field_key) for obj, props in self._scan_vms_sync(si, _SEARCH_PROPS)]
        owned = [r for r in records if r.host_id is not None and not r.template]
        if host_id is not None:
            owned = [r for r in owned if r.host_id == host_id]
        return sorted(owned, key=lambda r: (len(r.moid), r.moid))

    def _vm_sync(self, si: Any, moid: str, paths: list[str]) -> _VmRecord | None:
        vm = vim.VirtualMachine(moid, si._stub)
        try:
            found = self._retrieve_sync(
                si, vmodl.query.PropertyCollector.ObjectSpec(obj=vm, skip=False), vim.VirtualMachine, paths
            )
        except vmodl.fault.ManagedObjectNotFound:
            return None
        if not found:
            return None
        return self._record(found[0][0], found[0][1], self._field_key_sync(si, create=False))

    async def _find_records(self, host_id: str | None) -> list[_VmRecord]:
        return await self._call("find", self._owned_sync, host_id)

    async def _find_one(self, host_id: str) -> _VmRecord | None:
        records = await self._find_records(host_id)
        if len(records) > 1:
            log.warning(
                "%s: %d VMs carry %s=%s: %s; using %s",
                self.name,
                len(records),
                OWNERSHIP_KEY,
                host_id,
                [r.moid for r in records],
                records[0].moid,
            )
        return records[0] if records else None

    def _machine(self, record: _VmRecord) -> Machine:
        return Machine(
            provider=self.name,
            machine_id=record.moid,
            name=record.name,
            host_id=record.host_id,
            power=record.power,
            addresses=record.addresses,
            details={
                "instance_uuid": record.instance_uuid,
                "guest_hostname": record.hostname,
            },
        )

    # -- tasks -----------------------------------------------------------------------------

    async def _task_info(self, what: str, task: Any, timeout: float) -> Any:
        """Poll a task until it ends; return its ``info`` (success or error)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.05
        while True:
            info = await self._call(what, lambda si: task.info)
            if info.state in ("success", "error"):
                return info
            if loop.time() >= deadline:
                raise RetryableError(f"{what}: task {task._moId} still {info.state} after {timeout}s", source=self.name)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _run_task(
        self,
        what: str,
        start: Callable[[Any], Any],
        *,
        timeout: float | None = None,
        ignore: tuple[type[BaseException], ...] = (),
    ) -> Any:
        """Start a task with ``start(si)`` and wait for it; its fault becomes a StepError."""
        task = await self._call(what, start)
        info = await self._task_info(what, task, timeout or self.cfg.call_timeout)
        if info.state == "error":
            if ignore and isinstance(info.error, ignore):
                return None
            raise self._translate(info.error, what)
        return info.result

    # -- the contract ----------------------------------------------------------------------

    async def find(self, host_id: str) -> Machine | None:
        """The VM carrying ``host_id`` in its extraConfig marker or custom field, or None."""
        record = await self._find_one(host_id)
        return self._machine(record) if record else None

    async def list_owned(self) -> list[Machine]:
        """Every VM of the datacenter that carries governord's marker (templates excluded)."""
        return [self._machine(r) for r in await self._find_records(None)]

    async def power_state(self, machine_id: str) -> PowerState:
        """The VM's ``runtime.powerState``; a VM that does not exist is a PermanentError."""
        record = await self._call("power state", self._vm_sync, machine_id, ["name", "runtime.powerState"])
        if record is None:
            raise PermanentError(f"power state: no VM {machine_id} on {self.cfg.url}", source=self.name)
        return record.power

    async def create_or_find(self, spec: MachineSpec) -> Machine:
        """Find the VM marked with ``spec.host_id`` or clone it; then complete and start it."""
        try:
            profile = VSphereProfile.model_validate(spec.profile)
        except ValidationError as exc:
            raise PermanentError(f"invalid vSphere profile: {exc}", source=self.name) from None
        record = await self._find_one(spec.host_id)
        if record is None:
            record = await self._clone(spec, profile)
        await self._complete(record.moid, spec, profile)
        final = await self._call("read VM", self._vm_sync, record.moid, _SEARCH_PROPS)
        if final is None:
            raise RetryableError(f"VM {record.moid} ({spec.hostname}) vanished while being completed", source=self.name)
        return self._machine(final)

    async def wait_ready(self, machine: Machine, timeout: float) -> Machine:
        """Poll until the VM is powered on and its guest reports an IP address."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.2
        while True:
            record = await self._call("wait ready", self._vm_sync, machine.machine_id, _SEARCH_PROPS)
            if record is None:
                raise RetryableError(f"VM {machine.machine_id} ({machine.name}) no longer exists", source=self.name)
            if record.power is PowerState.ON and record.addresses:
                return self._machine(record)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RetryableError(
                    f"VM {record.moid} ({record.name}) not ready after {timeout}s: "
                    f"power {record.power.value}, guest address {'none' if not record.addresses else record.addresses}",
                    source=self.name,
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 5.0)

    async def destroy(self, host_id: str) -> None:
        """Power off and delete every VM carrying ``host_id``; verify none is left."""
        for record in await self._find_records(host_id):

            def vm(si: Any, moid: str = record.moid) -> Any:
                return vim.VirtualMachine(moid, si._stub)

            if record.power is not PowerState.OFF:
                await self._run_task(
                    f"power off {record.moid}",
                    lambda si: vm(si).PowerOffVM_Task(),
                    ignore=(vim.fault.InvalidPowerState, vmodl.fault.ManagedObjectNotFound),
                )
            try:
                await self._run_task(
                    f"destroy {record.moid}",
                    lambda si: vm(si).Destroy_Task(),
                    ignore=(vmodl.fault.ManagedObjectNotFound,),
                )
            except RetryableError:
                # The VM may have been deleted between our find and the call; only the re-check counts.
                if await self._call("destroy", self._vm_sync, record.moid, ["name"]) is not None:
                    raise
        left = await self._find_records(host_id)
        if left:
            raise RetryableError(
                f"destroy: VM {', '.join(r.moid for r in left)} with {OWNERSHIP_KEY}={host_id} still exists",
                source=self.name,
            )

    # -- create and complete ---------------------------------------------------------------

    def _placement_sync(self, si: Any, profile: VSphereProfile) -> _Placement:
        index = self._sc().searchIndex
        dc = self._datacenter_sync(si)
        dc_path = self.cfg.datacenter.strip("/")

        candidates = [
            (not props.get("config.template"), obj)
            for obj, props in self._scan_vms_sync(si, ["name", "config.template"])
            if props.get("name") == profile.template
        ]
        if not candidates:
            raise PermanentError(f"template {profile.template!r} not found in datacenter {dc_path}", source=self.name)
        # a template wins over a VM of the same name
        template = min(candidates, key=lambda c: c[0])[1]

        if self.cfg.folder:
            folder = index.FindByInventoryPath(f"{dc_path}/vm/{self.cfg.folder.strip('/')}")
            if not isinstance(folder, vim.Folder):
                raise PermanentError(f"no VM folder {self.cfg.folder!r} in datacenter {dc_path}", source=self.name)
        else:
            folder = dc.vmFolder

        cluster = index.FindByInventoryPath(f"{dc_path}/host/{self.cfg.cluster}")
        if not isinstance(cluster, vim.ComputeResource):
            raise PermanentError(f"no cluster {self.cfg.cluster!r} in datacenter {dc_path}", source=self.name)
        if self.cfg.resource_pool:
            pool = index.FindByInventoryPath(
                f"{dc_path}/host/{self.cfg.cluster}/Resources/{self.cfg.resource_pool.strip('/')}"
            )
            if not isinstance(pool, vim.ResourcePool):
                raise PermanentError(
                    f"no resource pool {self.cfg.resource_pool!r} in cluster {self.cfg.cluster}", source=self.name
                )
        else:
            pool = cluster.resourcePool

        datastore = None
        if self.cfg.datastore:
            datastore = next((ds for ds in dc.datastore if ds.name == self.cfg.datastore), None)
            if datastore is None:
                raise PermanentError(f"no datastore {self.cfg.datastore!r} in datacenter {dc_path}", source=self.name)

        device_change: list[Any] = []
        if profile.network:
            device_change.append(self._nic_change_sync(si, dc, template, profile.network))
        return _Placement(template, folder, pool, datastore, device_change)

    def _nic_change_sync(self, si: Any, dc: Any, template: Any, network_name: str) -> Any:
        traverse = vmodl.query.PropertyCollector.TraversalSpec(
            name="net", path="network", skip=False, type=vim.Datacenter
        )
        networks = self._retrieve_sync(
            si, vmodl.query.PropertyCollector.ObjectSpec(obj=dc, skip=True, selectSet=[traverse]), vim.Network, ["name"]
        )
        network = next((obj for obj, props in networks if props.get("name") == network_name), None)
        if network is None:
            raise PermanentError(
                f"no network (port group) {network_name!r} in datacenter {self.cfg.datacenter}", source=self.name
            )
        nic = next(
            (d for d in template.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)), None
        )
        if nic is None:
            raise PermanentError(
                f"template {template.name!r} has no network adapter to connect to {network_name!r}", source=self.name
            )
        if isinstance(network, vim.dvs.DistributedVirtualPortgroup):
            switch: Any = network.config.distributedVirtualSwitch
            nic.backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                port=vim.dvs.PortConnection(portgroupKey=network.key, switchUuid=switch.uuid)
            )
        elif isinstance(network, vim.OpaqueNetwork):
            summary: Any = network.summary
            nic.backing = vim.vm.device.VirtualEthernetCard.OpaqueNetworkBackingInfo(
                opaqueNetworkId=summary.opaqueNetworkId, opaqueNetworkType=summary.opaqueNetworkType
            )
        else:
            nic.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=network_name, network=network)
        return vim.vm.device.VirtualDeviceSpec(operation=vim.vm.device.VirtualDeviceSpec.Operation.edit, device=nic)

    async def _clone(self, spec: MachineSpec, profile: VSphereProfile) -> _VmRecord:
        placement = await self._call(f"placement of {spec.hostname}", self._placement_sync, profile)
        config = vim.vm.ConfigSpec(
            # The marker is in the clone's own spec: the VM carries it from the moment it exists.
            extraConfig=[vim.option.OptionValue(key=MARKER_KEY, value=spec.host_id)],
            numCPUs=profile.cpus,
            memoryMB=profile.memory_mb,
            annotation=profile.annotation,
        )
        clone_spec = vim.vm.CloneSpec(
            location=vim.vm.RelocateSpec(
                pool=placement.pool, datastore=placement.datastore, deviceChange=placement.device_change
            ),
            config=config,
            powerOn=False,
            template=False,
        )
        what = f"clone {profile.template!r} to {spec.hostname!r}"
        log.info("%s: %s for host %s", self.name, what, spec.host_id)
        task = await self._call(
            what,
            lambda si: placement.template.CloneVM_Task(folder=placement.folder, name=spec.hostname, spec=clone_spec),
        )
        info = await self._task_info(what, task, self.cfg.ready_timeout)
        if info.state == "error":
            if isinstance(info.error, vim.fault.DuplicateName):
                # Another clone of this host (started before a crash) may have won the name.
                record = await self._find_one(spec.host_id)
                if record is not None:
                    return record
                raise RetryableError(
                    f"{what}: a VM named {spec.hostname!r} exists without {OWNERSHIP_KEY}={spec.host_id} "
                    "(an earlier clone may still be running)",
                    source=self.name,
                )
            raise self._translate(info.error, what)
        record = await self._call(what, self._vm_sync, info.result._moId, _SEARCH_PROPS)
        if record is None:
            raise RetryableError(f"{what}: the clone {info.result._moId} vanished", source=self.name)
        return record

    def _set_custom_field_sync(self, si: Any, moid: str, host_id: str) -> None:
        key = self._field_key_sync(si, create=True)
        if key is None:
            return
        self._sc().customFieldsManager.SetField(entity=vim.VirtualMachine(moid, si._stub), key=key, value=host_id)

    async def _complete(self, moid: str, spec: MachineSpec, profile: VSphereProfile) -> None:
        """Bring a found or new VM to "customized and powered on", skipping what is done."""
        record = await self._call("read VM", self._vm_sync, moid, _DETAIL_PROPS)
        if record is None:
            raise RetryableError(f"VM {moid} ({spec.hostname}) vanished before it was completed", source=self.name)
        props = record.props

        def vm(si: Any) -> Any:
            return vim.VirtualMachine(moid, si._stub)

        if not record.has_custom_field:
            await self._call(f"set {OWNERSHIP_KEY} on {moid}", self._set_custom_field_sync, moid, spec.host_id)

        # Size and notes belong in the clone spec; they are checked again here because a VM found
        # after a crash, or made by a vCenter that ignored them, must still end up as asked.
        changes: Any = vim.vm.ConfigSpec()
        changed = False
        if profile.annotation is not None and (props.get("config.annotation") or "") != profile.annotation:
            changes.annotation = profile.annotation
            changed = True
        if record.power is PowerState.OFF:
            if profile.cpus is not None and props.get("config.hardware.numCPU") != profile.cpus:
                changes.numCPUs = profile.cpus
                changed = True
            if profile.memory_mb is not None and props.get("config.hardware.memoryMB") != profile.memory_mb:
                changes.memoryMB = profile.memory_mb
                changed = True
        if changed:
            await self._run_task(f"reconfigure {moid}", lambda si: vm(si).ReconfigVM_Task(spec=changes))

        if record.power is PowerState.ON:
            return
        if record.power is PowerState.OFF and not record.customized:
            nics = sum(
                isinstance(d, vim.vm.device.VirtualEthernetCard) for d in props.get("config.hardware.device") or ()
            )
            if not props.get("config.tools.pendingCustomization"):
                customization = self._customization(spec, nics)
                await self._run_task(
                    f"customize {moid} as {spec.hostname}",
                    lambda si: vm(si).CustomizeVM_Task(spec=customization),
                    ignore=(vim.fault.CustomizationPending,),
                )
            marker = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key=CUSTOMIZED_KEY, value="1")])
            await self._run_task(f"mark {moid} customized", lambda si: vm(si).ReconfigVM_Task(spec=marker))
        await self._run_task(
            f"power on {moid}", lambda si: vm(si).PowerOnVM_Task(), ignore=(vim.fault.InvalidPowerState,)
        )

    def _customization(self, spec: MachineSpec, nics: int) -> Any:
        net = spec.network
        domain = net.domain or spec.fqdn.partition(".")[2] or "localdomain"
        if net.address:
            try:
                address = ipaddress.ip_address(net.address)
            except ValueError:
                raise PermanentError(f"not an IP address: {net.address!r}", source=self.name) from None
            if address.version != 4:
                raise PermanentError(f"static IPv6 addresses are not supported: {net.address}", source=self.name)
            if net.prefix_length is None:
                raise PermanentError(f"static address {net.address} has no prefix length", source=self.name)
            if nics == 0:
                raise PermanentError(
                    f"cannot give {spec.hostname} the address {net.address}: its template has no network adapter",
                    source=self.name,
                )
            first = vim.vm.customization.IPSettings(
                ip=vim.vm.customization.FixedIp(ipAddress=str(address)),
                subnetMask=str(ipaddress.IPv4Network(f"0.0.0.0/{net.prefix_length}").netmask),
                gateway=[net.gateway] if net.gateway else [],
                dnsServerList=list(net.dns_servers),
                dnsDomain=domain,
            )
        else:
            first = vim.vm.customization.IPSettings(ip=vim.vm.customization.DhcpIpGenerator(), dnsDomain=domain)
        # vSphere wants one mapping per adapter; adapters beyond the first stay on DHCP.
        adapters = [first] + [
            vim.vm.customization.IPSettings(ip=vim.vm.customization.DhcpIpGenerator()) for _ in range(max(nics - 1, 0))
        ]
        return vim.vm.customization.Specification(
            identity=vim.vm.customization.LinuxPrep(
                hostName=vim.vm.customization.FixedName(name=spec.hostname),
                domain=domain,
                hwClockUTC=True,
            ),
            globalIPSettings=vim.vm.customization.GlobalIPSettings(
                dnsServerList=list(net.dns_servers), dnsSuffixList=[domain]
            ),
            nicSettingMap=[vim.vm.customization.AdapterMapping(adapter=a) for a in adapters[:nics]],
        )


__all__ = ["CUSTOMIZED_KEY", "MARKER_KEY", "VSphereConfig", "VSphereProfile", "VSphereProvider"]
