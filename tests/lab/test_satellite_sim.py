"""The Satellite simulator, as a real ``xmlrpc.client`` client meets it.

Every expectation here is a fact about the real Spacewalk/Uyuni API (reference/satellite/):
fault codes and fault strings as redstone writes them, session-key format and session faults,
dispatch by name and parameter count, ``system.getId`` returning an array, org-prefixed
activation keys, the asynchronous ``system.deleteSystems``.
"""

from __future__ import annotations

import re
import secrets
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lab.satellite_sim import SatelliteSimulator
from tests.fixtures.satellite import DELETE_DELAY, SatelliteSim, start_satellite_sim

pytestmark = pytest.mark.integration

#: an API proxy (its results are untyped XML-RPC data) and a session key
Api = tuple[Any, str]

KEY_RE = re.compile(r"^[1-9][0-9]*x[a-f0-9]{64}$")
FIRST_SYSTEM_ID = 1000010000
SYSTEM_HANDLER = "com.redhat.rhn.frontend.xmlrpc.system.SystemHandler"
USER_CLASS = "com.redhat.rhn.domain.user.legacy.UserImpl"


@pytest.fixture
def api(satellite_sim: SatelliteSim) -> Iterator[Api]:
    """A logged-in client session; logged out afterwards."""
    proxy, key = satellite_sim.login()
    yield proxy, key
    try:
        proxy.auth.logout(key)
    except xmlrpc.client.Fault:
        pass


def fault_of(call: Callable[..., Any], *args: Any) -> xmlrpc.client.Fault:
    """The fault ``call(*args)`` raises (fails the test if it returns)."""
    with pytest.raises(xmlrpc.client.Fault) as info:
        call(*args)
    return info.value


def new_name() -> str:
    """A system or group name no other test uses."""
    return f"sim-{secrets.token_hex(5)}.lab.example"


def create(proxy: Any, key: str, name: str | None = None) -> tuple[int, str]:
    """Create an empty profile; returns (id, name)."""
    name = name or new_name()
    return proxy.system.createSystemProfile(key, name, {"hostname": name}), name


# -- auth and sessions -------------------------------------------------------------------------


def test_login_returns_session_key_of_the_real_format(satellite_sim: SatelliteSim) -> None:
    proxy = satellite_sim.client()
    key = proxy.auth.login(satellite_sim.username, satellite_sim.password)
    assert KEY_RE.match(key)
    assert proxy.auth.logout(key) == 1


@pytest.mark.parametrize("username,password", [("admin", "wrong"), ("nobody", "whatever")])
def test_bad_login_is_fault_2950(satellite_sim: SatelliteSim, username: str, password: str) -> None:
    fault = fault_of(satellite_sim.client().auth.login, username, password)
    assert fault.faultCode == 2950
    assert fault.faultString == "redstone.xmlrpc.XmlRpcFault: Either the password or username is incorrect."


def test_logged_out_session_is_not_found(satellite_sim: SatelliteSim) -> None:
    proxy, key = satellite_sim.login()
    assert proxy.auth.logout(key) == 1
    fault = fault_of(proxy.system.listSystems, key)
    session_id = key.split("x")[0]
    assert fault.faultCode == -1
    assert fault.faultString == (
        f"com.redhat.rhn.common.hibernate.LookupException: Could not find session with id: {session_id}"
    )


def test_wrong_hash_is_invalid_session(api: Api) -> None:
    proxy, key = api
    session_id, digest = key.split("x")
    forged = f"{session_id}x{'0' * 64 if digest != '0' * 64 else '1' * 64}"
    fault = fault_of(proxy.system.listSystems, forged)
    assert fault.faultCode == -1
    assert fault.faultString == (
        f"com.redhat.rhn.domain.session.InvalidSessionIdException: Session id: {session_id} is not valid."
    )


def test_logout_with_unknown_session_fails_inside_the_handler(satellite_sim: SatelliteSim) -> None:
    fault = fault_of(satellite_sim.client().auth.logout, "12x" + "a" * 64)
    assert fault.faultCode == -1
    assert fault.faultString == (
        "redstone.xmlrpc.XmlRpcFault: unhandled internal exception: Could not find session with id: 12"
    )


