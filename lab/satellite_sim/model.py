"""The simulated server's state: organisations, users, sessions, systems, groups, activation keys.

Everything lives in memory behind one lock; the HTTP server handles requests in threads and the
asynchronous deletion of ``system.deleteSystems`` runs on a timer thread.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .faults import INVALID_SESSION_EXCEPTION, LOOKUP_EXCEPTION, JavaException

#: ``BaseHandler.KEY_REGEX``: only a string of this form is treated as a session key.
SESSION_KEY = re.compile(r"^[1-9][0-9]*x[a-f0-9]{64}$")

#: Real installs number systems from here; the value fits an XML-RPC i4.
FIRST_SYSTEM_ID = 1000010000

DEFAULT_SEED = Path(__file__).with_name("seed.json")

#: The servers the simulator can play: current Uyuni (SUSE Manager), or Spacewalk / Red Hat
#: Satellite 5, whose API has no ``system.createSystemProfile`` (no empty profiles: a system
#: profile exists once the machine registers itself).
FLAVORS = ("uyuni", "spacewalk")

#: Seconds between runs of Taskomatic's ``session-cleanup-default`` schedule ("0 0/15 * * * ?",
#: rhnTaskoSchedule.sql): the only thing that ends a session besides ``auth.logout``.
SESSION_PURGE_INTERVAL = 900.0


def now() -> dt.datetime:
    """Server time (UTC, whole seconds), as stored for check-ins and creation dates."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)


@dataclass
class Org:
    """An organisation; activation keys carry its id as prefix."""

    id: int
    name: str


#: ``rhnUserGroupType`` (label, name): the roles a user may hold; ``PermissionCheckFailureException``
#: names the role by its name.
ROLES: dict[str, str] = {
    "satellite_admin": "Satellite Administrator",
    "org_admin": "Organization Administrator",
    "channel_admin": "Channel Administrator",
    "config_admin": "Configuration Administrator",
    "system_group_admin": "System Group Administrator",
    "activation_key_admin": "Activation Key Administrator",
}


@dataclass
class User:
    """An API user. ``org_admin`` implies every other role (``UserImpl.hasRole``, implied roles)."""

    login: str
    password: str
    org_id: int
    roles: set[str] = field(default_factory=set)

    def has_role(self, role: str) -> bool:
        """Whether the user holds ``role`` (org admins hold them all)."""
        return "org_admin" in self.roles or role in self.roles


@dataclass
class Session:
    """A web session; ``expires`` is seconds since the epoch.

    Nothing checks ``expires`` at lookup (``SessionManager.lookupByKey`` does not); a session ends
    when :meth:`State.purge_sessions` (``SessionCleanup``) deletes it."""

    id: int
    login: str
    expires: float


@dataclass
class System:
    """A system profile (here always an "empty profile" as ``system.createSystemProfile`` makes)."""

    id: int
    name: str
    org_id: int
    hostname: str | None
    hw_address: str | None
    created: dt.datetime
    last_checkin: dt.datetime
    last_boot: dt.datetime
    description: str | None = None
    base_entitlement: str = "bootstrap_entitled"
    address1: str = ""
    address2: str = ""
    city: str = ""
    state: str = ""
    country: str = ""
    building: str = ""
    room: str = ""
    rack: str = ""
    auto_update: bool = False
    activation_keys: list[str] = field(default_factory=list)
    #: False for an "empty profile" (``createSystemProfile``, bootstrap entitlement) that no machine
    #: has registered into yet
    registered: bool = False


@dataclass
class Group:
    """A managed server group ("system group")."""

    id: int
    name: str
    description: str
    org_id: int
    members: set[int] = field(default_factory=set)
    #: logins of the users who administer the group (``rhnUserServerGroupPerms``); org admins
    #: see every group of their org without being listed
    admins: set[str] = field(default_factory=set)


@dataclass
class ActivationKey:
    """An activation key; ``key`` already carries the org prefix."""

    key: str
    description: str
    org_id: int
    base_channel_label: str = ""
    usage_limit: int = 0
    entitlements: list[str] = field(default_factory=list)
    server_group_ids: list[int] = field(default_factory=list)
    universal_default: bool = False
    disabled: bool = False


