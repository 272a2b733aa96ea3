"""The simulated API methods: ``auth``, ``system``, ``systemgroup`` and ``activationkey``.

Each function mirrors one Java handler method (same name, same parameters, same checks in the
same order) and runs with the state lock held. Return values are plain XML-RPC data in the
shapes of the real serializers (``SystemOverviewSerializer``, ``ServerSerializer``,
``ManagedServerGroupSerializer``, ``ActivationKeySerializer``).
"""

from __future__ import annotations

import re
import secrets
import xmlrpc.client
from typing import Any

from . import faults
from .dispatch import api, java_class
from .faults import ApiFault, JavaException
from .model import ROLES, ActivationKey, Group, State, System, User

#: Add-on entitlements an activation key may carry.
ADDON_ENTITLEMENTS = frozenset(
    {
        "virtualization_host",
        "container_build_host",
        "osimage_build_host",
        "monitoring_entitled",
        "ansible_control_node",
        "peripheral_server",
    }
)

#: Keys ``system.setDetails`` accepts (anything else is ``InvalidArgsException``).
DETAIL_KEYS = (
    "profile_name", "base_entitlement", "auto_errata_update", "address1", "address2", "city",
    "state", "country", "building", "room", "rack", "description", "contact_method",
)
_LOCATION_KEYS = ("address1", "address2", "city", "state", "building", "room", "rack")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")


def _date(value: Any) -> xmlrpc.client.DateTime:
    return xmlrpc.client.DateTime(value)


def _cast(value: Any, kind: type, java: str) -> Any:
    """A Java cast of a struct member or array element: wrong type is a ClassCastException."""
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise JavaException("java.lang.ClassCastException", f"{java_class(value)} cannot be cast to {java}")


# -- serializers ---------------------------------------------------------------------------


def overview(system: System) -> dict[str, Any]:
    """``SystemOverviewSerializer``."""
    return {
        "id": system.id,
        "name": system.name,
        "last_checkin": _date(system.last_checkin),
        "created": _date(system.created),
        "last_boot": _date(system.last_boot),
        "extra_pkg_count": 0,
    }


def short_info(system: System) -> dict[str, Any]:
    """``ShortSystemInfoSerializer``: what current Uyuni's ``system.listSystems`` returns
    (``SystemManager.systemListShort``), without ``extra_pkg_count``."""
    return {
        "id": system.id,
        "name": system.name,
        "last_checkin": _date(system.last_checkin),
        "created": _date(system.created),
        "last_boot": _date(system.last_boot),
    }


def server_details(system: System) -> dict[str, Any]:
    """``ServerSerializer``; null members are left out, as the real serializer does."""
    out: dict[str, Any] = {
        "id": system.id,
        "profile_name": system.name,
        "base_entitlement": system.base_entitlement,
        "addon_entitlements": [],
        "auto_update": system.auto_update,
        "release": "(unknown)",
        "address1": system.address1,
        "address2": system.address2,
        "city": system.city,
        "state": system.state,
        "country": system.country,
        "building": system.building,
        "room": system.room,
        "rack": system.rack,
        "last_boot": _date(system.last_boot),
        "osa_status": "unknown",
        "lock_status": False,
        "contact_method": "default",
    }
    # ServerSerializer: helper.add("description", StringUtils.defaultString(server.getDescription()))
    out["description"] = system.description or ""
    if system.hostname is not None:
        out["hostname"] = system.hostname
    return out


def group_details(group: Group) -> dict[str, Any]:
    """``ManagedServerGroupSerializer``."""
    return {
        "id": group.id,
        "name": group.name,
        "description": group.description,
        "org_id": group.org_id,
        "system_count": len(group.members),
    }


def key_details(key: ActivationKey) -> dict[str, Any]:
    """``ActivationKeySerializer``."""
    return {
        "key": key.key,
        "description": key.description,
        "usage_limit": key.usage_limit,
        "base_channel_label": key.base_channel_label or "none",
        "child_channel_labels": [],
        "entitlements": list(key.entitlements),
        "server_group_ids": list(key.server_group_ids),
        "package_names": [],
        "packages": [],
        "universal_default": key.universal_default,
        "disabled": key.disabled,
        "contact_method": "default",
    }


