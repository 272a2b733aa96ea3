"""The floor for bench/e2e.py: the same SDK and API calls governord's vSphere provider and
Foreman and Satellite registrars make for one host, written as a plain asyncio script on the
SDKs themselves (pyvmomi, apypie, xmlrpc.client), with no governord code at all.

Per host, scale-up: find (a marker scan of the datacenter), placement (a name scan and three
inventory-path look-ups), clone with the marker in ``extraConfig``, read the clone, set the
owner custom field, resize, customize with the host's fixed address, mark it customized, power
on, read it, then poll until vSphere reports the guest address; then Foreman (host group and
Puppet class look-ups, host search, create, class list, class assignments) and Satellite
(group and activation key look-ups, ``getId``, ``createSystemProfile``, ``getDetails``,
``setDetails``, ``listGroups``, ``setGroupMembership``). Teardown: Foreman (search, delete,
search, read 404), Satellite (``getId``, ``getDetails``, ``deleteSystem``, ``getId``), then the
VM (scan, power off, destroy, scan). Tasks are polled on the provider's own schedule (50 ms,
doubling to 2 s) and so is the guest (200 ms, growing by half to 5 s): those are calls
governord makes, so the floor makes them too.

Every blocking call runs in a worker thread (one thread per concurrent host), as governord's
``call_sync`` does; hosts run ``concurrency`` at a time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
import urllib.parse
import xmlrpc.client
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests
from apypie import ForemanApi
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

T = TypeVar("T")

MARKER_KEY = "guestinfo.governord.host-id"
CUSTOMIZED_KEY = "guestinfo.governord.customized"
OWNER_FIELD = "governord:host-id"
SEARCH_PROPS = ["name", "config.template", "config.extraConfig", "config.instanceUuid", "customValue",
                "runtime.powerState", "guest.hostName", "guest.ipAddress", "guest.net"]
DETAIL_PROPS = [*SEARCH_PROPS, "config.annotation", "config.hardware.numCPU", "config.hardware.memoryMB",
                "config.hardware.device", "config.tools.pendingCustomization"]


@dataclass
class FloorHost:
    """One host as the floor script sees it."""

    host_id: str
    hostname: str
    fqdn: str
    address: str
    prefix_length: int
    gateway: str
    dns_servers: list[str]
    domain: str
    moid: str | None = None
    foreman_id: int | None = None
    satellite_id: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class FloorSettings:
    """Where the peers are and what governord's lab config asks for (same values)."""

    vcenter_url: str
    vcenter_user: str
    vcenter_password: str
    datacenter: str
    cluster: str
    resource_pool: str
    folder: str
    template: str
    cpus: int
    memory_mb: int
    foreman_url: str
    foreman_user: str
    foreman_password: str
    organization: str
    location: str
    puppet_environment: str
    hostgroup: str
    puppet_classes: list[str]
    parameters: dict[str, str]
    satellite_url: str
    satellite_user: str
    satellite_password: str
    system_group: str
    activation_key: str
    cache_dir: Path
    call_timeout: float = 60.0


