"""The OpenStack provider: nova servers created, found, started and deleted through openstacksdk.

A machine is a nova server named after the host. Ownership is part of the create request itself:
the server metadata ``governord:host-id=<uuid>`` (and, from compute microversion 2.52, the server
tag ``governord:host-id=<uuid>``), so a crash between "create sent" and "recorded" cannot lead to
a second server: ``create_or_find`` always looks for the marker first.

Finding is by metadata, filtered on governord's side: nova's server list cannot filter on
metadata, and a server marked by hand or by an older release may lack the tag. One paginated
``GET /servers/detail`` per lookup is the price; it is scoped to the configured project.

openstacksdk is synchronous; every SDK call runs in a worker thread through
:meth:`~governord.providers.ConfiguredInstance.call_sync`, and waiting (for ACTIVE, for the
delete) is done on the event loop with ``asyncio.sleep`` between short calls.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import openstack.connection
from keystoneauth1 import exceptions as ks_exc
from openstack import exceptions as os_exc
from pydantic import ValidationError

from governord.errors import PermanentError, RetryableError, StepError, http_error
from governord.models import OWNERSHIP_KEY, Machine, MachineSpec, PowerState
from governord.providers import Provider, ProviderConfig

from .config import OpenStackConfig, OpenStackProfile

T = TypeVar("T")

log = logging.getLogger(__name__)

#: server tags carry the marker as one string (nova tags are plain strings of at most 60 characters)
TAG_PREFIX = f"{OWNERSHIP_KEY}="
#: compute microversion from which a server can be created with tags
TAGS_MICROVERSION = (2, 52)
#: the compute API's image and network proxies were removed after this microversion
PROXY_MICROVERSION = "2.35"

#: nova's OS-EXT-STS:power_state codes
_POWER_CODES = {
    1: PowerState.ON,
    3: PowerState.SUSPENDED,  # paused
    4: PowerState.OFF,  # shutdown
    6: PowerState.OFF,  # crashed
    7: PowerState.SUSPENDED,
}
_POWER_STATUS = {
    "ACTIVE": PowerState.ON,
    "SHUTOFF": PowerState.OFF,
    "SUSPENDED": PowerState.SUSPENDED,
    "PAUSED": PowerState.SUSPENDED,
}
#: HTTP answers that go away by themselves
#: besides 5xx, 408 and 429: nova's 409 (instance busy) and 425 (too early) pass too
_ALSO_PASSING = frozenset({409, 425})


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _version_tuple(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def _addresses(server: Any) -> tuple[str, ...]:
    found: list[str] = []
    candidates: list[str] = []
    for value in (getattr(server, "access_ipv4", None), getattr(server, "access_ipv6", None)):
        if value:
            candidates.append(value)
    for entries in (server.addresses or {}).values():
        for entry in entries or ():
            if entry.get("addr"):
                candidates.append(entry["addr"])
    for candidate in candidates:
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            continue
        if address.is_link_local or candidate in found:
            continue
        found.append(candidate)
    # IPv4 first: it is what the registrars and most callers expect as the primary address
    return tuple(sorted(found, key=lambda a: ipaddress.ip_address(a).version))


def _power(server: Any) -> PowerState:
    code = getattr(server, "power_state", None)
    if isinstance(code, int) and code in _POWER_CODES:
        return _POWER_CODES[code]
    return _POWER_STATUS.get(str(server.status or "").upper(), PowerState.UNKNOWN)


def _fault_text(server: Any) -> str:
    fault = server.fault or {}
    message = fault.get("message") or ""
    code = fault.get("code")
    if not message:
        return "no fault recorded"
    return f"{message} (code {code})" if code else message


def _error_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


class OpenStackProvider(Provider):
    """Machines on an OpenStack cloud: nova servers from a flavor and an image."""

    type_name = "openstack"
    Config = OpenStackConfig
    Profile = OpenStackProfile

    def __init__(self, name: str, config: ProviderConfig, *, state_dir: Path | None = None) -> None:
        if not isinstance(config, OpenStackConfig):
            raise TypeError(f"{type(self).__name__} needs an OpenStackConfig, not {type(config).__name__}")
        super().__init__(name, config, state_dir=state_dir)
        self.cfg: OpenStackConfig = config
        self._conn: Any | None = None
        self._microversion: tuple[int, int] | None = None

    # -- connection ------------------------------------------------------------------------

    async def start(self) -> None:
        """Log in to keystone and find nova in the catalogue.

        An unreachable keystone is a RetryableError, bad credentials or no compute endpoint a
        PermanentError; ``ensure_started`` calls this again until it succeeds.
        """
        if self._conn is None:
            self._conn = self._new_connection()
        self._microversion = await self._call("log in", self._login_sync)
        log.info(
            "%s: logged in to %s as %s, compute microversion %s",
            self.name,
            self.cfg.auth_url,
            self.cfg.username,
            ".".join(map(str, self._microversion)),
        )

    async def close(self) -> None:
        """Drop the connection (openstacksdk has no logout: tokens expire on their own)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await self.call_sync(conn.close)
            except Exception as exc:  # noqa: BLE001 - closing is best effort at shutdown
                log.debug("%s: closing the connection failed: %s", self.name, exc)

    def _new_connection(self) -> Any:
        verify: bool | str = self.cfg.verify_tls
        if self.cfg.verify_tls and self.cfg.ca_file is not None:
            verify = str(self.cfg.ca_file)
        kwargs: dict[str, Any] = {}
        if self.cfg.compute_api_version:
            kwargs["compute_api_version"] = self.cfg.compute_api_version
        if self.cfg.region_name:
            kwargs["region_name"] = self.cfg.region_name
        return openstack.connection.Connection(
            auth_url=self.cfg.auth_url,
            username=self.cfg.username,
            password=self.cfg.password.reveal(),
            project_name=self.cfg.project_name,
            user_domain_name=self.cfg.user_domain_name,
            project_domain_name=self.cfg.project_domain_name,
            verify=verify,
            # sockets must give up on their own: a thread cannot be cancelled
            api_timeout=self.cfg.call_timeout,
            app_name="governord",
            **kwargs,
        )

    def _login_sync(self, conn: Any) -> tuple[int, int]:
        # session.get_token, not conn.authorize: the latter flattens keystone's errors into one type
        conn.session.get_token()
        data = conn.compute.get_endpoint_data()
        if data is None:
            raise PermanentError(f"no compute endpoint in the catalogue of {self.cfg.auth_url}", source=self.name)
        server_max = tuple(data.max_microversion or (2, 1))
        if self.cfg.compute_api_version and self.cfg.compute_api_version != "latest":
            return _version_tuple(self.cfg.compute_api_version)
        return (int(server_max[0]), int(server_max[1]))

    def _translate(self, exc: BaseException, what: str) -> StepError:
        """Turn an SDK or keystoneauth exception into governord's split, keeping OpenStack's message."""
        text = str(exc).strip() or type(exc).__name__
        chain = _error_chain(exc)
        if any(isinstance(e, ks_exc.SSLError) for e in chain):
            return PermanentError(
                f"{what}: TLS to {self.cfg.auth_url} failed ({text}); set ca_file, or verify_tls = false",
                source=self.name,
            )
        if any(isinstance(e, (ks_exc.ConnectFailure, ks_exc.ConnectTimeout, ks_exc.RetriableConnectionFailure))
               for e in chain):
            return RetryableError(f"{what}: cannot reach the cloud: {text}", source=self.name)
        if isinstance(exc, ks_exc.HttpError):
            status = int(exc.http_status or 0)
        elif isinstance(exc, os_exc.HttpException):
            status = int(exc.status_code or 0)
        else:
            status = 0
        if status:
            return http_error(status, f"{what}: {text}", source=self.name, also_passing=_ALSO_PASSING)
        if isinstance(exc, (ks_exc.EndpointNotFound, os_exc.EndpointNotFound)):
            return PermanentError(f"{what}: {text}", source=self.name)
        if isinstance(exc, (ks_exc.DiscoveryFailure, ks_exc.UnknownConnectionError)):
            # a discovery that failed for any reason but a refused or timed-out connection
            return PermanentError(f"{what}: {text}", source=self.name)
        if isinstance(exc, (TimeoutError, ConnectionError, OSError)):
            return RetryableError(f"{what}: cannot reach the cloud: {text}", source=self.name)
        return PermanentError(f"{what}: {type(exc).__name__}: {text}", source=self.name)

    async def _call(self, what: str, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(conn, *args)`` in a worker thread; every failure becomes a StepError."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self._new_connection()

        def run() -> T:
            try:
                return func(conn, *args)
            except StepError:
                raise
            except Exception as exc:
                raise self._translate(exc, what) from exc

        run.__name__ = what  # call_sync names the call in its timeout message
        return await self.call_sync(run)

    # -- reading ---------------------------------------------------------------------------

    @staticmethod
    def _host_id(server: Any) -> str | None:
        value = (server.metadata or {}).get(OWNERSHIP_KEY)
        if value:
            return str(value)
        for tag in server.tags or ():
            if tag.startswith(TAG_PREFIX):
                return tag[len(TAG_PREFIX):]
        return None

    def _owned_sync(self, conn: Any, host_id: str | None) -> list[Any]:
        owned = []
        for server in conn.compute.servers(details=True):
            marker = self._host_id(server)
            if marker is None or (host_id is not None and marker != host_id):
                continue
            if str(server.status or "").upper() in {"DELETED", "SOFT_DELETED"}:
                continue
            owned.append(server)
        # the oldest first: after a retried create it is the one to keep
        return sorted(owned, key=lambda s: (s.created_at or "", s.id))

    def _server_sync(self, conn: Any, server_id: str) -> Any | None:
        try:
            return conn.compute.get_server(server_id)
        except os_exc.NotFoundException:
            return None

    async def _find_servers(self, host_id: str | None) -> list[Any]:
        return await self._call("find servers", self._owned_sync, host_id)

    async def _find_one(self, host_id: str) -> Any | None:
        servers = await self._find_servers(host_id)
        if len(servers) > 1:
            log.warning(
                "%s: %d servers carry %s=%s: %s; using %s",
                self.name,
                len(servers),
                OWNERSHIP_KEY,
                host_id,
                [s.id for s in servers],
                servers[0].id,
            )
        return servers[0] if servers else None

    def _machine(self, server: Any) -> Machine:
        flavor = server.flavor
        flavor_name = getattr(flavor, "name", None) or getattr(flavor, "original_name", None)
        image = server.image
        return Machine(
            provider=self.name,
            machine_id=server.id,
            name=server.name,
            host_id=self._host_id(server),
            power=_power(server),
            addresses=_addresses(server),
            details={
                "status": server.status,
                "task_state": getattr(server, "task_state", None),
                "flavor": flavor_name,
                "image_id": getattr(image, "id", None) if image else None,
                "availability_zone": getattr(server, "availability_zone", None),
                "project_id": server.project_id,
            },
        )

    # -- the contract ----------------------------------------------------------------------

    async def find(self, host_id: str) -> Machine | None:
        """The server carrying ``host_id`` in its metadata (or tag), or None."""
        await self.ensure_started()
        server = await self._find_one(host_id)
        return self._machine(server) if server is not None else None

    async def list_owned(self) -> list[Machine]:
        """Every server of the project that carries governord's marker."""
        await self.ensure_started()
        return [self._machine(s) for s in await self._find_servers(None)]

    async def power_state(self, machine_id: str) -> PowerState:
        """The server's power state; a server that does not exist is a PermanentError."""
        await self.ensure_started()
        server = await self._call("power state", self._server_sync, machine_id)
        if server is None:
            raise PermanentError(f"power state: no server {machine_id} in project {self.cfg.project_name}",
                                 source=self.name)
        return _power(server)

    async def create_or_find(self, spec: MachineSpec) -> Machine:
        """Find the server marked with ``spec.host_id`` or create it; make sure it runs."""
        try:
            profile = OpenStackProfile.model_validate(spec.profile)
        except ValidationError as exc:
            raise PermanentError(f"invalid OpenStack profile: {exc}", source=self.name) from None
        await self.ensure_started()
        server = await self._find_one(spec.host_id)
        if server is None:
            server = await self._create(spec, profile)
        server = await self._settle(await self._settle(server), start=True)
        return self._machine(server)

    async def _settle(self, server: Any, *, start: bool = False) -> Any:
        """Wait while nova builds or changes the server (BUILD, or a task under way); with
        ``start``, start a stopped, suspended or paused server first. ERROR is returned as it is:
        :meth:`wait_ready` reports its fault."""
        if start:
            server = await self._start_if_stopped(server)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.ready_timeout
        delay = 0.1
        while str(server.status or "").upper() == "BUILD" or getattr(server, "task_state", None):
            if loop.time() >= deadline:
                raise RetryableError(
                    f"server {server.id} ({server.name}) still {server.status}/{server.task_state} "
                    f"after {self.cfg.ready_timeout}s",
                    source=self.name,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)
            found = await self._call("read server", self._server_sync, server.id)
            if found is None:
                raise RetryableError(f"server {server.id} ({server.name}) vanished while being built", source=self.name)
            server = found
        return server

    async def _start_if_stopped(self, server: Any) -> Any:
        status = str(server.status or "").upper()
        actions: dict[str, Callable[[Any, Any], Any]] = {
            "SHUTOFF": lambda conn, s: conn.compute.start_server(s),
            "SUSPENDED": lambda conn, s: conn.compute.resume_server(s),
            "PAUSED": lambda conn, s: conn.compute.unpause_server(s),
        }
        action = actions.get(status)
        if action is None:
            return server
        log.info("%s: server %s (%s) is %s; starting it", self.name, server.id, server.name, status)
        await self._call(f"start {server.id}", action, server)
        found = await self._call("read server", self._server_sync, server.id)
        if found is None:
            raise RetryableError(f"server {server.id} ({server.name}) vanished while being started", source=self.name)
        return found

    def _resolve_flavor_sync(self, conn: Any, flavor: str) -> str:
        found = conn.compute.find_flavor(flavor, ignore_missing=True)
        if found is None:
            raise PermanentError(f"flavor {flavor!r} not found", source=self.name)
        return str(found.id)

    def _resolve_by_name_sync(self, conn: Any, kind: str, name: str) -> str:
        """The id of the one image or network called ``name``.

        Through glance or neutron when the catalogue has them; else through compute's deprecated
        proxies (``/images``, ``/os-networks``, microversion 2.35), which nova still serves.
        """
        try:
            endpoint = conn.session.get_endpoint(
                service_type=kind, interface="public", region_name=self.cfg.region_name
            )
        except (ks_exc.EndpointNotFound, os_exc.EndpointNotFound):
            endpoint = None
        if endpoint:
            proxy = conn.image if kind == "image" else conn.network
            finder = proxy.find_image if kind == "image" else proxy.find_network
            try:
                found = finder(name, ignore_missing=True)
            except os_exc.DuplicateResource:
                raise PermanentError(f"{kind} name {name!r} is not unique; give its id", source=self.name) from None
            if found is None:
                raise PermanentError(f"{kind} {name!r} not found", source=self.name)
            return str(found.id)
        path, key = ("/images", "images") if kind == "image" else ("/os-networks", "networks")
        response = conn.compute.get(path, microversion=PROXY_MICROVERSION)
        os_exc.raise_from_response(response)
        matches = [item["id"] for item in response.json().get(key, []) if item.get("name", item.get("label")) == name]
        if not matches:
            raise PermanentError(f"{kind} {name!r} not found", source=self.name)
        if len(matches) > 1:
            raise PermanentError(f"{kind} name {name!r} is not unique ({len(matches)} match); give its id",
                                 source=self.name)
        return str(matches[0])

    def _create_sync(self, conn: Any, spec: MachineSpec, profile: OpenStackProfile) -> Any:
        flavor_id = self._resolve_flavor_sync(conn, profile.flavor)
        image_id = profile.image if _is_uuid(profile.image) else self._resolve_by_name_sync(conn, "image", profile.image)
        attrs: dict[str, Any] = {
            "name": spec.hostname,
            "flavor_id": flavor_id,
            "image_id": image_id,
            "metadata": {**profile.metadata, OWNERSHIP_KEY: spec.host_id},
        }
        if profile.network:
            network_id = (
                profile.network if _is_uuid(profile.network)
                else self._resolve_by_name_sync(conn, "network", profile.network)
            )
            port: dict[str, str] = {"uuid": network_id}
            if spec.network.address:
                port["fixed_ip"] = spec.network.address
            attrs["networks"] = [port]
        elif spec.network.address:
            raise PermanentError(
                f"{spec.hostname} is to have the address {spec.network.address}, but the profile names no network",
                source=self.name,
            )
        elif self._microversion is not None and self._microversion >= (2, 37):
            attrs["networks"] = "auto"
        user_data = spec.user_data if spec.user_data is not None else profile.user_data
        if user_data is not None:
            attrs["user_data"] = base64.b64encode(user_data.encode()).decode("ascii")
        if profile.key_name:
            attrs["key_name"] = profile.key_name
        if profile.security_groups:
            attrs["security_groups"] = [{"name": group} for group in profile.security_groups]
        if profile.availability_zone:
            attrs["availability_zone"] = profile.availability_zone
        if self._microversion is not None and self._microversion >= TAGS_MICROVERSION:
            attrs["tags"] = [f"{TAG_PREFIX}{spec.host_id}"]
        return conn.compute.create_server(**attrs)

    async def _create(self, spec: MachineSpec, profile: OpenStackProfile) -> Any:
        what = f"create server {spec.hostname!r}"
        log.info("%s: %s for host %s", self.name, what, spec.host_id)
        try:
            created = await self._call(what, self._create_sync, spec, profile)
        except RetryableError:
            # The request may have reached nova before the failure: the marker tells.
            found = await self._find_one(spec.host_id)
            if found is not None:
                return found
            raise
        server = await self._call("read server", self._server_sync, created.id)
        if server is None:
            raise RetryableError(f"{what}: server {created.id} vanished right after its creation", source=self.name)
        return server

    async def wait_ready(self, machine: Machine, timeout: float) -> Machine:
        """Poll until the server is ACTIVE with an address; ERROR is a PermanentError with nova's fault."""
        await self.ensure_started()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.2
        while True:
            server = await self._call("wait ready", self._server_sync, machine.machine_id)
            if server is None:
                raise RetryableError(f"server {machine.machine_id} ({machine.name}) no longer exists", source=self.name)
            status = str(server.status or "").upper()
            if status == "ERROR":
                raise PermanentError(
                    f"server {server.id} ({server.name}) went to ERROR: {_fault_text(server)}", source=self.name
                )
            current = self._machine(server)
            if status == "ACTIVE" and current.addresses:
                return current
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RetryableError(
                    f"server {server.id} ({server.name}) not ready after {timeout}s: status {server.status}, "
                    f"task {getattr(server, 'task_state', None)}, addresses {list(current.addresses) or 'none'}",
                    source=self.name,
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 5.0)

    def _delete_sync(self, conn: Any, server_id: str) -> None:
        conn.compute.delete_server(server_id, ignore_missing=True)

    async def destroy(self, host_id: str) -> None:
        """Delete every server carrying ``host_id`` and wait until nova answers 404 for each."""
        await self.ensure_started()
        servers = await self._find_servers(host_id)
        for server in servers:
            log.info("%s: delete server %s (%s) of host %s", self.name, server.id, server.name, host_id)
            await self._call(f"delete {server.id}", self._delete_sync, server.id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.call_timeout
        pending = [s.id for s in servers]
        delay = 0.1
        while pending:
            left = []
            for server_id in pending:
                server = await self._call(f"delete {server_id}", self._server_sync, server_id)
                if server is None or str(server.status or "").upper() in {"DELETED", "SOFT_DELETED"}:
                    continue
                if str(server.status or "").upper() == "ERROR" and server.task_state is None:
                    # a delete that failed leaves the server in ERROR; asking again is nova's remedy
                    await self._call(f"delete {server_id}", self._delete_sync, server_id)
                left.append(server_id)
            pending = left
            if not pending:
                break
            if loop.time() >= deadline:
                raise RetryableError(
                    f"destroy: server {', '.join(pending)} with {OWNERSHIP_KEY}={host_id} still exists "
                    f"after {self.cfg.call_timeout}s",
                    source=self.name,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 2.0)
        left_over = await self._find_servers(host_id)
        if left_over:
            raise RetryableError(
                f"destroy: server {', '.join(s.id for s in left_over)} with {OWNERSHIP_KEY}={host_id} still exists",
                source=self.name,
            )


__all__ = ["TAG_PREFIX", "OpenStackConfig", "OpenStackProfile", "OpenStackProvider"]