# -- lookups -------------------------------------------------------------------------------


def _systems_of(state: State, user: User) -> list[System]:
    """The systems ``user`` may see (``rhnUserServerPerms``), by name then id."""
    return sorted((s for s in state.systems.values() if state.can_see_system(user, s)), key=lambda s: (s.name, s.id))


def lookup_server(state: State, user: User, sid: int) -> System:
    """``XmlRpcSystemHelper.lookupServer``: -208 naming the id."""
    system = state.systems.get(sid)
    if system is None or not state.can_see_system(user, system):
        raise faults.no_such_system(sid)
    return system


def _lookup_server_plain(state: State, user: User, sid: int) -> System:
    """``SystemManager.lookupByIdAndUser`` behind getDetails/setDetails: -208 without the id."""
    system = state.systems.get(sid)
    if system is None or not state.can_see_system(user, system):
        raise faults.no_such_system()
    return system


def lookup_group(state: State, user: User, identifier: str | int) -> Group:
    """``ServerGroupManager.lookup`` by name or id: a plain LookupException when missing."""
    if isinstance(identifier, int):
        group = state.groups.get(identifier)
        if group is not None and group.org_id != user.org_id:
            group = None
    else:
        group = state.group_by_name(identifier, user.org_id)
    # validateAccessCredentials: a group the user may not access is "not found" alike
    if group is None or not state.can_access_group(user, group):
        raise faults.server_group_lookup(identifier)
    return group


def lookup_key(state: State, user: User, key: str) -> ActivationKey:
    """``ActivationKeyHandler.lookupKey`` (``XmlRpcActivationKeysHelper.lookupKey``): -212 naming the key."""
    found = state.keys.get(key)
    if found is None or not _may_administer_keys(user, found):
        raise faults.activation_key_not_found(key)
    return found


def _may_administer_keys(user: User, key: ActivationKey) -> bool:
    """``ActivationKeyManager.canAdministerKeys``: same org and the activation_key_admin role."""
    return key.org_id == user.org_id and user.has_role("activation_key_admin")


def _ensure_role(user: User, role: str) -> None:
    """``BaseHandler.ensureUserRole``: -23 naming the missing role."""
    if not user.has_role(role):
        raise faults.permission_denied(ROLES[role])


def _ensure_group_admin(user: User) -> None:
    """``BaseHandler.ensureSystemGroupAdmin``."""
    _ensure_role(user, "system_group_admin")


# -- auth ----------------------------------------------------------------------------------


def _login(state: State, username: str, password: str, duration: int | None) -> str:
    user = state.users.get(username)
    if user is None or not secrets.compare_digest(user.password.encode(), password.encode()):
        raise ApiFault(faults.LOGIN_FAILED, "Either the password or username is incorrect.")
    return state.create_session(user.login, duration)


@api("auth", "login", "string", "string")
def auth_login(state: State, username: str, password: str) -> str:
    """Log in; returns the session key."""
    return _login(state, username, password, None)


@api("auth", "login", "string", "string", "int")
def auth_login_duration(state: State, username: str, password: str, duration: int) -> str:
    """Log in for ``duration`` seconds; returns the session key."""
    return _login(state, username, password, duration)


@api("auth", "logout", "string")
def auth_logout(state: State, session_key: str) -> int:
    """Log out; the lookup runs inside the handler, so its failure is an "unhandled" fault."""
    session = state.lookup_session(session_key)
    state.remove_session(session)
    return 1


# -- system --------------------------------------------------------------------------------


@api("system", "listSystems", "user")
def system_list_systems(state: State, user: User) -> list[dict[str, Any]]:
    """Every system visible to the user: the short form on current Uyuni (``SystemHandler.listSystems``),
    ``SystemOverview`` on Spacewalk (``systemListShort`` elaborated)."""
    form = short_info if state.flavor == "uyuni" else overview
    return [form(s) for s in _systems_of(state, user)]


