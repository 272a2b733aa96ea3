"""The Satellite registrar: one system profile per host, in the system groups its tags name.

Speaks the Spacewalk/Uyuni XML-RPC API (``/rpc/api``) with :mod:`xmlrpc.client`. That client is
synchronous, so every call runs in a thread through :meth:`Registrar.call_sync`. One session key
is kept; when the server says the session is gone (it expires after a period without use) the
registrar logs in again, once, and repeats the call.

A host's profile is named after its FQDN and created with Uyuni's ``system.createSystemProfile``
(an "empty profile" the machine later registers into). Its description carries governord's
ownership marker ``governord:host-id=<uuid>``, which is how a profile governord made is told
from one it merely shares a name with (names are not unique), and how the sweep finds every
profile governord made (``system.listSystems``, then each profile's details). The profile's id is
kept in the host's registration and looked up first, so a profile renamed after the machine
registered into it is found again (Uyuni would make a second one). Spacewalk and Satellite 5 have no
``createSystemProfile``: there the profile appears when the machine registers itself with the
activation key, and registering waits (retryably) until it has.

The API user must be an org admin (``REQUIRED_ROLE``); ``start`` checks.

A read-only call (:data:`READ_ONLY_METHODS`) that fails in transit (no connection, cut, timed
out, unreadable, or 502/503/504) is repeated in its thread, up to ``call_tries`` tries; a call
that creates or changes something never is.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import re
import ssl
import time
import xml.parsers.expat
import xmlrpc.client
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from governord.errors import MissingAtPeer, PermanentError, RetryableError, http_error
from governord.models import OWNERSHIP_KEY, HostView
from governord.providers import backoff_delay, call_budget
from governord.registrars import Registrar, RegistrarConfig, Registration, marker_of
from governord.registrars import TagMapping as BaseTagMapping

from .config import SatelliteConfig, SatelliteTagMapping

log = logging.getLogger(__name__)

#: Fault codes the registrar acts on (see reference/satellite/FAULT_CODES.tsv).
FAULT_UNHANDLED = -1
FAULT_PERMISSION_CHECK = -23
FAULT_NO_SUCH_SYSTEM = -208
FAULT_ACTIVATION_KEY_NOT_FOUND = -212
FAULT_SYSTEMS_EXIST = 1100
FAULT_LOOKUP_SERVER_GROUP = 2201
FAULT_LOGIN = 2950

#: How the server says a session key no longer works (expired and purged, or not its own):
#: ``SessionManager.lookupByKey`` fails outside the handler, so -1 with the Java class and text.
_SESSION_GONE = re.compile(r"Could not find session|InvalidSessionIdException", re.IGNORECASE)
#: ``systemgroup.getDetails``: ``LookupServerGroupException`` (2201), text
#: ``api.systemgroup.lookupServerGroup``; the same words whether the group is missing or hidden.
_GROUP_MISSING = re.compile(r"Unable to locate or access server group", re.IGNORECASE)
#: ``activationkey.getDetails``: ``XmlRpcActivationKeysHelper.lookupKey`` answers -212
#: "Activation Key [<key>] Not Found!" (-212 is also "Invalid entitlement", hence the text).
#: ``BaseHandler.findMethods`` on a server without the method (Spacewalk, Satellite 5).
_NO_CREATE_PROFILE = re.compile(r"Could not find method: createSystemProfile\b")
_KEY_MISSING = re.compile(r"Activation Key \[.*\] Not Found", re.IGNORECASE)

#: The calls that only read: repeated when they fail in transit (every XML-RPC call is a POST, so
#: HTTP cannot tell). Any method not listed here is sent once per step try.
READ_ONLY_METHODS = frozenset({
    "system.getId", "system.getDetails", "system.listSystems", "system.listGroups",
    "systemgroup.getDetails", "activationkey.getDetails", "user.listRoles",
})

#: The role the API user needs. Uyuni shows a system to a user who is not an org admin only through
#: the system groups that user administers (rhnUserServerPerms), and a profile
#: ``system.createSystemProfile`` makes is in no group, so only an org admin can read and change it.
#: An org admin holds system_group_admin and activation_key_admin as well.
REQUIRED_ROLE = "org_admin"
#: Role labels and the names Uyuni shows for them (rhnUserGroupType).
ROLE_NAMES = {
    "org_admin": "Organization Administrator",
    "system_group_admin": "System Group Administrator",
    "activation_key_admin": "Activation Key Administrator",
}
#: what the reverse proxy in front of Satellite (Apache) answers when its back end fails
RETRY_STATUSES = frozenset({502, 503, 504})

#: Seconds deregister waits for a deleted profile to disappear from ``system.getId``.
DELETE_VERIFY_TIMEOUT = 10.0
DELETE_VERIFY_INTERVAL = 0.25


class SatelliteFault(PermanentError):
    """The server answered with an XML-RPC fault; the fault code and string are kept."""

    def __init__(self, method: str, fault: xmlrpc.client.Fault, *, source: str | None = None) -> None:
        self.method = method
        self.code: int = fault.faultCode
        self.fault_string: str = fault.faultString
        super().__init__(f"Satellite {method} failed: fault {fault.faultCode}: {fault.faultString}", source=source)


class _Transport(xmlrpc.client.Transport):
    """Plain-HTTP transport with a socket timeout."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn


class _SafeTransport(xmlrpc.client.SafeTransport):
    """HTTPS transport with a socket timeout and the configured TLS context."""

    def __init__(self, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(context=context)
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPSConnection:
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn


def marker(host_id: str) -> str:
    """The ownership marker written into a profile's description."""
    return f"{OWNERSHIP_KEY}={host_id}"


def marker_owner(description: str | None) -> str | None:
    """The governord host id a description names as owner, if it carries a marker."""
    if not description:
        return None
    match = re.search(re.escape(OWNERSHIP_KEY) + r"=(\S+)", description)
    return match.group(1) if match else None


class SatelliteRegistrar(Registrar):
    """Registers hosts in Satellite 5 / Spacewalk / Uyuni as system profiles in system groups."""

    type_name: ClassVar[str] = "satellite"
    Config: ClassVar[type[RegistrarConfig]] = SatelliteConfig
    TagMapping: ClassVar[type[BaseTagMapping]] = SatelliteTagMapping
    #: the profile and its groups; the activation key (record and classification) registers any
    #: machine with the site's entitlements: operators and the machine only
    application_keys: ClassVar[frozenset[str]] = frozenset({"id", "groups"})

    def __init__(self, name: str, config: RegistrarConfig, *, state_dir: Path | None = None) -> None:
        if not isinstance(config, SatelliteConfig):
            raise TypeError(f"{type(self).__name__} needs a SatelliteConfig, not {type(config).__name__}")
        super().__init__(name, config, state_dir=state_dir)
        self.settings: SatelliteConfig = config
        # call_timeout bounds each try of a call; the thread running the call gets room for all
        self._call_timeout = call_budget(config.call_timeout, config.call_tries, config.call_backoff)
        self._session: str | None = None
        #: the API user's role labels (``user.listRoles``), read at start
        self._roles: frozenset[str] | None = None
        self._login_lock = asyncio.Lock()
        self._tls: ssl.SSLContext | None = None
        if config.url.startswith("https://"):
            self._tls = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
            if not config.verify_tls:
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Log in and check the API user's role (a wrong password or a missing role fails here,
        permanently)."""
        await self._login(None)
        await self._check_roles()

    async def _check_roles(self) -> None:
        """Read the API user's roles; without :data:`REQUIRED_ROLE` nothing would work, and each call
        would fail with a fault that does not say why (a hidden profile reads as "No such system")."""
        roles = frozenset(str(r) for r in await self._api("user.listRoles", self.settings.username))
        self._roles = roles
        if REQUIRED_ROLE not in roles:
            held = ", ".join(sorted(roles)) or "none"
            raise PermanentError(
                f"Satellite API user {self.settings.username!r} lacks the {REQUIRED_ROLE} role "
                f"({ROLE_NAMES[REQUIRED_ROLE]}), which the registrar needs: the profiles it creates are in "
                f"no system group, and Uyuni shows such a profile to org admins only (roles it has: {held})",
                source=self.name,
            )

    async def _lacks(self, role: str) -> bool:
        """Whether the API user lacks ``role`` now (org admins hold every role). Asked when a fault may
        mean a missing role, since roles can be taken away after start; unknown counts as held."""
        try:
            roles = frozenset(str(r) for r in await self._api("user.listRoles", self.settings.username))
        except (SatelliteFault, RetryableError) as exc:
            log.info("%s: cannot read the API user's roles: %s", self.name, exc)
            return False
        self._roles = roles
        return REQUIRED_ROLE not in roles and role not in roles

    async def close(self) -> None:
        """Log out; failures are only logged (the session expires by itself)."""
        key, self._session = self._session, None
        if key is None:
            return
        try:
            await self._raw("auth.logout", key)
        except (xmlrpc.client.Fault, RetryableError, PermanentError) as exc:
            log.info("%s: logout failed (ignored): %s", self.name, exc)

    # -- the contract --------------------------------------------------------------------

    def classify(self, mappings: list[tuple[str, Any]]) -> dict[str, Any]:
        """Groups of all tags (in tag order, once each); the first tag's activation key."""
        groups: list[str] = []
        key: str | None = None
        for _tag, mapping in mappings:
            group = getattr(mapping, "system_group", None)
            if group and group not in groups:
                groups.append(group)
            candidate = getattr(mapping, "activation_key", None)
            if key is None and candidate:
                key = candidate
        return {"groups": groups, "activation_key": key}

    async def register(self, host: HostView, classification: dict[str, Any]) -> dict[str, Any]:
        """Find or create the host's profile, mark it, and put it in exactly the classified groups."""
        groups = [str(g) for g in classification.get("groups", [])]
        key = classification.get("activation_key")
        # Check everything the classification names before changing anything.
        wanted: dict[str, int] = {}
        for group in groups:
            wanted[group] = await self._group_id(group)
        if key:
            await self._check_activation_key(str(key))
        sid = await self._find_or_create(host, str(key) if key else None)
        await self._claim(sid, host)
        await self._reconcile_groups(sid, host, wanted)
        return {"id": sid, "groups": groups, "activation_key": key}

    async def deregister(self, host: HostView) -> None:
        """Delete the host's profiles, then wait until they are gone.

        Names are not unique, so the ownership marker decides, as in :meth:`register`: the profiles
        carrying the host's marker (by name, or the one recorded at registration even if renamed);
        without any, the only unmarked profile of its name. Profiles of the name owned by another
        governord host, or several unmarked ones, are left alone and refused."""
        ids = {int(s["id"]) for s in await self._api("system.getId", host.fqdn)}
        recorded = self._recorded_id(host)
        if recorded is not None:
            ids.add(recorded)
        own: list[int] = []
        unmarked: list[int] = []
        foreign: dict[int, str] = {}
        for sid in sorted(ids):
            details = await self._details(sid)
            if details is None:
                continue
            owner = marker_owner(details.get("description"))
            if owner == host.id:
                own.append(sid)
            elif sid == recorded and details.get("profile_name") != host.fqdn:
                continue  # renamed and no longer marked as the host's: not found by its name, not ours
            elif owner is None:
                unmarked.append(sid)
            else:
                foreign[sid] = owner
        if own:
            doomed = own
        elif foreign:
            sid, owner = next(iter(foreign.items()))
            raise PermanentError(
                f"Satellite system {sid} ({host.fqdn}) belongs to governord host {owner}, not {host.id}; "
                "not deleting it",
                source=self.name,
            )
        elif len(unmarked) > 1:
            raise PermanentError(
                f"Satellite has {len(unmarked)} systems named {host.fqdn!r} (ids {', '.join(map(str, unmarked))}) "
                f"and none carries {marker(host.id)}; not deleting any",
                source=self.name,
            )
        else:
            doomed = unmarked
        for sid in doomed:
            await self._delete(sid)
            log.info("%s: deleted system %s (%s)", self.name, sid, host.fqdn)
        await self._wait_gone(host.fqdn, doomed)

    async def list_owned(self) -> list[Registration]:
        """Every system profile whose description is a governord ownership marker.

        The API cannot search descriptions, so each visible system's details are read (at most
        ``max_concurrency`` at once); a system deleted meanwhile is skipped."""
        systems = await self._api("system.listSystems")

        async def owned(system: dict[str, Any]) -> Registration | None:
            sid = int(system["id"])
            details = await self._details(sid)
            if details is None:
                return None
            host_id = marker_of(details.get("description"))
            if host_id is None:
                return None
            return Registration(self.name, str(sid), str(details.get("profile_name") or system.get("name")), host_id,
                                {"hostname": details.get("hostname")})

        found = await asyncio.gather(*(owned(s) for s in systems))
        return [entry for entry in found if entry is not None]

    async def remove_owned(self, entry: Registration) -> bool:
        """Delete the system with this id if its description still names ``entry.host_id``;
        wait until it reads as gone."""
        sid = int(entry.entry_id)
        details = await self._details(sid)
        if details is None:
            return False
        if marker_of(details.get("description")) != entry.host_id:
            return False
        await self._delete(sid)
        log.info("%s: deleted system %s (%s), orphan of governord host %s", self.name, sid, entry.name, entry.host_id)
        await self._wait_gone(entry.name, [sid])
        return True

    async def lookup(self, host: HostView) -> dict[str, Any] | None:
        """The host's profile (the one carrying its marker, if several share the name), or None."""
        systems = await self._api("system.getId", host.fqdn)
        chosen: tuple[int, dict[str, Any]] | None = None
        for system in systems:
            sid = int(system["id"])
            details = await self._details(sid)
            if details is None:
                continue
            if chosen is None or details.get("description") == marker(host.id):
                chosen = (sid, details)
        if chosen is None:
            return None
        sid, details = chosen
        try:
            groups = await self._api("system.listGroups", sid)
        except SatelliteFault as exc:
            if exc.code == FAULT_NO_SUCH_SYSTEM:
                return None
            raise
        return {
            "id": sid,
            "name": details.get("profile_name"),
            "groups": [g["system_group_name"] for g in groups if g.get("subscribed")],
            "description": details.get("description"),
        }

    async def check_mappings(self, mappings: Mapping[str, Any]) -> dict[tuple[str, str], str]:
        """Each tag's system group exists, and its activation key exists and is enabled."""
        found: dict[tuple[str, str], str] = {}
        for tag, mapping in mappings.items():
            for key, check in (("system_group", self._group_id), ("activation_key", self._check_activation_key)):
                value = getattr(mapping, key)
                if not value:
                    continue
                try:
                    await check(value)
                except MissingAtPeer as exc:
                    found[(tag, key)] = str(exc)
        return found

    async def probe(self) -> bool:
        """One authenticated call (listing every profile's details would be one call per system)."""
        await self.ensure_started()
        await self._api("systemgroup.listAllGroups")
        return True

    # -- steps ---------------------------------------------------------------------------

    async def _group_id(self, name: str) -> int:
        try:
            group = await self._api("systemgroup.getDetails", name)
        except SatelliteFault as exc:
            if exc.code == FAULT_LOOKUP_SERVER_GROUP and _GROUP_MISSING.search(exc.fault_string):
                if await self._lacks(REQUIRED_ROLE):
                    raise MissingAtPeer(
                        f"Satellite system group {name!r} does not exist, or API user "
                        f"{self.settings.username!r} may not see it: without the {REQUIRED_ROLE} role "
                        f"({ROLE_NAMES[REQUIRED_ROLE]}) it sees only the groups it administers "
                        f"({exc.fault_string})",
                        source=self.name,
                    ) from exc
                raise MissingAtPeer(
                    f"Satellite system group {name!r} does not exist ({exc.fault_string})", source=self.name
                ) from exc
            raise
        return int(group["id"])

    async def _check_activation_key(self, key: str) -> None:
        try:
            details = await self._api("activationkey.getDetails", key)
        except SatelliteFault as exc:
            if exc.code == FAULT_ACTIVATION_KEY_NOT_FOUND and _KEY_MISSING.search(exc.fault_string):
                if await self._lacks("activation_key_admin"):
                    # ActivationKeyManager.validateCredentials: the same -212 as for a missing key
                    raise MissingAtPeer(
                        f"Satellite activation key {key!r} is not readable: API user {self.settings.username!r} "
                        f"lacks the activation_key_admin role ({ROLE_NAMES['activation_key_admin']}), and "
                        f"Uyuni answers every key as not found then ({exc.fault_string})",
                        source=self.name,
                    ) from exc
                raise MissingAtPeer(
                    f"Satellite activation key {key!r} does not exist ({exc.fault_string})", source=self.name
                ) from exc
            raise
        if details.get("disabled"):
            raise MissingAtPeer(f"Satellite activation key {key!r} is disabled", source=self.name)

    async def _find_or_create(self, host: HostView, key: str | None) -> int:
        """The host's profile: the one registered before (by id, renamed back if someone renamed it),
        else among the profiles named after the host the one carrying its marker, else the only
        unmarked one, else a new empty profile (Uyuni) or none yet (Spacewalk, Satellite 5)."""
        recorded = await self._recorded_profile(host)
        if recorded is not None:
            return recorded
        systems = await self._api("system.getId", host.fqdn)
        chosen = await self._choose(host, [int(s["id"]) for s in systems]) if systems else None
        if chosen is not None:
            return chosen
        try:
            sid = int(await self._api("system.createSystemProfile", host.fqdn, {"hostname": host.fqdn}))
        except SatelliteFault as exc:
            if exc.code == FAULT_UNHANDLED and _NO_CREATE_PROFILE.search(exc.fault_string):
                raise self._await_registration(host, key) from exc
            if exc.code != FAULT_SYSTEMS_EXIST:
                raise
            return await self._adopt_existing(host, exc)
        log.info("%s: created system profile %s for %s", self.name, sid, host.fqdn)
        return sid

    async def _recorded_profile(self, host: HostView) -> int | None:
        """The profile this registrar recorded for the host, if it still exists and carries the host's
        marker; its name is put back if it was changed. Uyuni makes a second profile when asked for
        one after the machine registered into the first, so a renamed profile is found by id."""
        sid = self._recorded_id(host)
        if sid is None:
            return None
        details = await self._details(sid)
        if details is None:
            return None
        if marker_owner(details.get("description")) != host.id:
            return None
        if details.get("profile_name") != host.fqdn:
            await self._api("system.setDetails", sid, {"profile_name": host.fqdn})
            log.info("%s: renamed own system %s back to %s", self.name, sid, host.fqdn)
        return sid

    def _recorded_id(self, host: HostView) -> int | None:
        """The profile id :meth:`register` returned for the host, as the engine kept it."""
        entry = host.registrations.get(self.name)
        raw = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(raw, bool) or not (isinstance(raw, int) or (isinstance(raw, str) and raw.isdigit())):
            return None
        return int(raw)

    async def _choose(self, host: HostView, ids: list[int]) -> int | None:
        """Among profiles named after the host (names are not unique), the ownership marker decides:
        the host's own (the oldest if several), else the only one without any marker. One owned by
        another governord host is returned for :meth:`_claim` to refuse; None when all are gone."""
        own: list[int] = []
        unmarked: list[int] = []
        foreign: list[int] = []
        for sid in sorted(ids):
            details = await self._details(sid)
            if details is None:
                continue
            owner = marker_owner(details.get("description"))
            (own if owner == host.id else unmarked if owner is None else foreign).append(sid)
        if own:
            if len(own) > 1:
                log.warning("%s: %d profiles named %s carry %s (ids %s); using %s", self.name, len(own), host.fqdn,
                            marker(host.id), ", ".join(map(str, own)), own[0])
            return own[0]
        if len(unmarked) == 1:
            return unmarked[0]
        if unmarked:
            raise PermanentError(
                f"Satellite has {len(unmarked)} systems named {host.fqdn!r} (ids {', '.join(map(str, unmarked))}) "
                f"and none carries {marker(host.id)}; refusing to pick one",
                source=self.name,
            )
        return foreign[0] if foreign else None

    def _await_registration(self, host: HostView, key: str | None) -> RetryableError:
        """Spacewalk and Satellite 5 cannot make a profile for a machine: it appears when the machine
        registers itself (``rhnreg_ks`` with the activation key); until then the step waits."""
        with_key = f" with activation key {key!r}" if key else " (no activation key is classified for it)"
        return RetryableError(
            f"Satellite at {self.settings.url} has no system.createSystemProfile (Spacewalk or Satellite 5): "
            f"no profile named {host.fqdn!r} until the machine registers itself{with_key}",
            source=self.name,
        )

    async def _adopt_existing(self, host: HostView, exc: SatelliteFault) -> int:
        """A profile with the host's hostname exists under another name: take it back only if it is ours."""
        listed = re.search(r"\[([\d,\s]*)\]", exc.fault_string)
        ids = [int(i) for i in re.findall(r"\d+", listed.group(1))] if listed else []
        for sid in ids:
            details = await self._api("system.getDetails", sid)
            if details.get("description") == marker(host.id):
                await self._api("system.setDetails", sid, {"profile_name": host.fqdn})
                log.info("%s: renamed own system %s back to %s", self.name, sid, host.fqdn)
                return sid
        raise PermanentError(
            f"Satellite already has a profile for hostname {host.fqdn!r} under another name "
            f"({exc.fault_string}); it does not carry {marker(host.id)}",
            source=self.name,
        ) from exc

    async def _claim(self, sid: int, host: HostView) -> None:
        details = await self._api("system.getDetails", sid)
        description = details.get("description")
        owner = marker_owner(description)
        if owner is not None and owner != host.id:
            raise PermanentError(
                f"Satellite system {sid} ({host.fqdn}) belongs to governord host {owner}, not {host.id}",
                source=self.name,
            )
        if description != marker(host.id):
            await self._api("system.setDetails", sid, {"description": marker(host.id)})

    async def _reconcile_groups(self, sid: int, host: HostView, wanted: dict[str, int]) -> None:
        current = await self._api("system.listGroups", sid)
        subscribed = {int(g["id"]): str(g["system_group_name"]) for g in current if g.get("subscribed")}
        for name, gid in wanted.items():
            if gid not in subscribed:
                await self._set_membership(sid, gid, name, True)
                log.info("%s: added %s to group %s", self.name, host.fqdn, name)
        keep = set(wanted.values())
        for gid, name in subscribed.items():
            if gid not in keep:
                await self._set_membership(sid, gid, name, False)
                log.info("%s: removed %s from group %s", self.name, host.fqdn, name)

    async def _set_membership(self, sid: int, gid: int, group: str, member: bool) -> None:
        """``system.setGroupMembership``; its permission fault (-23) is made to say what is missing."""
        try:
            await self._api("system.setGroupMembership", sid, gid, member)
        except SatelliteFault as exc:
            if exc.code != FAULT_PERMISSION_CHECK:
                raise
            # SystemHandler.setGroupMembership: -23 naming the role without system_group_admin, a
            # plain -23 when the group is not one the user may administer
            raise PermanentError(
                f"Satellite API user {self.settings.username!r} may not change the membership of system {sid} "
                f"in group {group!r}: that needs the system_group_admin role "
                f"({ROLE_NAMES['system_group_admin']}) and admin access to the group, which the "
                f"{REQUIRED_ROLE} role ({ROLE_NAMES[REQUIRED_ROLE]}) gives to every group ({exc.fault_string})",
                source=self.name,
            ) from exc

    async def _details(self, sid: int) -> dict[str, Any] | None:
        """The profile's details, or None if it no longer exists."""
        try:
            details: dict[str, Any] = await self._api("system.getDetails", sid)
        except SatelliteFault as exc:
            if exc.code == FAULT_NO_SUCH_SYSTEM:
                return None
            raise
        return details

    async def _delete(self, sid: int) -> None:
        """Delete the profile; one already gone needs nothing more."""
        try:
            await self._api("system.deleteSystem", sid)
        except SatelliteFault as exc:
            if exc.code != FAULT_NO_SUCH_SYSTEM:
                raise

    async def _wait_gone(self, fqdn: str, sids: list[int]) -> None:
        """Wait until none of ``sids`` exists any more (deleting may be asynchronous); other profiles of
        the name may stay."""
        deadline = time.monotonic() + DELETE_VERIFY_TIMEOUT
        left = list(sids)
        while left:
            left = [sid for sid in left if await self._details(sid) is not None]
            if not left:
                return
            if time.monotonic() >= deadline:
                ids = ", ".join(map(str, left))
                raise RetryableError(
                    f"Satellite still has {fqdn!r} (ids {ids}) {DELETE_VERIFY_TIMEOUT:.0f}s after deleting it",
                    source=self.name,
                )
            await asyncio.sleep(DELETE_VERIFY_INTERVAL)

    # -- the wire ------------------------------------------------------------------------

    async def _login(self, stale: str | None) -> str:
        """Log in unless another task already replaced the ``stale`` key; returns the current key."""
        async with self._login_lock:
            if self._session is not None and self._session != stale:
                return self._session
            try:
                key = await self._raw(
                    "auth.login", self.settings.username, self.settings.password.reveal()
                )
            except xmlrpc.client.Fault as fault:
                raise SatelliteFault("auth.login", fault, source=self.name) from None
            self._session = str(key)
            log.info("%s: logged in to %s as %s", self.name, self.settings.url, self.settings.username)
            return self._session

    async def _api(self, method: str, *args: Any) -> Any:
        """Call ``method(sessionKey, *args)``; log in again once if the session is gone."""
        key = self._session or await self._login(None)
        try:
            return await self._raw(method, key, *args)
        except xmlrpc.client.Fault as fault:
            if not self._session_gone(fault):
                raise SatelliteFault(method, fault, source=self.name) from None
            log.info("%s: session expired (%s); logging in again", self.name, fault.faultString)
        key = await self._login(key)
        try:
            return await self._raw(method, key, *args)
        except xmlrpc.client.Fault as fault:
            if self._session_gone(fault):
                raise RetryableError(
                    f"Satellite {method}: session lost again right after logging in: {fault.faultString}",
                    source=self.name,
                ) from None
            raise SatelliteFault(method, fault, source=self.name) from None

    @staticmethod
    def _session_gone(fault: xmlrpc.client.Fault) -> bool:
        return fault.faultCode == FAULT_UNHANDLED and bool(_SESSION_GONE.search(fault.faultString))

    async def _raw(self, method: str, *args: Any) -> Any:
        """One XML-RPC call in a thread; faults pass through, transport failures are classified."""
        return await self.call_sync(self._invoke, method, *args)

    def _transport(self) -> xmlrpc.client.Transport:
        timeout = self.settings.call_timeout
        if self._tls is not None:
            return _SafeTransport(timeout, self._tls)
        return _Transport(timeout)

    def _invoke(self, method: str, *args: Any) -> Any:
        """Blocking: runs in a worker thread. A read-only call that failed in transit is tried
        again, up to ``call_tries`` tries in all; any other call once."""
        tries = self.settings.call_tries if method in READ_ONLY_METHODS else 1
        for attempt in range(1, tries + 1):
            try:
                return self._invoke_once(method, *args)
            except RetryableError as exc:
                status = getattr(exc, "http_status", None)
                if attempt >= tries or (status is not None and status not in RETRY_STATUSES):
                    raise
                log.info("%s: %s failed in transit (try %d of %d), repeating: %s", self.name, method, attempt,
                         tries, exc)
                time.sleep(backoff_delay(self.settings.call_backoff, attempt))
        raise AssertionError("unreachable")

    def _invoke_once(self, method: str, *args: Any) -> Any:
        """One call. A fresh connection per call keeps threads apart."""
        url = self.settings.url
        try:
            with xmlrpc.client.ServerProxy(url, transport=self._transport()) as proxy:
                func: Callable[..., Any] = getattr(proxy, method)
                return func(*args)
        except xmlrpc.client.Fault:
            raise
        except xmlrpc.client.ProtocolError as exc:
            message = f"Satellite {method}: HTTP {exc.errcode} {exc.errmsg} from {url}"
            raise http_error(exc.errcode, message, source=self.name) from None
        except ssl.SSLCertVerificationError as exc:
            raise PermanentError(
                f"Satellite {method}: TLS certificate of {url} not trusted: {exc.verify_message}", source=self.name
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise RetryableError(
                f"Satellite {method}: cannot reach {url}: {type(exc).__name__}: {exc}", source=self.name
            ) from None
        except (xmlrpc.client.ResponseError, xml.parsers.expat.ExpatError) as exc:
            raise RetryableError(
                f"Satellite {method}: unreadable response from {url}: {exc}", source=self.name
            ) from None
