"""The simulated engine's inventory and the life of its VMs, independent of HTTP.

Status changes follow the engine's own sequences and are driven by a clock: every change that
takes time is scheduled as ``(due, status)`` and applied when anything reads the VM (so the
simulator needs no background tasks, and a test that waits sees the same order as on a real
engine). The texts of validation failures are the engine's (AppErrors.properties with the
action and type filled in), in the ``[...]`` brackets the REST layer puts around them.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ovirtsdk4 import types

#: The engine's id of the Blank template, the same on every installation.
BLANK_TEMPLATE_ID = "00000000-0000-0000-0000-000000000000"
MIB = 1024 * 1024

#: Statuses a stop or shutdown applies to (StopVmCommandBase.validate: ``isRunning()``, or Paused,
#: NotResponding, Suspended); Down is no error but "already in the requested status".
STOPPABLE = frozenset(
    {
        types.VmStatus.UP,
        types.VmStatus.POWERING_UP,
        types.VmStatus.WAIT_FOR_LAUNCH,
        types.VmStatus.POWERING_DOWN,
        types.VmStatus.REBOOT_IN_PROGRESS,
        types.VmStatus.MIGRATING,
        types.VmStatus.NOT_RESPONDING,
        types.VmStatus.PAUSED,
        types.VmStatus.SUSPENDED,
    }
)

#: Statuses a run starts from (RunVmValidator.canRunVm: ActionUtils' status matrix forbids RunVm
#: in every other status; Paused resumes, Suspended restores).
STARTABLE = frozenset({types.VmStatus.DOWN, types.VmStatus.PAUSED, types.VmStatus.SUSPENDED})

#: Statuses a remove accepts (RemoveVmCommand.validate, which also takes ImageIllegal: the API has
#: no such status; ImageLocked is refused earlier, as locked).
REMOVABLE = frozenset({types.VmStatus.DOWN, types.VmStatus.UNASSIGNED})

#: How the engine names a status in its messages (LocalizedVmStatus, VAR__VM_STATUS__* in
#: AppErrors.properties).
STATUS_TEXT = {
    types.VmStatus.UNASSIGNED: "Unassigned",
    types.VmStatus.DOWN: "Down",
    types.VmStatus.UP: "Up",
    types.VmStatus.POWERING_UP: "Powering Up",
    types.VmStatus.PAUSED: "Paused",
    types.VmStatus.MIGRATING: "Migrating",
    types.VmStatus.UNKNOWN: "Unknown",
    types.VmStatus.NOT_RESPONDING: "Not Responding",
    types.VmStatus.WAIT_FOR_LAUNCH: "Wait for Launch",
    types.VmStatus.REBOOT_IN_PROGRESS: "Reboot in Progress",
    types.VmStatus.SAVING_STATE: "Saving State",
    types.VmStatus.RESTORING_STATE: "Restoring State",
    types.VmStatus.SUSPENDED: "Suspended",
    types.VmStatus.IMAGE_LOCKED: "Image Locked",
    types.VmStatus.POWERING_DOWN: "Powering Down",
}

#: A test's hook, run before the engine handles an action on a VM: ``hook(state, vm_id)``.
Hook = Callable[["EngineState", str], None]


class EngineFault(Exception):
    """A failure the REST layer renders as a ``<fault>`` (or, without a reason, an empty body)."""

    def __init__(self, status: int, reason: str | None = None, detail: str | None = None) -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


def operation_failed(message: str, status: int = 409) -> EngineFault:
    """A failed validation ("can do action"): 409 with the message in brackets."""
    return EngineFault(status, "Operation Failed", f"[{message}]")


def entity_not_found(what: str) -> EngineFault:
    """A reference by name or id that resolves to nothing."""
    return EngineFault(404, "Operation Failed", f"Entity not found: {what}")


def utcnow() -> datetime.datetime:
    """Now, in UTC, as the engine writes dates."""
    return datetime.datetime.now(datetime.UTC)


@dataclass
class DataCenter:
    """A data center (only its identity)."""
    id: str
    name: str


@dataclass
class Cluster:
    """A cluster in a data center."""
    id: str
    name: str
    data_center: DataCenter
    description: str = ""


@dataclass
class Template:
    """A template: the size and OS a VM made from it starts with."""
    id: str
    name: str
    cluster: Cluster | None
    memory: int
    guaranteed: int
    max_memory: int
    sockets: int
    os_type: str
    description: str = ""
    comment: str = ""
    #: a VM made from it is image_locked while its disks are copied (Blank has none)
    has_disks: bool = True
    version_number: int = 1
    creation_time: datetime.datetime = field(default_factory=utcnow)


@dataclass
class Vm:
    """A VM and everything its status and guest report depend on."""
    id: str
    name: str
    cluster: Cluster
    template: Template
    memory: int
    guaranteed: int
    max_memory: int
    sockets: int
    cores: int
    threads: int
    description: str
    comment: str
    os_type: str
    mac: str
    status: types.VmStatus = types.VmStatus.DOWN
    creation_time: datetime.datetime = field(default_factory=utcnow)
    start_time: datetime.datetime | None = None
    stop_time: datetime.datetime | None = None
    #: pending status changes, ``(monotonic due time, status or None for "gone")``
    schedule: list[tuple[float, types.VmStatus | None]] = field(default_factory=list)
    #: the initialization the VM was (last) started with, when cloud-init was used
    run_once_initialization: types.Initialization | None = None
    #: the VM's own (persistent) initialization, from the add request
    initialization: types.Initialization | None = None
    #: when the guest agent starts reporting (monotonic), while up
    guest_reports_at: float | None = None
    address: str | None = None
    fqdn: str | None = None
    removing: bool = False
    #: further network devices the guest reports (name, MAC, addresses), from a test
    extra_nics: list[GuestNic] = field(default_factory=list)


@dataclass
class GuestNic:
    """A network device as the guest agent reports it."""
    name: str
    mac: str
    addresses: list[str]


@dataclass
class Timing:
    """How long the engine's transitions take, in seconds."""

    image_locked: float = 2.0
    wait_for_launch: float = 0.5
    powering_up: float = 2.0
    guest_agent: float = 1.0
    #: after the agent's first report (the IPv6 link-local address, there as soon as the link
    #: is), until the IPv4 address (static, or a DHCP lease) is reported too
    address: float = 1.0
    stop: float = 0.5
    shutdown: float = 2.0
    remove: float = 1.0

    @classmethod
    def scaled(cls, unit: float) -> Timing:
        """All transitions as multiples of ``unit`` seconds (tests use a small unit)."""
        return cls(
            image_locked=2 * unit,
            wait_for_launch=unit,
            powering_up=2 * unit,
            guest_agent=unit,
            address=unit,
            stop=unit,
            shutdown=3 * unit,
            remove=unit,
        )