@api("system", "listUserSystems", "user")
def system_list_user_systems(state: State, user: User) -> list[dict[str, Any]]:
    """Systems the logged-in user sees, in the same form as ``listSystems``."""
    return system_list_systems(state, user)


@api("system", "listUserSystems", "user", "string")
def system_list_user_systems_of(state: State, user: User, login: str) -> list[dict[str, Any]]:
    """Systems of another user of the org."""
    # XmlRpcUserHelper.lookupTargetUser: another user's list needs org_admin
    return system_list_user_systems(state, _lookup_target_user(state, user, login))


@api("system", "getId", "user", "string")
def system_get_id(state: State, user: User, name: str) -> list[dict[str, Any]]:
    """Systems whose name is exactly ``name`` (an array: names are not unique)."""
    return [overview(s) for s in _systems_of(state, user) if s.name == name]


@api("system", "getName", "user", "int")
def system_get_name(state: State, user: User, sid: int) -> dict[str, Any]:
    """Name and last check-in of a system."""
    system = lookup_server(state, user, sid)
    return {"id": system.id, "name": system.name, "last_checkin": _date(system.last_checkin)}


@api("system", "searchByName", "user", "string")
def system_search_by_name(state: State, user: User, regexp: str) -> list[dict[str, Any]]:
    """Systems whose name contains a match of ``regexp`` (case-insensitive ``find()``)."""
    try:
        pattern = re.compile(regexp, re.IGNORECASE)
    except re.error as exc:
        raise JavaException("java.util.regex.PatternSyntaxException", f"{exc.msg} near index {exc.pos}") from None
    return [overview(s) for s in _systems_of(state, user) if pattern.search(s.name)]


@api("system", "getDetails", "user", "int")
def system_get_details(state: State, user: User, sid: int) -> dict[str, Any]:
    """Full details of a system."""
    return server_details(_lookup_server_plain(state, user, sid))


@api("system", "setDetails", "user", "int", "struct")
def system_set_details(state: State, user: User, sid: int, details: dict[str, Any]) -> int:
    """Change some details; keys are checked before the system is looked up."""
    invalid = [k for k in details if k not in DETAIL_KEYS]
    if invalid:
        raise ApiFault(faults.INVALID_ARGS, f"Invalid arguments: {', '.join(invalid)}")
    system = _lookup_server_plain(state, user, sid)
    if "profile_name" in details:
        name = _cast(details["profile_name"], str, "java.lang.String").strip()
        if len(name) < 2:
            raise ApiFault(faults.PROFILE_NAME_TOO_SHORT, "system profile name is too short")
        if len(name) > 128:
            raise ApiFault(faults.PROFILE_NAME_TOO_LONG, "system profile name is too long")
        system.name = name
    if "description" in details:
        system.description = _cast(details["description"], str, "java.lang.String")
    if "base_entitlement" in details:
        if not user.has_role("org_admin"):
            raise faults.permission_denied()
        ent = _cast(details["base_entitlement"], str, "java.lang.String")
        if ent in ("enterprise_entitled", "salt_entitled", "foreign_entitled", "bootstrap_entitled"):
            system.base_entitlement = ent
    if "auto_errata_update" in details:
        system.auto_update = _cast(details["auto_errata_update"], bool, "java.lang.Boolean")
    for key in _LOCATION_KEYS:
        if key in details:
            setattr(system, key, _cast(details[key], str, "java.lang.String"))
    if "country" in details:
        country = _cast(details["country"], str, "java.lang.String")
        if len(country) != 2 or not country.isalpha() or not country.isupper():
            raise ApiFault(2280, f"The specified country code '{country}' is not valid.")
        system.country = country
    if "contact_method" in details:
        method = _cast(details["contact_method"], str, "java.lang.String")
        if method not in ("default", "ssh-push", "ssh-push-tunnel"):
            raise ApiFault(faults.INVALID_PARAMETER, f"Invalid contact method: {method}")
    return 1