def test_string_that_is_not_a_session_key_is_not_treated_as_one(api: Api) -> None:
    proxy, _ = api
    fault = fault_of(proxy.system.listSystems, "not-a-session-key")
    assert fault.faultCode == -1
    assert "Session" not in fault.faultString


def test_sessions_end_when_the_cleanup_deletes_them_unless_used() -> None:
    # SessionCleanup deletes sessions that expired more than two lifetimes ago, on its schedule
    sim = start_satellite_sim(session_lifetime=0.5, session_purge_interval=0.2)
    try:
        proxy = sim.client()
        idle = proxy.auth.login(sim.username, sim.password)
        busy = proxy.auth.login(sim.username, sim.password)
        for _ in range(8):
            time.sleep(0.3)
            proxy.system.listSystems(busy)  # every call extends the session
        fault = fault_of(proxy.system.listSystems, idle)
        assert fault.faultCode == -1
        assert fault.faultString == (
            "com.redhat.rhn.common.hibernate.LookupException: Could not find session with id: " + idle.split("x")[0]
        )
        assert proxy.system.listSystems(busy) == []
        # auth.login's third parameter sets the session's duration
        long_lived = proxy.auth.login(sim.username, sim.password, 30)
        time.sleep(1.8)
        assert proxy.system.listSystems(long_lived) == []
    finally:
        sim.stop()


def test_an_expired_session_works_until_the_cleanup_runs() -> None:
    # SessionManager.lookupByKey never looks at the expiry; only the cleanup (every 15 minutes) does
    sim = start_satellite_sim(session_lifetime=0.3)
    try:
        proxy = sim.client()
        key = proxy.auth.login(sim.username, sim.password)
        time.sleep(1.2)  # expired for three lifetimes, but no cleanup ran
        assert proxy.system.listSystems(key) == []
    finally:
        sim.stop()


# -- dispatch --------------------------------------------------------------------------------


def test_wrong_parameter_count_names_method_class_and_java_types(api: Api) -> None:
    proxy, key = api
    fault = fault_of(proxy.system.getId, key)
    assert fault.faultCode == -1
    assert fault.faultString == (
        f"redstone.xmlrpc.XmlRpcFault: Could not find method: getId in class: {SYSTEM_HANDLER} "
        f"with params: [{USER_CLASS}]"
    )
    fault = fault_of(proxy.system.getId, key, "a", 1)
    assert fault.faultString.endswith(f"with params: [{USER_CLASS}, java.lang.String, java.lang.Integer]")
    fault = fault_of(proxy.system.getId)
    assert fault.faultString.endswith("getId in class: " + SYSTEM_HANDLER + " with params: []")


def test_session_is_checked_before_the_method_is_chosen(satellite_sim: SatelliteSim) -> None:
    fault = fault_of(satellite_sim.client().system.getId, "12x" + "b" * 64, "a", "b", "c")
    assert fault.faultString.startswith("com.redhat.rhn.common.hibernate.LookupException:")


def test_beanified_method_names_work(api: Api) -> None:
    proxy, key = api
    sid, name = create(proxy, key)
    assert [s["id"] for s in proxy.system.get_id(key, name)] == [sid]
    assert sid in [s["id"] for s in proxy.system.list_systems(key)]


def test_unknown_handler_is_a_fault(api: Api) -> None:
    proxy, key = api
    assert fault_of(proxy.nosuchnamespace.listThings, key).faultCode == -1


def test_only_post_to_rpc_api_is_served(satellite_sim: SatelliteSim) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(satellite_sim.url, timeout=5)
    assert info.value.code == 405
    elsewhere = satellite_sim.url.replace("/rpc/api", "/rpc/other")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(elsewhere, data=b"<x/>"), timeout=5)
    assert info.value.code == 404


# -- systems ---------------------------------------------------------------------------------