class EngineState:
    """Data centers, clusters, templates and VMs, and the rules the engine applies to them."""

    def __init__(self, seed: dict[str, Any], timing: Timing | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timing = timing or Timing()
        self.clock = clock
        self.data_centers: dict[str, DataCenter] = {}
        self.clusters: dict[str, Cluster] = {}
        self.templates: dict[str, Template] = {}
        self.vms: dict[str, Vm] = {}
        #: one-shot hooks per action ("start", "stop", "shutdown", "remove"), see :meth:`before`
        self._hooks: dict[str, list[Hook]] = {}
        #: VMs whose next launch fails on every host, see :meth:`fail_next_launch`
        self._failing_launches: set[str] = set()
        #: where the guests' global IPv6 addresses come from (SLAAC: the prefix and the MAC's EUI-64),
        #: when the seed has one
        self.ipv6_network = ipaddress.IPv6Network(seed["ipv6_network"]) if seed.get("ipv6_network") else None
        network = ipaddress.ip_network(seed.get("dhcp_network", "192.0.2.0/24"))
        self._dhcp: Iterator[ipaddress.IPv4Address | ipaddress.IPv6Address] = itertools.islice(
            network.hosts(), 10, None
        )
        self._macs = itertools.count(0x100)
        self.product_version: str = seed.get("version", "4.5.7")
        for item in seed.get("data_centers", [{"name": "Default"}]):
            dc = DataCenter(item.get("id") or str(uuid.uuid4()), item["name"])
            self.data_centers[dc.id] = dc
        for item in seed.get("clusters", [{"name": "Default", "data_center": "Default"}]):
            dc = self._by_name(self.data_centers, item["data_center"])
            cluster = Cluster(item.get("id") or str(uuid.uuid4()), item["name"], dc, item.get("description", ""))
            self.clusters[cluster.id] = cluster
        blank = Template(BLANK_TEMPLATE_ID, "Blank", None, 1024 * MIB, 1024 * MIB, 4096 * MIB, 1, "other",
                         description="Blank template", has_disks=False)
        self.templates[blank.id] = blank
        for item in seed.get("templates", []):
            cluster = self._by_name(self.clusters, item["cluster"]) if item.get("cluster") else None
            memory = int(item.get("memory_mb", 1024)) * MIB
            template = Template(
                item.get("id") or str(uuid.uuid4()),
                item["name"],
                cluster,
                memory=memory,
                guaranteed=int(item.get("guaranteed_mb", item.get("memory_mb", 1024))) * MIB,
                max_memory=int(item.get("max_memory_mb", 4 * item.get("memory_mb", 1024))) * MIB,
                sockets=int(item.get("cpus", 1)),
                os_type=item.get("os", "other_linux"),
                description=item.get("description", ""),
                comment=item.get("comment", ""),
            )
            self.templates[template.id] = template

    @staticmethod
    def _by_name(objects: dict[str, Any], name: str) -> Any:
        for obj in objects.values():
            if obj.name == name:
                return obj
        raise KeyError(f"seed refers to {name!r}, which it does not define")

    # -- time ---------------------------------------------------------------------------------

    def advance(self) -> None:
        """Apply every status change that is due."""
        now = self.clock()
        for vm in list(self.vms.values()):
            while vm.schedule and vm.schedule[0][0] <= now:
                _, status = vm.schedule.pop(0)
                if status is None:
                    del self.vms[vm.id]
                    break
                self._enter(vm, status)

    def _enter(self, vm: Vm, status: types.VmStatus) -> None:
        vm.status = status
        if status is types.VmStatus.UP:
            vm.start_time = utcnow()
            vm.guest_reports_at = self.clock() + self.timing.guest_agent
        elif status is types.VmStatus.DOWN:
            vm.stop_time = utcnow()
            vm.guest_reports_at = None
            vm.address = None
            vm.fqdn = None
            vm.run_once_initialization = None

    def _plan(self, vm: Vm, steps: list[tuple[float, types.VmStatus | None]]) -> None:
        due = self.clock()
        vm.schedule = []
        for delay, status in steps:
            due += delay
            vm.schedule.append((due, status))

    # -- lookups ------------------------------------------------------------------------------

    def vm(self, vm_id: str) -> Vm:
        """The VM with this id; an unknown id is the engine's bare 404."""
        self.advance()
        found = self.vms.get(vm_id)
        if found is None:
            raise EngineFault(404)
        return found

    def resolve_cluster(self, ref: types.Cluster | None) -> Cluster:
        """The cluster a request refers to by id or name."""
        if ref is None or (ref.id is None and ref.name is None):
            raise EngineFault(400, "Incomplete parameters", "Vm [cluster.id|name] required for add")
        if ref.id is not None:
            found = self.clusters.get(ref.id)
            if found is None:
                raise entity_not_found(f"Cluster: id={ref.id}")
            return found
        for cluster in self.clusters.values():
            if cluster.name == ref.name:
                return cluster
        raise entity_not_found(f"Cluster: name={ref.name}")

    def resolve_template(self, ref: types.Template | None, cluster: Cluster) -> Template:
        """The template a request refers to by id or name (Blank when none)."""
        if ref is None or (ref.id is None and ref.name is None):
            return self.templates[BLANK_TEMPLATE_ID]
        if ref.id is not None:
            found = self.templates.get(ref.id)
            if found is None:
                raise entity_not_found(f"Template: id={ref.id}")
            return found
        # by name: the base version of a template of this data center (or Blank)
        candidates = [
            t for t in self.templates.values()
            if t.name == ref.name and (t.cluster is None or t.cluster.data_center is cluster.data_center)
        ]
        if not candidates:
            raise entity_not_found(f"Template: name={ref.name}")
        return min(candidates, key=lambda t: t.version_number)

    # -- actions ------------------------------------------------------------------------------

    def add_vm(self, body: types.Vm) -> Vm:
        """``POST /vms``: a VM from a template, image_locked while its disks are copied."""
        self.advance()
        missing = [name for name, value in (("name", body.name), ("cluster", body.cluster)) if value is None]
        if missing:
            raise EngineFault(400, "Incomplete parameters", f"Vm [{', '.join(missing)}] required for add")
        cluster = self.resolve_cluster(body.cluster)
        template = self.resolve_template(body.template, cluster)
        name = body.name
        if not name or len(name) > 64 or not all(ch.isalnum() or ch in "_-." for ch in name):
            raise operation_failed(
                "Cannot add VM. The given name contains special characters. Only lower-case and upper-case "
                "letters, numbers, '_', '-', '.' are allowed.",
                400,
            )
        if any(vm.name == name for vm in self.vms.values()):
            raise operation_failed(
                "Cannot add VM. The VM name is already in use, please choose a unique name and try again."
            )
        memory = body.memory if body.memory is not None else template.memory
        policy = body.memory_policy or types.MemoryPolicy()
        guaranteed = policy.guaranteed if policy.guaranteed is not None else min(template.guaranteed, memory)
        max_memory = policy.max if policy.max is not None else max(template.max_memory, memory)
        if guaranteed > memory:
            raise operation_failed("Cannot add VM. Physical Memory Guaranteed cannot exceed Memory Size.")
        if max_memory < memory:
            raise operation_failed("Cannot add VM. Maximum memory size must be greater or equal to memory size.")
        topology = body.cpu.topology if body.cpu is not None and body.cpu.topology is not None else None
        sockets = topology.sockets if topology is not None and topology.sockets else template.sockets
        cores = topology.cores if topology is not None and topology.cores else 1
        threads = topology.threads if topology is not None and topology.threads else 1
        vm = Vm(
            id=str(uuid.uuid4()),
            name=name,
            cluster=cluster,
            template=template,
            memory=memory,
            guaranteed=guaranteed,
            max_memory=max_memory,
            sockets=sockets,
            cores=cores,
            threads=threads,
            description=body.description if body.description is not None else "",
            comment=body.comment if body.comment is not None else "",
            os_type=template.os_type,
            mac=f"56:6f:{(n := next(self._macs)) >> 24 & 0xFF:02x}:{n >> 16 & 0xFF:02x}:{n >> 8 & 0xFF:02x}:{n & 0xFF:02x}",
            initialization=body.initialization,
        )
        self.vms[vm.id] = vm
        if template.has_disks:
            vm.status = types.VmStatus.IMAGE_LOCKED
            self._plan(vm, [(self.timing.image_locked, types.VmStatus.DOWN)])
        return vm

    def start_vm(self, vm_id: str, action: types.Action) -> Vm:
        """``POST /vms/{id}/start`` (run, or "run once" when the action carries a VM).

        BackendVmResource.start looks the VM up only for a run once (createRunVmOnceParams:
        an unknown id is a bare 404); a plain run goes straight to RunVmCommand, whose
        validation answers 400 ``Cannot run VM. VM is not found.``
        """
        self.advance()
        self._run_hook("start", vm_id)
        if vm_id not in self.vms and action.vm is None:
            raise operation_failed("Cannot run VM. VM is not found.", 400)
        vm = self.vm(vm_id)
        self._not_locked(vm, "run")
        if vm.status not in STARTABLE:
            # RunVmValidator.validateVmStatusUsingMatrix: ACTION_TYPE_FAILED_VM_STATUS_ILLEGAL
            # (CONFLICT), checked before vmDuringInitialization's "VM is running"
            raise operation_failed(f"Cannot run VM because the VM is in {STATUS_TEXT[vm.status]} status.")
        use_cloud_init = bool(action.use_cloud_init) or bool(action.use_initialization)
        initialization = action.vm.initialization if action.vm is not None else None
        vm.run_once_initialization = (initialization or vm.initialization) if use_cloud_init else None
        if vm.status is types.VmStatus.PAUSED:
            self._plan(vm, [(0, types.VmStatus.UP)])
        elif vm.id in self._failing_launches:
            # the action succeeded, but the VM fails on every host it is tried on (RunVmCommand
            # .rerun until no host is left): wait_for_launch, then down again
            self._failing_launches.discard(vm.id)
            vm.status = types.VmStatus.WAIT_FOR_LAUNCH
            self._plan(vm, [(self.timing.wait_for_launch, types.VmStatus.DOWN)])
        else:
            vm.status = types.VmStatus.WAIT_FOR_LAUNCH
            self._plan(vm, [(self.timing.wait_for_launch, types.VmStatus.POWERING_UP),
                            (self.timing.powering_up, types.VmStatus.UP)])
        return vm

    def stop_vm(self, vm_id: str, graceful: bool) -> Vm:
        """``POST /vms/{id}/stop`` (power off) or ``/shutdown`` (ACPI, through the guest).

        BackendVmResource.stop/shutdown run the command without looking the VM up first, so an
        unknown (or just removed) VM is the command's own validation failure: 400 (EngineMessage
        ACTION_TYPE_FAILED_VM_NOT_FOUND is BAD_PARAMETERS, ErrorMessageHelper.getStatus), not 404.
        A VM that is already down is no failure at all: StopVmCommandBase.shouldSkipCommandExecution
        skips validation and execution and the action succeeds (audit VM_ALREADY_IN_REQUESTED_STATUS).
        """
        action = "shutdown" if graceful else "stop"
        self.advance()
        self._run_hook(action, vm_id)
        vm = self.vms.get(vm_id)
        if vm is None:
            raise operation_failed(f"Cannot {action} VM. VM is not found.", 400)
        self._not_locked(vm, action)
        if vm.status is types.VmStatus.DOWN:
            return vm
        if vm.status not in STOPPABLE:
            # StopVmCommandBase.validate: Unknown, ImageIllegal, Unassigned... are "not running"
            raise operation_failed(f"Cannot {action} VM. VM is not running.")
        # ShutdownVmCommand.perform: only an Up VM is shut down through the guest; any other
        # status it stops instead (StopVmTypeEnum.CANNOT_SHUTDOWN), and the action succeeds
        graceful = graceful and vm.status is types.VmStatus.UP
        vm.status = types.VmStatus.POWERING_DOWN
        delay = self.timing.shutdown if graceful else self.timing.stop
        self._plan(vm, [(delay, types.VmStatus.DOWN)])
        return vm

    def remove_vm(self, vm_id: str) -> None:
        """``DELETE /vms/{id}``: refused while running; the disks go first (image_locked), then the VM.

        BackendVmResource.remove looks the VM up first (``get()``: an unknown id is a bare 404);
        a VM removed between that lookup and RemoveVmCommand.validate is the command's 400
        ``Cannot remove VM. VM is not found.`` (hooks run in between, to make that race).
        """
        vm = self.vm(vm_id)
        self._run_hook("remove", vm_id)
        if self.vms.get(vm_id) is not vm:
            raise operation_failed("Cannot remove VM. VM is not found.", 400)
        self._not_locked(vm, "remove")
        if vm.status is types.VmStatus.SUSPENDED:
            raise operation_failed("Cannot remove VM that its state is not down.\n-Please stop the VM first.")
        if vm.status not in REMOVABLE:
            # RemoveVmCommand.validate: every status but Down, Unassigned (and ImageIllegal, and
            # Suspended, above) is "running", Unknown and Not Responding included
            raise operation_failed("Cannot remove VM. VM is running.")
        vm.removing = True
        vm.status = types.VmStatus.IMAGE_LOCKED
        self._plan(vm, [(self.timing.remove, None)])

    # -- what tests make happen -----------------------------------------------------------------

    def before(self, action: str, hook: Hook) -> None:
        """Run ``hook(state, vm_id)`` once, just before the engine handles the next ``action``.

        This is how tests make the races a real engine has: another client removing or starting
        the VM between the provider's read and its action.
        """
        self._hooks.setdefault(action, []).append(hook)

    def _run_hook(self, action: str, vm_id: str) -> None:
        hooks = self._hooks.get(action)
        if hooks:
            hooks.pop(0)(self, vm_id)

    def set_status(self, vm_id: str, status: types.VmStatus,
                   then: list[tuple[float, types.VmStatus | None]] | None = None) -> None:
        """Put the VM in ``status`` now, as its host reports it, then follow ``then`` (delay, status).

        The statuses no request makes: ``not_responding`` and ``unknown`` (the host stopped
        answering), ``paused`` (an I/O error), ``migrating``, or ``down`` under a running VM.
        """
        vm = self.vm(vm_id)
        self._enter(vm, status)
        self._plan(vm, then or [])

    def fail_next_launch(self, vm_id: str) -> None:
        """The VM's next start is accepted, but the VM cannot run anywhere and falls back to down."""
        self.vm(vm_id)
        self._failing_launches.add(vm_id)

    def forget(self, vm_id: str) -> None:
        """The VM is gone at once, as if another client had removed it (disks and all)."""
        self.vms.pop(vm_id, None)

    def _not_locked(self, vm: Vm, action: str) -> None:
        if vm.status is types.VmStatus.IMAGE_LOCKED:
            raise operation_failed(f"Cannot {action} VM: VM is locked. Please try again in a few minutes.")

    # -- what the guest agent reports ---------------------------------------------------------

    def guest_report(self, vm: Vm) -> tuple[str | None, str | None]:
        """The guest's IPv4 address and FQDN once its agent reports them (static from cloud-init, else DHCP)."""
        if vm.status is not types.VmStatus.UP or vm.guest_reports_at is None:
            return None, None
        if self.clock() < vm.guest_reports_at + self.timing.address:
            return None, None
        if vm.address is None:
            init = vm.run_once_initialization
            static = None
            if init is not None:
                for nic in init.nic_configurations or ():
                    if nic.boot_protocol is types.BootProtocol.STATIC and nic.ip is not None and nic.ip.address:
                        static = nic.ip.address
                        break
            vm.address = static or str(next(self._dhcp))
            host_name = init.host_name if init is not None and init.host_name else None
            vm.fqdn = host_name or vm.name
        return vm.address, vm.fqdn

    def guest_nics(self, vm: Vm) -> list[GuestNic]:
        """The network devices the guest agent reports, with every address on them.

        A real agent reports all of a device's addresses, IPv6 ones included: the link-local
        one first (as soon as the link is up), then the IPv4 address, and a global IPv6 one
        where the network has a prefix; and every other device the guest has.
        """
        if vm.status is not types.VmStatus.UP or vm.guest_reports_at is None or self.clock() < vm.guest_reports_at:
            return []
        interface_id = _eui64(vm.mac)
        addresses = [str(ipaddress.IPv6Address((0xFE80 << 112) | interface_id))]
        address, _ = self.guest_report(vm)
        if address is not None:
            addresses.insert(0, address)
            if self.ipv6_network is not None:
                addresses.insert(1, str(self.ipv6_network.network_address + interface_id))
        return [GuestNic("eth0", vm.mac, addresses), *vm.extra_nics]

    def report_nic(self, vm_id: str, name: str, addresses: list[str]) -> None:
        """The guest reports one more network device (a second NIC, a bridge...) with these addresses."""
        vm = self.vm(vm_id)
        n = len(vm.extra_nics) + 1
        vm.extra_nics.append(GuestNic(name, f"{vm.mac[:-2]}{(int(vm.mac[-2:], 16) + 0x80 + n) & 0xFF:02x}", addresses))


def _eui64(mac: str) -> int:
    """The modified EUI-64 interface identifier of a MAC address (RFC 4291, appendix A)."""
    octets = bytes.fromhex(mac.replace(":", ""))
    eui = bytes([octets[0] ^ 0x02, *octets[1:3], 0xFF, 0xFE, *octets[3:]])
    return int.from_bytes(eui, "big")