@api("system", "createSystemProfile", "user", "string", "struct", only="uyuni")
def system_create_system_profile(state: State, user: User, name: str, data: dict[str, Any]) -> int:
    """Uyuni only (Spacewalk and Satellite 5 have no such method): create an empty profile for a
    system not registered yet; returns its id.

    ``SystemManager.createSystemProfile`` refuses (1100, ``SystemsExistFaultException``) only when
    empty profiles with that hostname (or MAC) exist (``findMatchingEmptyProfiles``): once a machine
    has registered into a profile, another profile of the same hostname and name is made."""
    hw_address = _cast(data["hwAddress"], str, "java.lang.String") if "hwAddress" in data else None
    hostname = _cast(data["hostname"], str, "java.lang.String") if "hostname" in data else None
    if hw_address is None and hostname is None:
        raise ApiFault(faults.INVALID_PARAMETER, "Can't create system")
    matches = [s.id for s in state.empty_profiles(hostname, hw_address)]
    if matches:
        raise ApiFault(faults.SYSTEMS_EXIST, f"Existing system IDs: [{','.join(str(i) for i in sorted(matches))}]")
    if hw_address is not None and not _MAC.match(hw_address):
        raise ApiFault(faults.INVALID_PARAMETER, "Can't create system")
    return state.add_system(name, user.org_id, hostname, hw_address).id


@api("system", "deleteSystem", "user", "int")
def system_delete_system(state: State, user: User, sid: int) -> int:
    """Delete a system now."""
    system = lookup_server(state, user, sid)
    state.delete_system(system.id)
    return 1


@api("system", "deleteSystems", "user", "array")
def system_delete_systems(state: State, user: User, sids: list[Any]) -> int:
    """Queue systems for deletion; unavailable ids are skipped and reported after queueing the rest."""
    skipped: list[int] = []
    deletion: list[int] = []
    for raw in sids:
        sid = _cast(raw, int, "java.lang.Integer")
        system = state.systems.get(sid)
        if system is not None and state.can_see_system(user, system):
            deletion.append(sid)
        else:
            skipped.append(sid)
    state.delete_later(deletion)
    if skipped:
        listed = "".join(f"\n{sid}" for sid in skipped)
        raise ApiFault(faults.SYSTEMS_NOT_DELETED, f"The following systems were NOT deleted: {listed}")
    return 1


@api("system", "listGroups", "user", "int")
def system_list_groups(state: State, user: User, sid: int) -> list[dict[str, Any]]:
    """Every group the user can see, with whether the system is a member."""
    system = lookup_server(state, user, sid)
    groups = _groups_of(state, user)
    return [
        {
            "id": g.id,
            "subscribed": 1 if system.id in g.members else 0,
            "system_group_name": g.name,
            "sgid": str(g.id),
        }
        for g in groups
    ]


@api("system", "setGroupMembership", "user", "int", "int", "boolean")
def system_set_group_membership(state: State, user: User, sid: int, sgid: int, member: bool) -> int:
    """Add the system to, or remove it from, one group."""
    # SystemHandler.setGroupMembership: ensureSystemGroupAdmin (-23 naming the role), lookupServer
    # (-208), then ServerGroupManager.lookup, whose LookupException (missing group, or one the user
    # does not administer) the handler turns into a plain -23.
    _ensure_group_admin(user)
    system = lookup_server(state, user, sid)
    try:
        group = lookup_group(state, user, sgid)
    except JavaException:
        raise faults.permission_denied() from None
    if member:
        group.members.add(system.id)
    else:
        group.members.discard(system.id)
    return 1


@api("system", "listActivationKeys", "user", "int")
def system_list_activation_keys(state: State, user: User, sid: int) -> list[str]:
    """Keys the system was registered with."""
    return list(lookup_server(state, user, sid).activation_keys)


# -- systemgroup ---------------------------------------------------------------------------