def test_get_id_returns_an_array_of_system_overviews_exact_match(api: Api) -> None:
    proxy, key = api
    assert proxy.system.getId(key, new_name()) == []
    sid, name = create(proxy, key)
    found = proxy.system.getId(key, name)
    assert isinstance(found, list) and len(found) == 1
    overview = found[0]
    assert overview["id"] == sid and overview["name"] == name
    assert isinstance(overview["last_checkin"], xmlrpc.client.DateTime)
    assert isinstance(overview["created"], xmlrpc.client.DateTime)
    assert overview["extra_pkg_count"] == 0
    # exact, case-sensitive match: no prefix, no substring, no case folding
    assert proxy.system.getId(key, name[:-1]) == []
    assert proxy.system.getId(key, name.upper()) == []


def test_list_systems_is_the_short_form(api: Api) -> None:
    # current Uyuni: SystemManager.systemListShort, ShortSystemInfoSerializer (no extra_pkg_count)
    proxy, key = api
    sid, name = create(proxy, key)
    [entry] = [s for s in proxy.system.listSystems(key) if s["id"] == sid]
    assert set(entry) == {"id", "name", "last_checkin", "created", "last_boot"}
    [mine] = [s for s in proxy.system.listUserSystems(key) if s["id"] == sid]
    assert mine == entry
    assert entry["name"] == name and isinstance(entry["last_boot"], xmlrpc.client.DateTime)


def test_names_are_not_unique_so_get_id_can_return_several(api: Api) -> None:
    proxy, key = api
    name = new_name()
    first = proxy.system.createSystemProfile(key, name, {"hostname": name})
    second = proxy.system.createSystemProfile(key, name, {"hostname": "other-" + name})
    assert sorted(s["id"] for s in proxy.system.getId(key, name)) == sorted([first, second])


def test_system_ids_start_at_the_real_first_id(api: Api) -> None:
    proxy, key = api
    sid, _ = create(proxy, key)
    assert sid >= FIRST_SYSTEM_ID  # a fresh server's first id is checked in-process below


def test_create_system_profile_refuses_existing_hostname_and_missing_identity(
    api: Api,
) -> None:
    proxy, key = api
    sid, name = create(proxy, key)
    fault = fault_of(proxy.system.createSystemProfile, key, "another-name", {"hostname": name})
    assert fault.faultCode == 1100
    assert fault.faultString == f"redstone.xmlrpc.XmlRpcFault: Existing system IDs: [{sid}]"
    assert fault_of(proxy.system.createSystemProfile, key, new_name(), {}).faultCode == 1213
    mac_sid = proxy.system.createSystemProfile(key, new_name(), {"hwAddress": "52:54:00:12:34:56"})
    fault = fault_of(proxy.system.createSystemProfile, key, new_name(), {"hwAddress": "52:54:00:12:34:56"})
    assert fault.faultString.endswith(f"Existing system IDs: [{mac_sid}]")


def test_get_name_get_details_and_set_details(api: Api) -> None:
    proxy, key = api
    sid, name = create(proxy, key)
    info = proxy.system.getName(key, sid)
    assert info["id"] == sid and info["name"] == name
    assert isinstance(info["last_checkin"], xmlrpc.client.DateTime)
    details = proxy.system.getDetails(key, sid)
    assert details["profile_name"] == name and details["hostname"] == name
    # ServerSerializer writes StringUtils.defaultString(description): "" when there is none
    assert details["description"] == ""
    assert proxy.system.setDetails(key, sid, {"description": "governord:host-id=abc"}) == 1
    assert proxy.system.getDetails(key, sid)["description"] == "governord:host-id=abc"
    renamed = new_name()
    assert proxy.system.setDetails(key, sid, {"profile_name": f"  {renamed} "}) == 1
    assert proxy.system.getName(key, sid)["name"] == renamed
    assert [s["id"] for s in proxy.system.getId(key, renamed)] == [sid]


def test_set_details_validates_keys_and_profile_name(api: Api) -> None:
    proxy, key = api
    sid, _ = create(proxy, key)
    assert fault_of(proxy.system.setDetails, key, sid, {"colour": "blue"}).faultCode == 2801
    fault = fault_of(proxy.system.setDetails, key, sid, {"profile_name": "x"})
    assert (fault.faultCode, fault.faultString) == (
        1060, "redstone.xmlrpc.XmlRpcFault: system profile name is too short",
    )
    assert fault_of(proxy.system.setDetails, key, sid, {"profile_name": "x" * 129}).faultCode == 1061