class State:
    """All data of one simulated server, guarded by :attr:`lock`."""

    def __init__(
        self, *, session_lifetime: float = 3600.0, delete_delay: float = 1.0,
        session_purge_interval: float = SESSION_PURGE_INTERVAL, flavor: str = "uyuni",
    ) -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}, not {flavor!r}")
        self.flavor = flavor
        self.lock = threading.RLock()
        self.session_lifetime = session_lifetime
        self.session_purge_interval = session_purge_interval
        self.delete_delay = delete_delay
        self.orgs: dict[int, Org] = {}
        self.users: dict[str, User] = {}
        self.sessions: dict[int, Session] = {}
        self.systems: dict[int, System] = {}
        self.groups: dict[int, Group] = {}
        self.keys: dict[str, ActivationKey] = {}
        self._secret = secrets.token_bytes(32)
        # Real session ids are large sequence numbers; never starting at 1 keeps clients honest.
        self._next_session = 7_000_000 + secrets.randbelow(1_000_000)
        self._next_system = FIRST_SYSTEM_ID
        self._next_group = 1001
        self._timers: list[threading.Timer] = []

    # -- loading -------------------------------------------------------------------------

    def load_seed(self, data: dict[str, Any]) -> None:
        """Fill the state from a seed document (see ``seed.json``)."""
        with self.lock:
            for org in data.get("orgs", []):
                self.orgs[int(org["id"])] = Org(int(org["id"]), str(org["name"]))
            for user in data.get("users", []):
                self.users[user["login"]] = User(
                    user["login"], str(user.get("password", secrets.token_urlsafe(16))),
                    int(user["org_id"]), set(user.get("roles", [])),
                )
            for group in data.get("system_groups", []):
                added = self.add_group(str(group["name"]), str(group.get("description", "")), int(group["org_id"]))
                added.admins.update(str(login) for login in group.get("admins", []))
            for key in data.get("activation_keys", []):
                org_id = int(key["org_id"])
                gids = [g.id for name in key.get("system_groups", []) if (g := self.group_by_name(name, org_id))]
                self.keys[key["key"]] = ActivationKey(
                    key=str(key["key"]), description=str(key.get("description", "")), org_id=org_id,
                    base_channel_label=str(key.get("base_channel_label", "")),
                    usage_limit=int(key.get("usage_limit", 0)),
                    entitlements=list(key.get("entitlements", [])), server_group_ids=gids,
                    universal_default=bool(key.get("universal_default", False)),
                )
            for system in data.get("systems", []):
                created = self.add_system(
                    str(system["name"]), int(system["org_id"]), system.get("hostname"), system.get("hw_address")
                )
                created.description = system.get("description")

    def set_login(self, login: str, password: str, org_id: int = 1) -> None:
        """Make ``login`` an org admin with ``password`` (the ``--username/--password`` options)."""
        with self.lock:
            user = self.users.get(login)
            if user is None:
                self.users[login] = User(login, password, org_id, {"org_admin"})
            else:
                user.password = password

    # -- sessions ------------------------------------------------------------------------

    def _key_hash(self, session_id: int) -> str:
        return hmac.new(self._secret, str(session_id).encode(), hashlib.sha256).hexdigest()

    def create_session(self, login: str, duration: float | None) -> str:
        """A new session for ``login``; returns the key ``<id>x<64 hex>``."""
        with self.lock:
            sid = self._next_session
            self._next_session += 1
            lifetime = self.session_lifetime if duration is None else float(duration)
            self.sessions[sid] = Session(sid, login, time.time() + lifetime)
            return f"{sid}x{self._key_hash(sid)}"

    def lookup_session(self, key: str) -> Session:
        """``SessionManager.lookupByKey``: unknown (or expired, hence purged) id, then wrong hash."""
        with self.lock:
            id_part = key.split("x", 1)[0]
            if not id_part.isdigit():
                raise JavaException(
                    INVALID_SESSION_EXCEPTION,
                    f"Session id: {id_part} is not valid. Session ids must be numeric.",
                )
            sid = int(id_part)
            # No look at ``expires``: an expired session works until the cleanup task removes it.
            session = self.sessions.get(sid)
            if session is None:
                raise JavaException(LOOKUP_EXCEPTION, f"Could not find session with id: {sid}")
            if not hmac.compare_digest(key, f"{sid}x{self._key_hash(sid)}"):
                raise JavaException(INVALID_SESSION_EXCEPTION, f"Session id: {sid} is not valid.")
            return session

    def purge_sessions(self) -> int:
        """``SessionCleanup.execute``: delete the sessions that expired more than two session
        lifetimes ago (``bound = now - 2 * web.session_database_lifetime``); returns how many."""
        with self.lock:
            bound = time.time() - 2 * self.session_lifetime
            stale = [sid for sid, session in self.sessions.items() if session.expires < bound]
            for sid in stale:
                del self.sessions[sid]
            return len(stale)

    def extend_session(self, session: Session) -> None:
        """``SessionManager.extendSessionLifetime``, run after every call made with a session."""
        with self.lock:
            if session.id in self.sessions:
                session.expires = time.time() + self.session_lifetime

    def remove_session(self, session: Session) -> None:
        """Log the session out."""
        with self.lock:
            self.sessions.pop(session.id, None)

    # -- systems -------------------------------------------------------------------------

    def add_system(self, name: str, org_id: int, hostname: str | None, hw_address: str | None) -> System:
        """Create a system profile with the next id."""
        with self.lock:
            sid = self._next_system
            self._next_system += 1
            stamp = now()
            system = System(sid, name, org_id, hostname, hw_address, stamp, stamp, stamp)
            self.systems[sid] = system
            return system

    def empty_profiles(self, hostname: str | None, hw_address: str | None) -> list[System]:
        """``SystemManager.findMatchingEmptyProfiles``: the empty (never registered) profiles with this
        hostname, else with this MAC address; a registered system of that hostname never matches."""
        with self.lock:
            empty = [s for s in self.systems.values() if not s.registered]
            found: list[System] = []
            if hostname is not None:
                found = [s for s in empty if s.hostname == hostname]
            if not found and hw_address is not None:
                found = [s for s in empty if (s.hw_address or "").lower() == hw_address.lower()]
            return sorted(found, key=lambda s: s.id)

    def register_machine(
        self, hostname: str, *, org_id: int = 1, name: str | None = None, activation_key: str | None = None,
    ) -> System:
        """What a machine registering itself does (the lab's stand-in for rhnreg_ks / a Salt minion's
        bootstrap), not an API call. Uyuni: the machine takes over the oldest empty profile of its
        hostname (keeping its id), else gets a new system; Spacewalk has no empty profiles, so always a
        new one. The activation key's groups are joined. Returns the system."""
        with self.lock:
            key = self.keys.get(activation_key) if activation_key else None
            if activation_key and (key is None or key.org_id != org_id):
                raise ValueError(f"no activation key {activation_key!r} in org {org_id}")
            empty = self.empty_profiles(hostname, None) if self.flavor == "uyuni" else []
            empty = [s for s in empty if s.org_id == org_id]
            system = empty[0] if empty else self.add_system(name or hostname, org_id, hostname, None)
            system.name = name or system.name
            system.registered = True
            system.base_entitlement = "salt_entitled" if self.flavor == "uyuni" else "enterprise_entitled"
            system.last_checkin = system.last_boot = now()
            if key is not None:
                system.activation_keys.append(key.key)
                for gid in key.server_group_ids:
                    if gid in self.groups:
                        self.groups[gid].members.add(system.id)
            return system

    def delete_system(self, sid: int) -> None:
        """Remove a system and every reference to it."""
        with self.lock:
            self.systems.pop(sid, None)
            for group in self.groups.values():
                group.members.discard(sid)

    def delete_later(self, sids: list[int]) -> None:
        """Queue ``sids`` for deletion after :attr:`delete_delay` (``SsmDeleteServersEvent``)."""

        def run() -> None:
            with self.lock:
                for sid in sids:
                    self.delete_system(sid)

        if self.delete_delay <= 0:
            run()
            return
        timer = threading.Timer(self.delete_delay, run)
        timer.daemon = True
        with self.lock:
            self._timers = [t for t in self._timers if t.is_alive()]
            self._timers.append(timer)
        timer.start()

    def cancel_timers(self) -> None:
        """Stop pending asynchronous work (at shutdown)."""
        with self.lock:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()

    # -- groups --------------------------------------------------------------------------

    def add_group(self, name: str, description: str, org_id: int) -> Group:
        """Create a managed server group with the next id."""
        with self.lock:
            group = Group(self._next_group, name, description, org_id)
            self._next_group += 1
            self.groups[group.id] = group
            return group

    # -- what a user may see ----------------------------------------------------------------

    def can_access_group(self, user: User, group: Group) -> bool:
        """``ServerGroupManager.canAccess``: same org, and an org admin or one of the group's admins
        (``SystemGroup_queries.is_visible``)."""
        return group.org_id == user.org_id and (user.has_role("org_admin") or user.login in group.admins)

    def can_see_system(self, user: User, system: System) -> bool:
        """``rhnUserServerPerms`` (view ``rhnUserServerPermsDupes``): an org admin sees every system of
        the org, any other user only the members of groups it administers. A profile in no group is
        seen by org admins alone."""
        if system.org_id != user.org_id:
            return False
        if user.has_role("org_admin"):
            return True
        return any(
            system.id in g.members and user.login in g.admins for g in self.groups.values() if g.org_id == user.org_id
        )

    def group_by_name(self, name: str, org_id: int) -> Group | None:
        """The org's group called ``name``, if any."""
        with self.lock:
            for group in self.groups.values():
                if group.name == name and group.org_id == org_id:
                    return group
            return None


def read_seed(path: str | Path | None) -> dict[str, Any]:
    """Parse a seed file (default: the lab's ``seed.json``)."""
    with open(path or DEFAULT_SEED, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data