@api("systemgroup", "create", "user", "string", "string")
def systemgroup_create(state: State, user: User, name: str, description: str) -> dict[str, Any]:
    """Create a group; a duplicate name is an unhandled DuplicateObjectException."""
    _ensure_group_admin(user)
    if state.group_by_name(name, user.org_id) is not None:
        org = state.orgs.get(user.org_id)
        raise JavaException(
            faults.DUPLICATE_OBJECT_EXCEPTION,
            "Duplicate server group requested to be created.."
            f"Server Group with name -[{name}] and org - [{org.name if org else user.org_id}] already exists",
        )
    group = state.add_group(name, description, user.org_id)
    if not user.has_role("org_admin"):
        # ServerGroupManager.create: a non-org-admin creator administers the new group
        group.admins.add(user.login)
    return group_details(group)


@api("systemgroup", "delete", "user", "string")
def systemgroup_delete(state: State, user: User, name: str) -> int:
    """Delete a group (and drop it from activation keys)."""
    _ensure_group_admin(user)
    group = lookup_group(state, user, name)
    del state.groups[group.id]
    for key in state.keys.values():
        if group.id in key.server_group_ids:
            key.server_group_ids.remove(group.id)
    return 1


def _group_details_lookup(state: State, user: User, identifier: str | int) -> dict[str, Any]:
    """``ServerGroupHandler.lookup(name|id, user)``: the LookupException becomes 2201."""
    try:
        return group_details(lookup_group(state, user, identifier))
    except JavaException:
        raise faults.lookup_server_group_fault(identifier) from None


@api("systemgroup", "getDetails", "user", "int")
def systemgroup_get_details_by_id(state: State, user: User, group_id: int) -> dict[str, Any]:
    """A group by id."""
    return _group_details_lookup(state, user, group_id)


@api("systemgroup", "getDetails", "user", "string")
def systemgroup_get_details_by_name(state: State, user: User, name: str) -> dict[str, Any]:
    """A group by name."""
    return _group_details_lookup(state, user, name)


@api("systemgroup", "listAllGroups", "user")
def systemgroup_list_all_groups(state: State, user: User) -> list[dict[str, Any]]:
    """Every group of the org."""
    groups = _groups_of(state, user)
    return [group_details(g) for g in groups]


def _groups_of(state: State, user: User) -> list[Group]:
    """The groups ``user`` may access, by name then id."""
    return sorted((g for g in state.groups.values() if state.can_access_group(user, g)), key=lambda g: (g.name, g.id))


def _members(state: State, group: Group) -> list[System]:
    return sorted((state.systems[i] for i in group.members if i in state.systems), key=lambda s: (s.name, s.id))


@api("systemgroup", "listSystems", "user", "string")
def systemgroup_list_systems(state: State, user: User, name: str) -> list[dict[str, Any]]:
    """Members of a group, with full details."""
    return [server_details(s) for s in _members(state, lookup_group(state, user, name))]


@api("systemgroup", "listSystemsMinimal", "user", "string")
def systemgroup_list_systems_minimal(state: State, user: User, name: str) -> list[dict[str, Any]]:
    """Members of a group, as overviews."""
    return [overview(s) for s in _members(state, lookup_group(state, user, name))]


@api("systemgroup", "addOrRemoveSystems", "user", "string", "array", "boolean")
def systemgroup_add_or_remove_systems(state: State, user: User, name: str, sids: list[Any], add: bool) -> int:
    """Add systems to, or remove them from, a group; every id must exist."""
    group = lookup_group(state, user, name)
    systems = [lookup_server(state, user, _cast(raw, int, "java.lang.Integer")) for raw in sids]
    if not user.has_role("system_group_admin"):
        # ServerGroupManager.addServers/removeServers: validateAdminCredentials
        raise faults.no_group_admin_role(user.login)
    for system in systems:
        if add:
            group.members.add(system.id)
        else:
            group.members.discard(system.id)
    return 1


# -- activationkey -------------------------------------------------------------------------