def test_unknown_system_faults(api: Api) -> None:
    proxy, key = api
    missing = 999999999
    for call in (proxy.system.getName, proxy.system.listGroups, proxy.system.deleteSystem):
        fault = fault_of(call, key, missing)
        assert (fault.faultCode, fault.faultString) == (
            -208, f"redstone.xmlrpc.XmlRpcFault: No such system - sid = {missing}",
        )
    # getDetails/setDetails use another lookup, whose message has no id
    fault = fault_of(proxy.system.getDetails, key, missing)
    assert (fault.faultCode, fault.faultString) == (-208, "redstone.xmlrpc.XmlRpcFault: No such system")


def test_search_by_name_is_a_case_insensitive_regex_find(api: Api) -> None:
    proxy, key = api
    tag = secrets.token_hex(4)
    sid, _ = create(proxy, key, f"search-{tag}.lab.example")
    found = [s["id"] for s in proxy.system.searchByName(key, f"SEARCH-{tag}\\.lab")]
    assert found == [sid]


def test_delete_system_is_synchronous(api: Api) -> None:
    proxy, key = api
    sid, name = create(proxy, key)
    assert proxy.system.deleteSystem(key, sid) == 1
    assert proxy.system.getId(key, name) == []
    assert fault_of(proxy.system.deleteSystem, key, sid).faultCode == -208