class Floor:
    """The SDK calls for N hosts, with ``concurrency`` hosts in flight."""

    def __init__(self, settings: FloorSettings, concurrency: int) -> None:
        self.s = settings
        self.concurrency = concurrency
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="floor")
        self.si: Any = None
        self.content: Any = None
        self.dc: Any = None
        self.field_key: int | None = None
        self.field_lock = threading.Lock()
        self.foreman: ForemanApi | None = None
        self.foreman_ids: dict[str, Any] | None = None
        self.satellite_key: str | None = None

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, func, *args)

    # -- connections (made once, before the clock starts, as governord's start() does) -------

    def _connect_sync(self) -> None:
        parts = urllib.parse.urlsplit(self.s.vcenter_url)
        self.si = SmartConnect(protocol=parts.scheme, host=parts.hostname, port=parts.port, path=parts.path,
                               user=self.s.vcenter_user, pwd=self.s.vcenter_password,
                               disableSslCertValidation=True, httpConnectionTimeout=self.s.call_timeout)
        self.content = self.si.RetrieveContent()
        self.dc = self.content.searchIndex.FindByInventoryPath(self.s.datacenter)
        session = requests.Session()
        self.s.cache_dir.mkdir(parents=True, exist_ok=True)
        self.foreman = ForemanApi(uri=self.s.foreman_url.rstrip("/"), username=self.s.foreman_user,
                                  password=self.s.foreman_password, verify_ssl=False,
                                  apidoc_cache_base_dir=str(self.s.cache_dir), session=session)
        self.foreman.resource_action("home", "status", {})
        self.satellite_key = str(self._xmlrpc("auth.login", self.s.satellite_user, self.s.satellite_password))

    async def connect(self) -> None:
        await self.run(self._connect_sync)

    async def close(self) -> None:
        await self.run(self._xmlrpc, "auth.logout", self.satellite_key)
        await self.run(Disconnect, self.si)
        self.pool.shutdown()

    # -- vSphere ---------------------------------------------------------------------------

    def _retrieve(self, object_spec: Any, obj_type: Any, paths: list[str]) -> list[tuple[Any, dict[str, Any]]]:
        collector = self.content.propertyCollector
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[object_spec], propSet=[vmodl.query.PropertyCollector.PropertySpec(type=obj_type, pathSet=paths)])
        result = collector.RetrievePropertiesEx(specSet=[spec], options=vmodl.query.PropertyCollector.RetrieveOptions())
        found = []
        while result is not None:
            for content in result.objects or ():
                found.append((content.obj, {p.name: p.val for p in content.propSet or ()}))
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(token=result.token)
        return found

    def _scan(self, paths: list[str]) -> list[tuple[Any, dict[str, Any]]]:
        view = self.content.viewManager.CreateContainerView(self.dc, [vim.VirtualMachine], True)
        try:
            traverse = vmodl.query.PropertyCollector.TraversalSpec(name="view", path="view", skip=False,
                                                                   type=vim.view.ContainerView)
            return self._retrieve(vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[traverse]),
                                  vim.VirtualMachine, paths)
        finally:
            view.Destroy()

    def _field_key_sync(self, create: bool) -> int | None:
        with self.field_lock:
            if self.field_key is None:
                manager = self.content.customFieldsManager
                for f in manager.field or ():
                    if f.name == OWNER_FIELD:
                        self.field_key = int(f.key)
                if self.field_key is None and create:
                    self.field_key = int(manager.AddCustomFieldDef(name=OWNER_FIELD, moType=vim.VirtualMachine).key)
            return self.field_key

    def _owned(self, host_id: str) -> list[tuple[Any, dict[str, Any]]]:
        self._field_key_sync(False)
        owned = []
        for obj, props in self._scan(SEARCH_PROPS):
            extra = {o.key: o.value for o in props.get("config.extraConfig") or ()}
            if extra.get(MARKER_KEY) == host_id and not props.get("config.template"):
                owned.append((obj, props))
        return owned

    def _vm(self, moid: str, paths: list[str]) -> dict[str, Any] | None:
        vm = vim.VirtualMachine(moid, self.si._stub)
        found = self._retrieve(vmodl.query.PropertyCollector.ObjectSpec(obj=vm, skip=False), vim.VirtualMachine, paths)
        self._field_key_sync(False)
        return found[0][1] if found else None

    def _placement(self) -> tuple[Any, Any, Any]:
        index = self.content.searchIndex
        template = next(obj for obj, props in self._scan(["name", "config.template"])
                        if props.get("name") == self.s.template)
        folder = index.FindByInventoryPath(f"{self.s.datacenter}/vm/{self.s.folder}")
        index.FindByInventoryPath(f"{self.s.datacenter}/host/{self.s.cluster}")
        pool = index.FindByInventoryPath(f"{self.s.datacenter}/host/{self.s.cluster}/Resources/{self.s.resource_pool}")
        return template, folder, pool

    async def _task(self, task: Any) -> Any:
        delay = 0.05
        while True:
            info = await self.run(lambda: task.info)
            if info.state == "success":
                return info.result
            if info.state == "error":
                raise RuntimeError(f"task {task._moId} failed: {info.error}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _customization(self, host: FloorHost) -> Any:
        first = vim.vm.customization.IPSettings(
            ip=vim.vm.customization.FixedIp(ipAddress=host.address),
            subnetMask=str(ipaddress.IPv4Network(f"0.0.0.0/{host.prefix_length}").netmask),
            gateway=[host.gateway], dnsServerList=host.dns_servers, dnsDomain=host.domain)
        return vim.vm.customization.Specification(
            identity=vim.vm.customization.LinuxPrep(hostName=vim.vm.customization.FixedName(name=host.hostname),
                                                    domain=host.domain, hwClockUTC=True),
            globalIPSettings=vim.vm.customization.GlobalIPSettings(dnsServerList=host.dns_servers,
                                                                   dnsSuffixList=[host.domain]),
            nicSettingMap=[vim.vm.customization.AdapterMapping(adapter=first)])

    async def provision(self, host: FloorHost) -> None:
        await self.run(self._owned, host.host_id)  # find before create
        template, folder, pool = await self.run(self._placement)
        spec = vim.vm.CloneSpec(
            location=vim.vm.RelocateSpec(pool=pool, datastore=None, deviceChange=[]),
            config=vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key=MARKER_KEY, value=host.host_id)],
                                     numCPUs=self.s.cpus, memoryMB=self.s.memory_mb),
            powerOn=False, template=False)
        task = await self.run(lambda: template.CloneVM_Task(folder=folder, name=host.hostname, spec=spec))
        moid = host.moid = (await self._task(task))._moId
        await self.run(self._vm, moid, SEARCH_PROPS)
        props = await self.run(self._vm, moid, DETAIL_PROPS)
        assert props is not None
        vm = vim.VirtualMachine(moid, self.si._stub)

        def set_field() -> None:
            key = self._field_key_sync(True)
            self.content.customFieldsManager.SetField(entity=vm, key=key, value=host.host_id)

        await self.run(set_field)
        changes = vim.vm.ConfigSpec()
        changed = False
        if props.get("config.hardware.numCPU") != self.s.cpus:
            changes.numCPUs, changed = self.s.cpus, True
        if props.get("config.hardware.memoryMB") != self.s.memory_mb:
            changes.memoryMB, changed = self.s.memory_mb, True
        if changed:
            await self._task(await self.run(lambda: vm.ReconfigVM_Task(spec=changes)))
        nics = sum(isinstance(d, vim.vm.device.VirtualEthernetCard) for d in props.get("config.hardware.device") or ())
        assert nics >= 1, "the template has no network adapter"
        customization = self._customization(host)
        await self._task(await self.run(lambda: vm.CustomizeVM_Task(spec=customization)))
        marker = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key=CUSTOMIZED_KEY, value="1")])
        await self._task(await self.run(lambda: vm.ReconfigVM_Task(spec=marker)))
        await self._task(await self.run(vm.PowerOnVM_Task))
        await self.run(self._vm, moid, SEARCH_PROPS)
        # wait ready: powered on with a guest address
        delay = 0.2
        while True:
            props = await self.run(self._vm, moid, SEARCH_PROPS)
            assert props is not None
            if str(props.get("runtime.powerState")) == "poweredOn" and props.get("guest.ipAddress"):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 5.0)

    async def deprovision(self, host: FloorHost) -> None:
        for obj, props in await self.run(self._owned, host.host_id):
            vm = vim.VirtualMachine(obj._moId, self.si._stub)
            if str(props.get("runtime.powerState")) != "poweredOff":
                await self._task(await self.run(vm.PowerOffVM_Task))
            await self._task(await self.run(vm.Destroy_Task))
        left = await self.run(self._owned, host.host_id)
        assert not left, f"{host.hostname} still has a VM"

    # -- Foreman (apypie, one round trip per call) ------------------------------------------

    async def _foreman(self, resource: str, action: str, params: dict[str, Any]) -> Any:
        assert self.foreman is not None
        return await self.run(self.foreman.resource_action, resource, action, params)

    async def _foreman_find(self, resource: str, search_field: str, value: str, **params: Any) -> dict[str, Any]:
        found = await self._foreman(resource, "index", {"per_page": 2 << 31, "search": f'{search_field}="{value}"',
                                                         **params})
        results = found["results"]
        if isinstance(results, dict):
            results = [item for group in results.values() for item in group]
        return next(r for r in results if r.get(search_field) == value)

    async def _foreman_hosts(self, fqdn: str) -> list[dict[str, Any]]:
        found = await self._foreman("hosts", "index", {"per_page": 2 << 31, "search": f'name="{fqdn}"', "thin": True})
        return [r for r in found["results"] if r.get("name") == fqdn]

    async def foreman_register(self, host: FloorHost) -> None:
        assert self.foreman is not None
        if self.foreman_ids is None:
            org = await self._foreman_find("organizations", "name", self.s.organization)
            loc = await self._foreman_find("locations", "title", self.s.location)
            env = None
            if "environments" in self.foreman.resources:
                env = (await self._foreman_find("environments", "name", self.s.puppet_environment))["id"]
            self.foreman_ids = {"organization_id": org["id"], "location_id": loc["id"], "environment_id": env}
        ids = self.foreman_ids
        hostgroup = (await self._foreman_find("hostgroups", "title", self.s.hostgroup))["id"]
        scope = {"environment_id": ids["environment_id"]} if ids["environment_id"] else {}
        class_ids = [(await self._foreman_find("puppetclasses", "name", name, **scope))["id"]
                     for name in self.s.puppet_classes]
        assert not await self._foreman_hosts(host.fqdn)
        attrs: dict[str, Any] = {
            "name": host.fqdn, "organization_id": ids["organization_id"], "location_id": ids["location_id"],
            "hostgroup_id": hostgroup, "managed": False, "build": False,
            "comment": f"{OWNER_FIELD}={host.host_id}",
            "host_parameters_attributes": [{"name": k, "value": v, "parameter_type": "string"}
                                           for k, v in self.s.parameters.items()],
            "ip": host.address,
        }
        if ids["environment_id"]:
            attrs["environment_id"] = str(ids["environment_id"])
        created = await self._foreman("hosts", "create", {"organization_id": ids["organization_id"],
                                                          "location_id": ids["location_id"], "host": attrs})
        host.foreman_id = created["id"]
        have = await self._foreman("host_classes", "index", {"host_id": host.foreman_id})
        have_ids = list(have["results"] if isinstance(have, dict) else have or [])
        for class_id in class_ids:
            if class_id not in have_ids:
                await self._foreman("host_classes", "create", {"host_id": host.foreman_id, "puppetclass_id": class_id})

    async def foreman_deregister(self, host: FloorHost) -> None:
        for found in await self._foreman_hosts(host.fqdn):
            await self._foreman("hosts", "destroy", {"id": found["id"]})
        assert not await self._foreman_hosts(host.fqdn)
        try:
            await self._foreman("hosts", "show", {"id": host.foreman_id})
        except Exception as exc:  # noqa: BLE001 - apypie wraps the requests error
            cause = exc.__cause__
            if not (isinstance(cause, requests.HTTPError) and cause.response is not None
                    and cause.response.status_code == 404):
                raise
        else:
            raise AssertionError(f"{host.fqdn} is still readable in Foreman")

    # -- Satellite (xmlrpc.client, a fresh connection per call) -----------------------------

    def _xmlrpc(self, method: str, *args: Any) -> Any:
        transport = xmlrpc.client.Transport()
        with xmlrpc.client.ServerProxy(self.s.satellite_url, transport=transport) as proxy:
            return getattr(proxy, method)(*args)

    async def _sat(self, method: str, *args: Any) -> Any:
        return await self.run(self._xmlrpc, method, self.satellite_key, *args)

    async def satellite_register(self, host: FloorHost) -> None:
        group = int((await self._sat("systemgroup.getDetails", self.s.system_group))["id"])
        await self._sat("activationkey.getDetails", self.s.activation_key)
        assert not await self._sat("system.getId", host.fqdn)
        sid = host.satellite_id = int(await self._sat("system.createSystemProfile", host.fqdn, {"hostname": host.fqdn}))
        marker = f"{OWNER_FIELD}={host.host_id}"
        details = await self._sat("system.getDetails", sid)
        if details.get("description") != marker:
            await self._sat("system.setDetails", sid, {"description": marker})
        subscribed = {int(g["id"]) for g in await self._sat("system.listGroups", sid) if g.get("subscribed")}
        if group not in subscribed:
            await self._sat("system.setGroupMembership", sid, group, True)

    async def satellite_deregister(self, host: FloorHost) -> None:
        for system in await self._sat("system.getId", host.fqdn):
            await self._sat("system.getDetails", int(system["id"]))
            await self._sat("system.deleteSystem", int(system["id"]))
        assert not await self._sat("system.getId", host.fqdn)

    # -- whole hosts -------------------------------------------------------------------------

    async def bring_up(self, hosts: list[FloorHost]) -> float:
        """All hosts to "registered everywhere"; returns the seconds until the last one was."""
        limit = asyncio.Semaphore(self.concurrency)
        started = time.time()
        for host in hosts:
            host.timings["requested"] = started

        async def one(host: FloorHost) -> None:
            async with limit:
                host.timings["started"] = time.time()
                await self.provision(host)
                host.timings["provisioned"] = time.time()
                await self.foreman_register(host)
                host.timings["foreman registered"] = time.time()
                await self.satellite_register(host)
                host.timings["ready"] = time.time()

        await asyncio.gather(*(one(h) for h in hosts))
        return max(h.timings["ready"] for h in hosts) - started

    async def tear_down(self, hosts: list[FloorHost]) -> float:
        limit = asyncio.Semaphore(self.concurrency)
        started = time.time()
        for host in hosts:
            host.timings["retire requested"] = started

        async def one(host: FloorHost) -> None:
            async with limit:
                host.timings["retiring"] = time.time()
                await self.foreman_deregister(host)
                host.timings["foreman deregistered"] = time.time()
                await self.satellite_deregister(host)
                host.timings["deregistered"] = time.time()
                await self.deprovision(host)
                host.timings["gone"] = time.time()

        await asyncio.gather(*(one(h) for h in hosts))
        return max(h.timings["gone"] for h in hosts) - started