def _create_key(
    state: State, user: User, key: str, description: str, base_channel: str,
    usage_limit: int | None, entitlements: list[Any], universal_default: bool,
) -> str:
    for raw in entitlements:
        if _cast(raw, str, "java.lang.String") not in ADDON_ENTITLEMENTS:
            raise ApiFault(faults.NO_SUCH_ENTITLEMENT, "Invalid entitlement")
    if base_channel:
        # The lab has no software channels, so every label is unknown.
        raise ApiFault(faults.NO_SUCH_CHANNEL, f"No such channel: {base_channel}")
    if not user.has_role("activation_key_admin"):
        # ActivationKeyManager.createNewActivationKey
        raise JavaException(
            faults.ILLEGAL_ARGUMENT_EXCEPTION,
            f"Cannot create activation key with key = {key}. The user = {user.login} does not have requisite "
            "permissions to administer the given key",
        )
    full = f"{user.org_id}-{key or secrets.token_hex(16)}"
    if full in state.keys:
        raise ApiFault(faults.ACTIVATION_KEY_EXISTS, "activation_key_already_exists")
    if universal_default:
        for other in state.keys.values():
            if other.org_id == user.org_id:
                other.universal_default = False
    state.keys[full] = ActivationKey(
        key=full, description=description, org_id=user.org_id, usage_limit=usage_limit or 0,
        entitlements=[str(e) for e in entitlements], universal_default=universal_default,
    )
    return full


@api("activationkey", "create", "user", "string", "string", "string", "int", "array", "boolean")
def activationkey_create_limited(
    state: State, user: User, key: str, description: str, base_channel: str,
    usage_limit: int, entitlements: list[Any], universal_default: bool,
) -> str:
    """Create a key with a usage limit; returns the key with its org prefix."""
    return _create_key(state, user, key, description, base_channel, usage_limit, entitlements, universal_default)


@api("activationkey", "create", "user", "string", "string", "string", "array", "boolean")
def activationkey_create(
    state: State, user: User, key: str, description: str, base_channel: str,
    entitlements: list[Any], universal_default: bool,
) -> str:
    """Create a key with unlimited usage; returns the key with its org prefix."""
    return _create_key(state, user, key, description, base_channel, None, entitlements, universal_default)


@api("activationkey", "getDetails", "user", "string")
def activationkey_get_details(state: State, user: User, key: str) -> dict[str, Any]:
    """One key's details."""
    return key_details(lookup_key(state, user, key))


@api("activationkey", "listActivationKeys", "user")
def activationkey_list_activation_keys(state: State, user: User) -> list[dict[str, Any]]:
    """Every key of the org."""
    # keys failing ActivationKeyManager.validateCredentials are left out
    return [key_details(k) for k in sorted(state.keys.values(), key=lambda k: k.key) if _may_administer_keys(user, k)]


@api("activationkey", "listActivatedSystems", "user", "string")
def activationkey_list_activated_systems(state: State, user: User, key: str) -> list[dict[str, Any]]:
    """Systems registered with the key."""
    found = lookup_key(state, user, key)
    return [
        {"id": s.id, "hostname": s.hostname or "", "last_checkin": _date(s.last_checkin)}
        for s in _systems_of(state, user)
        if found.key in s.activation_keys
    ]


@api("activationkey", "addServerGroups", "user", "string", "array")
def activationkey_add_server_groups(state: State, user: User, key: str, group_ids: list[Any]) -> int:
    """Attach groups (by id) to a key."""
    found = lookup_key(state, user, key)
    groups = [lookup_group(state, user, _cast(raw, int, "java.lang.Integer")) for raw in group_ids]
    for group in groups:
        if group.id not in found.server_group_ids:
            found.server_group_ids.append(group.id)
    return 1


@api("activationkey", "delete", "user", "string")
def activationkey_delete(state: State, user: User, key: str) -> int:
    """Delete a key."""
    found = lookup_key(state, user, key)
    del state.keys[found.key]
    return 1