def test_delete_systems_is_asynchronous(api: Api) -> None:
    proxy, key = api
    sid, name = create(proxy, key)
    assert proxy.system.deleteSystems(key, [sid]) == 1
    assert [s["id"] for s in proxy.system.getId(key, name)] == [sid], "deleted before the call returned"
    deadline = time.monotonic() + DELETE_DELAY + 5
    while proxy.system.getId(key, name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.system.getId(key, name) == []


def test_delete_systems_reports_unknown_ids_but_deletes_the_rest(api: Api) -> None:
    proxy, key = api
    sid, name = create(proxy, key)
    fault = fault_of(proxy.system.deleteSystems, key, [sid, 12345, 67890])
    assert (fault.faultCode, fault.faultString) == (
        1003, "redstone.xmlrpc.XmlRpcFault: The following systems were NOT deleted: \n12345\n67890",
    )
    time.sleep(DELETE_DELAY + 0.5)
    assert proxy.system.getId(key, name) == []


# -- groups ----------------------------------------------------------------------------------


def test_seeded_groups_and_list_groups(api: Api) -> None:
    proxy, key = api
    sid, _ = create(proxy, key)
    groups = proxy.system.listGroups(key, sid)
    names = {g["system_group_name"] for g in groups}
    assert {"openshift-nodes", "openshift-brokers", "openshift-masters"} <= names
    for group in groups:
        assert group["subscribed"] == 0
        assert group["sgid"] == str(group["id"])


def test_set_group_membership(api: Api) -> None:
    proxy, key = api
    sid, _ = create(proxy, key)
    nodes = proxy.systemgroup.getDetails(key, "openshift-nodes")
    assert proxy.system.setGroupMembership(key, sid, nodes["id"], True) == 1
    member = {g["system_group_name"]: g["subscribed"] for g in proxy.system.listGroups(key, sid)}
    assert member["openshift-nodes"] == 1 and member["openshift-brokers"] == 0
    assert sid in [s["id"] for s in proxy.systemgroup.listSystems(key, "openshift-nodes")]
    assert sid in [s["id"] for s in proxy.systemgroup.listSystemsMinimal(key, "openshift-nodes")]
    assert proxy.system.setGroupMembership(key, sid, nodes["id"], False) == 1
    assert sid not in [s["id"] for s in proxy.systemgroup.listSystems(key, "openshift-nodes")]


def test_set_group_membership_with_unknown_group_is_permission_failure(
    api: Api,
) -> None:
    proxy, key = api
    sid, _ = create(proxy, key)
    fault = fault_of(proxy.system.setGroupMembership, key, sid, 424242, True)
    assert (fault.faultCode, fault.faultString) == (
        -23, "redstone.xmlrpc.XmlRpcFault: You do not have permissions to perform this action.",
    )


def test_systemgroup_create_details_and_duplicate(api: Api) -> None:
    proxy, key = api
    name = new_name()
    group = proxy.systemgroup.create(key, name, "a group")
    assert group["name"] == name and group["description"] == "a group"
    assert group["org_id"] == 1 and group["system_count"] == 0
    assert proxy.systemgroup.getDetails(key, group["id"]) == group
    assert proxy.systemgroup.getDetails(key, name) == group
    fault = fault_of(proxy.systemgroup.create, key, name, "again")
    assert (fault.faultCode, fault.faultString) == (
        -1,
        "redstone.xmlrpc.XmlRpcFault: unhandled internal exception: Duplicate server group requested to be "
        f"created..Server Group with name -[{name}] and org - [Governor Lab] already exists",
    )


def test_unknown_group_faults(api: Api) -> None:
    proxy, key = api
    name = new_name()
    fault = fault_of(proxy.systemgroup.listSystems, key, name)
    assert (fault.faultCode, fault.faultString) == (
        -1, f"redstone.xmlrpc.XmlRpcFault: unhandled internal exception: Unable to locate or access server group: {name}",
    )
    # ServerGroupHandler.lookup: LookupServerGroupException, text api.systemgroup.lookupServerGroup
    fault = fault_of(proxy.systemgroup.getDetails, key, name)
    assert (fault.faultCode, fault.faultString) == (
        2201, f'redstone.xmlrpc.XmlRpcFault: Unable to locate or access server group: "{name}"',
    )
    # by id: java.text.MessageFormat prints the number with grouping separators
    fault = fault_of(proxy.systemgroup.getDetails, key, 4242424)
    assert (fault.faultCode, fault.faultString) == (
        2201, 'redstone.xmlrpc.XmlRpcFault: Unable to locate or access server group: "4,242,424"',
    )


def test_add_or_remove_systems_and_delete_group(api: Api) -> None:
    proxy, key = api
    name = new_name()
    proxy.systemgroup.create(key, name, "")
    sid, _ = create(proxy, key)
    assert proxy.systemgroup.addOrRemoveSystems(key, name, [sid], True) == 1
    assert proxy.systemgroup.getDetails(key, name)["system_count"] == 1
    fault = fault_of(proxy.systemgroup.addOrRemoveSystems, key, name, [sid, 999999999], True)
    assert fault.faultCode == -208
    assert proxy.systemgroup.addOrRemoveSystems(key, name, [sid], False) == 1
    assert proxy.systemgroup.listSystemsMinimal(key, name) == []
    assert proxy.systemgroup.delete(key, name) == 1
    assert fault_of(proxy.systemgroup.getDetails, key, name).faultCode == 2201


# -- activation keys -------------------------------------------------------------------------


def test_seeded_activation_keys_carry_the_org_prefix(api: Api) -> None:
    proxy, key = api
    keys = {k["key"]: k for k in proxy.activationkey.listActivationKeys(key)}
    assert {"1-openshift-node", "1-openshift-broker"} <= set(keys)
    nodes = proxy.systemgroup.getDetails(key, "openshift-nodes")
    assert keys["1-openshift-node"]["server_group_ids"] == [nodes["id"]]


def test_activationkey_create_prefixes_and_refuses_duplicates(api: Api) -> None:
    proxy, key = api
    stem = f"k-{secrets.token_hex(4)}"
    created = proxy.activationkey.create(key, stem, "a key", "", [], False)
    assert created == f"1-{stem}"
    details = proxy.activationkey.getDetails(key, created)
    assert details["key"] == created and details["description"] == "a key" and details["disabled"] is False
    fault = fault_of(proxy.activationkey.create, key, stem, "again", "", [], False)
    assert (fault.faultCode, fault.faultString) == (1090, "redstone.xmlrpc.XmlRpcFault: activation_key_already_exists")
    generated = proxy.activationkey.create(key, "", "generated", "", 5, ["virtualization_host"], False)
    assert re.match(r"^1-[0-9a-f]{32}$", generated)
    assert proxy.activationkey.getDetails(key, generated)["usage_limit"] == 5
    assert fault_of(proxy.activationkey.create, key, "bad-ent", "", "", ["no_such"], False).faultCode == -212


def test_activationkey_lookups(api: Api) -> None:
    proxy, key = api
    # every key lookup of the handler goes through XmlRpcActivationKeysHelper.lookupKey: -212
    for method in (proxy.activationkey.getDetails, proxy.activationkey.listActivatedSystems,
                   proxy.activationkey.delete):
        fault = fault_of(method, key, "1-missing")
        assert (fault.faultCode, fault.faultString) == (
            -212, "redstone.xmlrpc.XmlRpcFault: Activation Key [1-missing] Not Found!",
        )
    fault = fault_of(proxy.activationkey.addServerGroups, key, "1-missing", [])
    assert fault.faultCode == -212
    assert proxy.activationkey.listActivatedSystems(key, "1-openshift-broker") == []


def test_activationkey_add_server_groups(api: Api) -> None:
    proxy, key = api
    created = proxy.activationkey.create(key, f"g-{secrets.token_hex(4)}", "", "", [], False)
    masters = proxy.systemgroup.getDetails(key, "openshift-masters")
    assert proxy.activationkey.addServerGroups(key, created, [masters["id"]]) == 1
    assert proxy.activationkey.getDetails(key, created)["server_group_ids"] == [masters["id"]]
    assert fault_of(proxy.activationkey.addServerGroups, key, created, [424242]).faultCode == -1


# -- users and roles: what a user who is not an org admin may do -----------------------------------

PERMISSION = "redstone.xmlrpc.XmlRpcFault: You do not have permissions to perform this action."


def test_users_are_made_by_org_admins_and_see_their_own_roles(satellite_sim: SatelliteSim) -> None:
    login, password = satellite_sim.make_user(("system_group_admin",))
    proxy, key = satellite_sim.login_as(login, password)
    assert proxy.user.listRoles(key, login) == ["system_group_admin"]
    admin, admin_key = satellite_sim.login()
    assert admin.user.listRoles(admin_key, satellite_sim.username) == ["org_admin"]
    assert admin.user.listRoles(admin_key, login) == ["system_group_admin"]
    # UserManager.lookupUser: anyone but oneself needs org_admin
    assert (fault_of(proxy.user.listRoles, key, satellite_sim.username).faultString) == PERMISSION
    fault = fault_of(proxy.user.create, key, new_name(), "secret-pw", "A", "B", "a@lab.example")
    assert (fault.faultCode, fault.faultString) == (
        -23, PERMISSION + " You need to have at least a Organization Administrator role to perform this action",
    )
    fault = fault_of(proxy.user.addRole, key, login, "org_admin")
    assert fault.faultCode == -2005 and "Role with the label [org_admin] cannot be assigned" in fault.faultString


def test_a_user_sees_systems_only_through_groups_it_administers(satellite_sim: SatelliteSim, api: Api) -> None:
    admin, admin_key = api
    group = new_name()
    admin.systemgroup.create(admin_key, group, "")
    sid, name = create(admin, admin_key)
    login, password = satellite_sim.make_user(("system_group_admin",), (group,))
    proxy, key = satellite_sim.login_as(login, password)
    # a profile in no group: org admins only (rhnUserServerPermsDupes)
    assert proxy.system.getId(key, name) == []
    assert sid not in [s["id"] for s in proxy.system.listSystems(key)]
    assert fault_of(proxy.system.getDetails, key, sid).faultString == "redstone.xmlrpc.XmlRpcFault: No such system"
    assert fault_of(proxy.system.listGroups, key, sid).faultCode == -208
    admin.system.setGroupMembership(admin_key, sid, admin.systemgroup.getDetails(admin_key, group)["id"], True)
    assert [s["id"] for s in proxy.system.getId(key, name)] == [sid]
    assert proxy.system.getDetails(key, sid)["profile_name"] == name


def test_a_user_sees_only_the_groups_it_administers(satellite_sim: SatelliteSim, api: Api) -> None:
    admin, admin_key = api
    group = new_name()
    admin.systemgroup.create(admin_key, group, "")
    login, password = satellite_sim.make_user(("system_group_admin",))
    proxy, key = satellite_sim.login_as(login, password)
    fault = fault_of(proxy.systemgroup.getDetails, key, group)
    assert (fault.faultCode, fault.faultString) == (
        2201, f'redstone.xmlrpc.XmlRpcFault: Unable to locate or access server group: "{group}"',
    )
    assert group not in [g["name"] for g in proxy.systemgroup.listAllGroups(key)]
    admin.systemgroup.addOrRemoveAdmins(admin_key, group, [login], True)
    assert proxy.systemgroup.getDetails(key, group)["name"] == group
    # a group it creates itself it administers (ServerGroupManager.create)
    own = new_name()
    proxy.systemgroup.create(key, own, "")
    assert own in [g["name"] for g in proxy.systemgroup.listAllGroups(key)]
    assert own in [g["name"] for g in admin.systemgroup.listAllGroups(admin_key)]
    # org admins always see every group and cannot be made admins of one
    fault = fault_of(admin.systemgroup.addOrRemoveAdmins, admin_key, group, [satellite_sim.username], True)
    assert fault.faultCode == 2202


def test_activation_keys_need_the_activation_key_admin_role(satellite_sim: SatelliteSim) -> None:
    login, password = satellite_sim.make_user(("system_group_admin",))
    proxy, key = satellite_sim.login_as(login, password)
    # ActivationKeyManager.validateCredentials: an existing key reads exactly like a missing one
    for existing in ("1-openshift-node", "1-no-such-key"):
        fault = fault_of(proxy.activationkey.getDetails, key, existing)
        assert (fault.faultCode, fault.faultString) == (
            -212, f"redstone.xmlrpc.XmlRpcFault: Activation Key [{existing}] Not Found!",
        )
    assert proxy.activationkey.listActivationKeys(key) == []
    fault = fault_of(proxy.activationkey.create, key, "mine", "", "", [], False)
    assert (fault.faultCode, fault.faultString) == (
        -1, "redstone.xmlrpc.XmlRpcFault: unhandled internal exception: Cannot create activation key with key = "
        f"mine. The user = {login} does not have requisite permissions to administer the given key",
    )
    key_admin, key_password = satellite_sim.make_user(("activation_key_admin",))
    proxy, key = satellite_sim.login_as(key_admin, key_password)
    assert proxy.activationkey.getDetails(key, "1-openshift-node")["key"] == "1-openshift-node"


def test_group_changes_need_the_role_and_access_to_the_group(satellite_sim: SatelliteSim, api: Api) -> None:
    admin, admin_key = api
    mine, other = new_name(), new_name()
    admin.systemgroup.create(admin_key, mine, "")
    other_id = admin.systemgroup.create(admin_key, other, "")["id"]
    sid, _ = create(admin, admin_key)
    admin.systemgroup.addOrRemoveSystems(admin_key, mine, [sid], True)
    # administers the group, but has no system_group_admin role
    login, password = satellite_sim.make_user((), (mine,))
    proxy, key = satellite_sim.login_as(login, password)
    mine_id = proxy.systemgroup.getDetails(key, mine)["id"]
    fault = fault_of(proxy.system.setGroupMembership, key, sid, mine_id, False)
    assert (fault.faultCode, fault.faultString) == (
        -23, PERMISSION + " You need to have at least a System Group Administrator role to perform this action",
    )
    fault = fault_of(proxy.systemgroup.addOrRemoveSystems, key, mine, [sid], False)
    assert (fault.faultCode, fault.faultString) == (
        -1, "redstone.xmlrpc.XmlRpcFault: unhandled internal exception: The desired operation cannot be "
        f"performed since the user[{login}] does not have the system group admin role",
    )
    # has the role, sees the system through its group, but may not administer the other group
    login, password = satellite_sim.make_user(("system_group_admin",), (mine,))
    proxy, key = satellite_sim.login_as(login, password)
    fault = fault_of(proxy.system.setGroupMembership, key, sid, other_id, True)
    assert (fault.faultCode, fault.faultString) == (-23, PERMISSION)
    fault = fault_of(proxy.systemgroup.addOrRemoveSystems, key, other, [sid], True)
    assert (fault.faultCode, fault.faultString) == (
        -1, "redstone.xmlrpc.XmlRpcFault: unhandled internal exception: "
        f"Unable to locate or access server group: {other}",
    )
    assert proxy.system.setGroupMembership(key, sid, mine_id, False) == 1
    assert admin.systemgroup.listSystemsMinimal(admin_key, mine) == []


# -- in-process use --------------------------------------------------------------------------


def test_in_process_simulator_serves_the_same_api() -> None:
    with SatelliteSimulator(username="admin", password="pw", delete_delay=0) as sim:
        proxy = xmlrpc.client.ServerProxy(sim.url)
        key = proxy.auth.login("admin", "pw")
        sid = proxy.system.createSystemProfile(key, "inproc.lab.example", {"hostname": "inproc.lab.example"})
        assert sid == FIRST_SYSTEM_ID
        assert proxy.system.deleteSystems(key, [sid]) == 1
        assert proxy.system.getId(key, "inproc.lab.example") == []


# -- empty profiles, registration, and the Spacewalk flavour --------------------------------------


def test_only_empty_profiles_of_the_hostname_refuse_another_profile() -> None:
    with SatelliteSimulator(username="admin", password="pw", delete_delay=0) as sim:
        proxy = xmlrpc.client.ServerProxy(sim.url)
        key = proxy.auth.login("admin", "pw")
        name = "machine.lab.example"
        first = proxy.system.createSystemProfile(key, name, {"hostname": name})
        assert proxy.system.getDetails(key, first)["base_entitlement"] == "bootstrap_entitled"
        fault = fault_of(proxy.system.createSystemProfile, key, name, {"hostname": name})
        assert fault.faultString == f"redstone.xmlrpc.XmlRpcFault: Existing system IDs: [{first}]"
        # the machine registers into its empty profile (same id, now a registered system) ...
        registered = sim.state.register_machine(name, activation_key="1-openshift-node")
        assert registered.id == first
        assert proxy.system.getDetails(key, first)["base_entitlement"] == "salt_entitled"
        assert "openshift-nodes" in {g["system_group_name"] for g in proxy.system.listGroups(key, first) if g["subscribed"]}
        # ... after which the same call makes a second profile of that name and hostname
        second = proxy.system.createSystemProfile(key, name, {"hostname": name})
        assert second != first
        assert sorted(s["id"] for s in proxy.system.getId(key, name)) == [first, second]
        fault = fault_of(proxy.system.createSystemProfile, key, name, {"hostname": name})
        assert fault.faultString.endswith(f"Existing system IDs: [{second}]")


def test_spacewalk_has_no_create_system_profile_and_machines_register_themselves() -> None:
    with SatelliteSimulator(username="admin", password="pw", delete_delay=0, flavor="spacewalk") as sim:
        proxy = xmlrpc.client.ServerProxy(sim.url)
        key = proxy.auth.login("admin", "pw")
        name = "machine.lab.example"
        fault = fault_of(proxy.system.createSystemProfile, key, name, {"hostname": name})
        assert (fault.faultCode, fault.faultString) == (
            -1, "redstone.xmlrpc.XmlRpcFault: Could not find method: createSystemProfile in class: "
            f"{SYSTEM_HANDLER} with params: [{USER_CLASS}, java.lang.String, redstone.xmlrpc.XmlRpcStruct]",
        )
        assert proxy.system.getId(key, name) == []
        sid = sim.state.register_machine(name, activation_key="1-openshift-broker").id
        assert [s["id"] for s in proxy.system.getId(key, name)] == [sid]
        assert proxy.system.getDetails(key, sid)["base_entitlement"] == "enterprise_entitled"
        # Spacewalk's listSystems elaborates SystemOverview (Uyuni's is the short form)
        assert proxy.system.listSystems(key)[0]["extra_pkg_count"] == 0
        assert proxy.system.listActivationKeys(key, sid) == ["1-openshift-broker"]
        assert {s["id"] for s in proxy.systemgroup.listSystemsMinimal(key, "openshift-brokers")} == {sid}