@api("systemgroup", "addOrRemoveAdmins", "user", "string", "array", "boolean")
def systemgroup_add_or_remove_admins(
    state: State, user: User, name: str, logins: list[Any], add: bool,
) -> int:
    """``ServerGroupHandler.addOrRemoveAdmins``: give users (not org admins) access to a group, or take it."""
    _ensure_group_admin(user)
    names = [_cast(raw, str, "java.lang.String") for raw in logins]
    admins = [n for n in names if (u := state.users.get(n)) is not None and u.has_role("org_admin")]
    if admins:
        # ServerGroupAccessChangeException, text api.systemgroup.accessChangeDenied
        raise ApiFault(
            2202,
            "Changing administrator access is not allowed for Satellite and Organization administrators.  "
            "These users are granted access by default; therefore, the following users should be removed "
            f"from the input: {', '.join(admins)}",
        )
    group = lookup_group(state, user, name)
    # ServerGroupManager.associateOrDissociateAdminsByLoginName
    if not user.has_role("system_group_admin"):
        raise faults.no_group_admin_role(user.login)
    for login in names:
        target = state.users.get(login)
        if target is None or target.org_id != user.org_id:
            raise JavaException(faults.LOOKUP_EXCEPTION, f"Could not find user {login}")
    if add:
        group.admins.update(names)
    else:
        group.admins.difference_update(n for n in names if n != user.login)  # "can't disassociate thyself"
    return 1


# -- user ----------------------------------------------------------------------------------

#: ``UserManager.listRolesAssignableBy`` an org admin, in its order.
ASSIGNABLE_ROLES = ("org_admin", "channel_admin", "config_admin", "system_group_admin", "activation_key_admin")


def _lookup_target_user(state: State, user: User, login: str) -> User:
    """``XmlRpcUserHelper.lookupTargetUser``: oneself always; anyone else of the org only for an org
    admin (-23), an unknown login is -213."""
    if login == user.login:
        return user
    if not user.has_role("org_admin"):
        raise faults.permission_denied()
    target = state.users.get(login)
    if target is None or target.org_id != user.org_id:
        raise ApiFault(faults.NO_SUCH_USER, "No such user")
    return target


@api("user", "create", "user", "string", "string", "string", "string", "string")
def user_create(
    state: State, user: User, login: str, password: str, first_name: str, last_name: str, email: str,
) -> int:
    """``UserHandler.create``: an org admin makes a user of its org, with no role."""
    _ensure_role(user, "org_admin")
    if login in state.users:
        # CreateUserCommand refuses a taken login (validation fault 2800; the exact text is not verified)
        raise ApiFault(2800, f"Login {login} already in use")
    state.users[login] = User(login, password, user.org_id, set())
    return 1


@api("user", "listRoles", "user", "string")
def user_list_roles(state: State, user: User, login: str) -> list[str]:
    """``UserHandler.listRoles``: the labels of the user's permanent roles (implied ones not listed)."""
    target = _lookup_target_user(state, user, login)
    return [label for label in ROLES if label in target.roles]


def _change_role(state: State, user: User, login: str, role: str, add: bool) -> int:
    assignable = list(ASSIGNABLE_ROLES) if user.has_role("org_admin") else []
    if role not in assignable:
        # UserHandler.validateRoleInputs: NoSuchRoleException
        raise ApiFault(
            faults.NO_SUCH_ROLE,
            f"Role with the label [{role}] cannot be assigned/revoked from the user. Possible Roles "
            f"assignable/revokable by this user [{', '.join(assignable)}]",
        )
    target = _lookup_target_user(state, user, login)
    if add:
        target.roles.add(role)
    else:
        target.roles.discard(role)
    return 1


@api("user", "addRole", "user", "string", "string")
def user_add_role(state: State, user: User, login: str, role: str) -> int:
    """``UserHandler.addRole``."""
    return _change_role(state, user, login, role, True)


@api("user", "removeRole", "user", "string", "string")
def user_remove_role(state: State, user: User, login: str, role: str) -> int:
    """``UserHandler.removeRole``."""
    return _change_role(state, user, login, role, False)
