"""The Foreman registrar against the launched Foreman simulator.

What the registrar did is checked on the other side: read back from the simulator over plain
HTTP, never through the registrar itself.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from governord.errors import PermanentError, RetryableError
from governord.models import HostOrigin, HostState, HostView
from governord.plugins.foreman import governord_register_registrars
from governord.plugins.foreman.registrar import AccessDenied, ForemanRegistrar, search_value
from governord.registrars import RegistrarRegistry
from lab.faultproxy import FaultRates, FaultSettings, TryOutcome, describe_tries, one_try_each, set_proxy_rates
from lab.stack import Lab
from tests.fixtures.foreman import KEEPER, NOBODY, ODD_GROUP, ODD_LOCATION, ForemanSim, launch_foreman_sim

pytestmark = pytest.mark.integration

PASSWORD_VAR = "GOVERNORD_TEST_FOREMAN_PASSWORD"

TAGS: dict[str, dict[str, Any]] = {
    "node": {"hostgroup": "openshift/node", "puppet_classes": ["openshift::node", "profile::base"],
             "parameters": {"openshift_role": "node", "max_pods": 250, "schedulable": True}},
    "broker": {"hostgroup": "openshift/broker", "puppet_classes": ["openshift::broker", "profile::base"],
               "parameters": {"openshift_role": "broker", "weight": 0.5}},
    "base": {"puppet_classes": ["profile::base"], "parameters": {"openshift_role": "base", "site": "lab"}},
}


def make_config(sim: ForemanSim, monkeypatch: pytest.MonkeyPatch, password: str | None = None) -> Any:
    monkeypatch.setenv(PASSWORD_VAR, sim.password if password is None else password)
    return ForemanRegistrar.Config.model_validate({
        "type": "foreman",
        "url": sim.url,
        "username": sim.username,
        "password": {"env": PASSWORD_VAR},
        "organization": "Governor Lab",
        "location": "Lab",
        "call_timeout": 10,
    })


def make_host(*, fqdn: str | None = None, tags: tuple[str, ...] = ("node",)) -> HostView:
    name = f"gov-{uuid.uuid4().hex[:8]}"
    return HostView(
        id=str(uuid.uuid4()), name=name, fqdn=fqdn or f"{name}.lab.example", app="openshift", role="node",
        origin=HostOrigin.PROVISIONED, state=HostState.REGISTERING, provider="vsphere", machine_id="vm-1",
        tags=tags, addresses=("192.0.2.44",), classification={}, registrations={},
    )


def classification(registrar: ForemanRegistrar, *tags: str) -> dict[str, Any]:
    return registrar.classify([(t, ForemanRegistrar.TagMapping.model_validate(TAGS[t])) for t in tags])


def read_host(sim: ForemanSim, name: str) -> requests.Response:
    return requests.get(f"{sim.url}/api/hosts/{name}", auth=sim.auth, timeout=10)


def read_class_ids(sim: ForemanSim, host_id: int) -> list[int]:
    response = requests.get(f"{sim.url}/foreman_puppet/api/hosts/{host_id}/puppetclass_ids", auth=sim.auth, timeout=10)
    return list(response.json()["results"])


@pytest.fixture
async def registrar(foreman_sim: ForemanSim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[ForemanRegistrar]:
    reg = ForemanRegistrar("foreman", make_config(foreman_sim, monkeypatch), state_dir=tmp_path)
    await reg.start()
    try:
        yield reg
    finally:
        await reg.close()


@pytest.fixture
def private_sim(tmp_path: Path) -> Iterator[ForemanSim]:
    """A simulator of this test's own, which the test may stop."""
    sim = launch_foreman_sim(tmp_dir=tmp_path, name="foreman-sim-private")
    try:
        yield sim
    finally:
        sim.stop()


def test_plugin_registers_the_type() -> None:
    registry = RegistrarRegistry()
    governord_register_registrars(registry)
    # registered lazily: the config models are known, the class is imported when loaded
    entry = registry.get("foreman")
    assert entry is not None and entry.Config is ForemanRegistrar.Config and entry.TagMapping is ForemanRegistrar.TagMapping
    assert registry.load("foreman") is ForemanRegistrar


def test_classify_merges_tags_in_order() -> None:
    reg = ForemanRegistrar.__new__(ForemanRegistrar)
    mappings = [(t, ForemanRegistrar.TagMapping.model_validate(TAGS[t])) for t in ("base", "node", "broker")]
    assert reg.classify(mappings) == {
        "hostgroup": "openshift/node",
        "puppet_classes": ["profile::base", "openshift::node", "openshift::broker"],
        "parameters": {"openshift_role": "base", "site": "lab", "max_pods": 250, "schedulable": True, "weight": 0.5},
    }


async def test_apidoc_is_cached_in_the_state_dir(registrar: ForemanRegistrar, tmp_path: Path) -> None:
    assert list((tmp_path / "cache" / "apypie").rglob("*.json"))


async def test_register_creates_the_host(registrar: ForemanRegistrar, foreman_sim: ForemanSim) -> None:
    host = make_host()
    record = await registrar.register(host, classification(registrar, "node"))
    response = read_host(foreman_sim, host.fqdn)
    assert response.status_code == 200
    seen = response.json()
    assert record["id"] == seen["id"]
    assert record["hostgroup"] == "openshift/node"
    assert record["puppet_classes"] == ["openshift::node", "profile::base"]
    assert seen["hostgroup_title"] == "openshift/node"
    assert seen["managed"] is False and seen["build"] is False
    assert seen["ip"] == "192.0.2.44"
    assert seen["comment"] == f"governord:host-id={host.id}"
    assert (seen["organization_name"], seen["location_name"], seen["environment_name"]) == ("Governor Lab", "Lab", "production")
    assert sorted(c["name"] for c in seen["puppetclasses"]) == ["openshift::node", "profile::base"]
    assert {p["name"]: p["value"] for p in seen["parameters"]} == {"openshift_role": "node", "max_pods": 250, "schedulable": True}
    assert await registrar.lookup(host) == {
        "id": seen["id"], "name": host.fqdn, "hostgroup": "openshift/node",
        "puppet_classes": [c["name"] for c in seen["puppetclasses"]],
        "parameters": {"openshift_role": "node", "max_pods": 250, "schedulable": True},
        "comment": f"governord:host-id={host.id}",
    }


async def test_an_application_sees_where_its_host_is_classified_and_no_parameter_values(
        registrar: ForemanRegistrar, foreman_sim: ForemanSim) -> None:
    """The declared split: hostgroup, classes and the Foreman id; the parameters (values in the
    classification, names in the record) stay with the operators."""
    host = make_host()
    wanted = classification(registrar, "base", "node")
    record = await registrar.register(host, wanted)
    assert read_host(foreman_sim, host.fqdn).json()["id"] == record["id"]
    assert ForemanRegistrar.application_view(record) == {
        "id": record["id"], "hostgroup": "openshift/node", "puppet_classes": record["puppet_classes"]}
    assert ForemanRegistrar.application_view(wanted) == {
        "hostgroup": "openshift/node", "puppet_classes": wanted["puppet_classes"]}
    assert "parameters" in record and "parameters" in wanted  # there to withhold


async def test_register_again_changes_nothing(registrar: ForemanRegistrar, foreman_sim: ForemanSim) -> None:
    host = make_host()
    wanted = classification(registrar, "node")
    first = await registrar.register(host, wanted)
    before = read_host(foreman_sim, host.fqdn).json()
    again = dataclasses.replace(host, registrations={"foreman": first})
    assert await registrar.register(again, wanted) == first
    after = read_host(foreman_sim, host.fqdn).json()
    assert after == before
    assert len(requests.get(f"{foreman_sim.url}/api/hosts", params={"search": f'name="{host.fqdn}"'},
                            auth=foreman_sim.auth, timeout=10).json()["results"]) == 1


async def test_reclassify_moves_hostgroup_classes_and_parameters(registrar: ForemanRegistrar, foreman_sim: ForemanSim) -> None:
    host = make_host()
    first = await registrar.register(host, classification(registrar, "node"))
    moved = dataclasses.replace(host, registrations={"foreman": first}, tags=("broker",))
    record = await registrar.register(moved, classification(registrar, "broker"))
    assert record["id"] == first["id"]
    seen = read_host(foreman_sim, host.fqdn).json()
    assert seen["hostgroup_title"] == "openshift/broker"
    assert sorted(c["name"] for c in seen["puppetclasses"]) == ["openshift::broker", "profile::base"]
    assert {p["name"]: p["value"] for p in seen["parameters"]} == {"openshift_role": "broker", "weight": 0.5}
    ids = {c["name"]: c["id"] for c in seen["puppetclasses"]}
    assert sorted(read_class_ids(foreman_sim, seen["id"])) == sorted(ids.values())


async def test_register_keeps_an_operators_comment_and_parameters(registrar: ForemanRegistrar, foreman_sim: ForemanSim) -> None:
    host = make_host()
    body = {"host": {"name": host.fqdn, "location_id": 1, "organization_id": 1, "managed": False,
                     "comment": "racked by ops", "host_parameters_attributes": [{"name": "owner", "value": "ops"}]}}
    assert requests.post(f"{foreman_sim.url}/api/hosts", json=body, auth=foreman_sim.auth, timeout=10).status_code == 201
    await registrar.register(host, classification(registrar, "base"))
    seen = read_host(foreman_sim, host.fqdn).json()
    assert seen["comment"] == f"racked by ops\ngovernord:host-id={host.id}"
    assert {p["name"]: p["value"] for p in seen["parameters"]} == {"owner": "ops", "openshift_role": "base", "site": "lab"}
    assert seen["hostgroup_id"] is None


async def test_an_upper_case_fqdn_is_found_again(registrar: ForemanRegistrar, foreman_sim: ForemanSim) -> None:
    host = make_host()
    shouting = dataclasses.replace(host, fqdn=host.fqdn.upper())
    first = await registrar.register(shouting, classification(registrar, "node"))
    assert await registrar.register(shouting, classification(registrar, "node")) == first
    assert read_host(foreman_sim, host.fqdn).json()["id"] == first["id"]
    await registrar.deregister(shouting)
    assert read_host(foreman_sim, host.fqdn).status_code == 404


async def test_deregister_follows_a_renamed_host_only_if_it_is_ours(registrar: ForemanRegistrar, foreman_sim: ForemanSim) -> None:
    host = make_host()
    record = await registrar.register(host, classification(registrar, "node"))
    renamed = f"renamed-{uuid.uuid4().hex[:6]}.lab.example"
    response = requests.put(f"{foreman_sim.url}/api/hosts/{record['id']}", json={"host": {"name": renamed}},
                            auth=foreman_sim.auth, timeout=10)
    assert response.status_code == 200
    stranger = make_host()
    await registrar.deregister(dataclasses.replace(stranger, registrations={"foreman": record}))
    assert read_host(foreman_sim, renamed).status_code == 200
    await registrar.deregister(dataclasses.replace(host, registrations={"foreman": record}))
    assert read_host(foreman_sim, renamed).status_code == 404


async def test_a_stale_ownership_marker_is_replaced(registrar: ForemanRegistrar, foreman_sim: ForemanSim) -> None:
    host = make_host()
    await registrar.register(host, classification(registrar, "node"))
    successor = dataclasses.replace(host, id=str(uuid.uuid4()))
    await registrar.register(successor, classification(registrar, "node"))
    assert read_host(foreman_sim, host.fqdn).json()["comment"] == f"governord:host-id={successor.id}"


async def test_deregister_removes_the_host(registrar: ForemanRegistrar, foreman_sim: ForemanSim) -> None:
    host = make_host()
    record = await registrar.register(host, classification(registrar, "node"))
    registered = dataclasses.replace(host, registrations={"foreman": record})
    await registrar.deregister(registered)
    response = read_host(foreman_sim, str(record["id"]))
    assert response.status_code == 404
    assert response.json() == {"error": {"message": f"Resource host not found by id '{record['id']}'"}}
    assert read_host(foreman_sim, host.fqdn).status_code == 404
    assert await registrar.lookup(host) is None
    # already gone is success
    await registrar.deregister(registered)
    await registrar.deregister(make_host())


async def test_unknown_hostgroup_is_permanent(registrar: ForemanRegistrar, foreman_sim: ForemanSim) -> None:
    host = make_host()
    with pytest.raises(PermanentError, match="hostgroup 'openshift/nowhere'"):
        await registrar.register(host, {"hostgroup": "openshift/nowhere", "puppet_classes": [], "parameters": {}})
    assert read_host(foreman_sim, host.fqdn).status_code == 404


async def test_unknown_puppet_class_is_permanent(registrar: ForemanRegistrar) -> None:
    with pytest.raises(PermanentError, match="Puppet class 'nginx::server'"):
        await registrar.register(make_host(), {"hostgroup": None, "puppet_classes": ["nginx::server"], "parameters": {}})


async def test_unknown_organization_is_permanent(foreman_sim: ForemanSim, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(foreman_sim, monkeypatch).model_copy(update={"organization": "Nobody"})
    reg = ForemanRegistrar("foreman", config)
    try:
        with pytest.raises(PermanentError, match="organization 'Nobody'"):
            await reg.register(make_host(), {"hostgroup": None, "puppet_classes": [], "parameters": {}})
    finally:
        await reg.close()


async def test_wrong_password_is_permanent_with_foremans_message(foreman_sim: ForemanSim, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = ForemanRegistrar("foreman", make_config(foreman_sim, monkeypatch, password="wrong"))
    try:
        with pytest.raises(PermanentError, match="Unable to authenticate user admin") as caught:
            await reg.start()
        assert "HTTP 401" in str(caught.value)
        assert caught.value.source == "foreman"
    finally:
        await reg.close()


async def test_stopped_simulator_is_retryable(private_sim: ForemanSim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reg = ForemanRegistrar("foreman", make_config(private_sim, monkeypatch), state_dir=tmp_path)
    try:
        await reg.start()
        host = make_host()
        await reg.register(host, classification(reg, "node"))
        private_sim.stop()
        with pytest.raises(RetryableError, match="unreachable"):
            await reg.register(host, classification(reg, "node"))
        with pytest.raises(RetryableError):
            await reg.deregister(host)
    finally:
        await reg.close()
    # never reached at all: the apidoc cannot even be loaded
    fresh = ForemanRegistrar("foreman", make_config(private_sim, monkeypatch))
    try:
        with pytest.raises(RetryableError, match="unreachable"):
            await fresh.start()
    finally:
        await fresh.close()


# -- the real server's edges: quoting, permissions, hosts without Puppet, owners ----------------


def test_search_value_escapes_what_scoped_search_reads() -> None:
    assert search_value("plain") == '"plain"'
    assert search_value('a "b" \\ c') == '"a \\"b\\" \\\\ c"'


async def test_a_hostgroup_and_location_with_quotes_and_backslashes_are_found(
        foreman_edge_sim: ForemanSim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = make_config(foreman_edge_sim, monkeypatch).model_copy(update={"location": ODD_LOCATION})
    reg = ForemanRegistrar("foreman", config, state_dir=tmp_path)
    title = f"openshift/{ODD_GROUP}"
    try:
        host = make_host()
        record = await reg.register(host, {"hostgroup": title, "puppet_classes": ["profile::base"], "parameters": {}})
        seen = read_host(foreman_edge_sim, host.fqdn).json()
        assert (seen["id"], seen["hostgroup_title"], seen["location_name"]) == (record["id"], title, ODD_LOCATION)
        assert (await reg.lookup(host) or {})["hostgroup"] == title
        await reg.deregister(host)
        assert read_host(foreman_edge_sim, host.fqdn).status_code == 404
    finally:
        await reg.close()


def registrar_as(sim: ForemanSim, user: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                 tmp_path: Path) -> ForemanRegistrar:
    """A registrar that logs in as one of the seeded ``user``s."""
    config = make_config(sim, monkeypatch, password=str(user["password"])).model_copy(
        update={"username": user["login"]})
    return ForemanRegistrar("foreman", config, state_dir=tmp_path)


async def test_without_edit_classes_the_missing_permission_is_named_and_nothing_is_posted(
        foreman_edge_sim: ForemanSim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reg = registrar_as(foreman_edge_sim, KEEPER, monkeypatch, tmp_path)
    try:
        host = make_host()
        with pytest.raises(AccessDenied, match="user hostkeeper lacks the permission edit_classes") as caught:
            await reg.register(host, classification(reg, "node"))
        assert caught.value.missing_permissions == ["edit_classes"] and caught.value.http_status == 403
        assert not caught.value.retryable
    finally:
        await reg.close()
    # the host was made (the user may do that), its classes were never touched
    seen = read_host(foreman_edge_sim, host.fqdn).json()
    assert seen["owner_name"] == "Host Keeper"
    assert read_class_ids(foreman_edge_sim, seen["id"]) == []


async def test_without_edit_classes_a_host_whose_tags_name_no_class_registers(
        foreman_edge_sim: ForemanSim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Least privilege: a site whose tags name no Puppet class need not grant edit_classes; the
    host's classes are not touched (nor read) then."""
    reg = registrar_as(foreman_edge_sim, KEEPER, monkeypatch, tmp_path)
    host = make_host()
    try:
        record = await reg.register(host, {"hostgroup": "openshift/node", "puppet_classes": [], "parameters": {}})
        again = await reg.register(dataclasses.replace(host, registrations={"foreman": record}),
                                   {"hostgroup": "openshift/node", "puppet_classes": [], "parameters": {}})
        assert again["id"] == record["id"] and record["puppet_classes"] == []
    finally:
        await reg.close()
    seen = read_host(foreman_edge_sim, host.fqdn).json()
    assert seen["hostgroup_title"] == "openshift/node" and seen["owner_name"] == "Host Keeper"


async def test_any_refusal_names_the_permissions_foreman_wants(
        foreman_edge_sim: ForemanSim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reg = registrar_as(foreman_edge_sim, NOBODY, monkeypatch, tmp_path)
    try:
        await reg.start()  # the status is public
        with pytest.raises(AccessDenied, match="HTTP 403 .*Access denied: Missing one of the required permissions: "
                                               "view_organizations") as caught:
            await reg.register(make_host(), classification(reg, "node"))
        assert caught.value.missing_permissions == ["view_organizations"]
    finally:
        await reg.close()


async def test_a_host_without_puppet_keys_is_read_and_adopted(registrar: ForemanRegistrar, foreman_sim: ForemanSim) -> None:
    host = make_host()
    made = create_host(foreman_sim, host.fqdn, "an operator's host")
    assert "puppet" not in read_host(foreman_sim, host.fqdn).json()
    assert await registrar.lookup(host) == {"id": made, "name": host.fqdn, "hostgroup": None, "puppet_classes": [],
                                            "parameters": {}, "comment": "an operator's host"}
    await registrar.register(host, classification(registrar, "node"))
    seen = read_host(foreman_sim, host.fqdn).json()
    assert seen["id"] == made and {c["name"] for c in seen["puppetclasses"]} == {"openshift::node", "profile::base"}
    assert seen["owner_name"] == "Admin User"  # the operator who made it (here, the same API user)
    await registrar.deregister(host)


# -- the sweep: listing what carries the marker, removing one entry by its id -------------------


def create_host(sim: ForemanSim, fqdn: str, comment: str | None) -> int:
    """A host made behind governord's back (by an operator, or left by another tool)."""
    body = {"host": {"name": fqdn, "location_id": 1, "organization_id": 1, "managed": False, "comment": comment}}
    response = requests.post(f"{sim.url}/api/hosts", json=body, auth=sim.auth, timeout=10)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


async def test_list_owned_finds_every_marked_host_and_nothing_else(registrar: ForemanRegistrar, foreman_sim: ForemanSim) -> None:
    ours = make_host()
    record = await registrar.register(ours, classification(registrar, "node"))
    unmarked = make_host()
    unmarked_id = create_host(foreman_sim, unmarked.fqdn, "racked by ops")
    orphan_of = str(uuid.uuid4())
    orphan = make_host()
    orphan_id = create_host(foreman_sim, orphan.fqdn, f"left by a crash\ngovernord:host-id={orphan_of}")
    mentioned = make_host()  # the key in prose is not a marker
    create_host(foreman_sim, mentioned.fqdn, "see governord:host-id=<uuid> in the runbook")

    listed = {entry.entry_id: entry for entry in await registrar.list_owned()}
    assert listed[str(record["id"])].host_id == ours.id and listed[str(record["id"])].name == ours.fqdn
    assert listed[str(record["id"])].details["hostgroup"] == "openshift/node"
    assert listed[str(orphan_id)].host_id == orphan_of and listed[str(orphan_id)].system == "foreman"
    assert str(unmarked_id) not in listed
    assert mentioned.fqdn not in {e.name for e in listed.values()}


async def test_remove_owned_deletes_exactly_that_host_while_it_carries_the_marker(
    registrar: ForemanRegistrar, foreman_sim: ForemanSim,
) -> None:
    orphan_of = str(uuid.uuid4())
    orphan = make_host()
    orphan_id = create_host(foreman_sim, orphan.fqdn, f"governord:host-id={orphan_of}")
    [entry] = [e for e in await registrar.list_owned() if e.entry_id == str(orphan_id)]

    # a newer host took the name over and re-marked it: the listed entry is not removed
    successor = dataclasses.replace(make_host(fqdn=orphan.fqdn), id=str(uuid.uuid4()))
    await registrar.register(successor, classification(registrar, "node"))
    assert await registrar.remove_owned(entry) is False
    assert read_host(foreman_sim, str(orphan_id)).json()["comment"] == f"governord:host-id={successor.id}"

    # with its marker back, it goes; verified from the other side, and twice is fine
    requests.put(f"{foreman_sim.url}/api/hosts/{orphan_id}", json={"host": {"comment": f"governord:host-id={orphan_of}"}},
                 auth=foreman_sim.auth, timeout=10).raise_for_status()
    assert await registrar.remove_owned(entry) is True
    assert read_host(foreman_sim, str(orphan_id)).status_code == 404
    assert str(orphan_id) not in {e.entry_id for e in await registrar.list_owned()}
    assert await registrar.remove_owned(entry) is False


# -- call-level retries, through the fault proxy ---------------------------------------------------

FAULT_RATE = 0.2
FAULT_TRIES = 12


async def test_one_register_try_survives_faults_on_reads_and_repeats_no_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind the fault proxy (20% of requests: 502/503/504, held past the timeout, or cut, before
    or after Foreman acted), a register try whose only faults hit GETs succeeds: the session
    repeats them. One with a fault on a POST, PUT or DELETE fails, retryably (never repeated,
    never a 422 from a create made twice), and step-level tries then finish it: each host once.
    Without call-level retries (``call_tries = 1``) any fault fails the try."""
    settings = FaultSettings(rates=FaultRates(), seed=3, slow_seconds=1.5, client_timeout=1.0)
    with Lab(tmp_path / "lab", faults=settings) as lab:
        peer = lab.start_foreman()
        proxy = lab.fronts[peer.url]
        monkeypatch.setenv(PASSWORD_VAR, lab.passwords["LAB_FOREMAN_PASSWORD"])

        def config(tries: int) -> Any:
            return ForemanRegistrar.Config.model_validate({
                "type": "foreman", "url": proxy.url, "username": "admin", "password": {"env": PASSWORD_VAR},
                "organization": "Governor Lab", "location": "Lab", "call_timeout": settings.client_timeout,
                "call_tries": tries, "call_backoff": 0.1,
            })

        results: dict[int, list[TryOutcome]] = {}
        hosts: list[HostView] = []
        for tries in (1, 3):
            registrar = ForemanRegistrar("foreman", config(tries), state_dir=tmp_path / f"state-{tries}")
            set_proxy_rates(proxy, FaultRates())
            await registrar.start()
            set_proxy_rates(proxy, FaultRates.spread(FAULT_RATE))
            batch = [make_host() for _ in range(FAULT_TRIES)]
            hosts += batch
            results[tries] = await one_try_each(
                proxy, [functools.partial(registrar.register, host, classification(registrar, "node")) for host in batch],
                (RetryableError, PermanentError))
            await registrar.close()
        print(describe_tries(f"\none register try each, {FAULT_TRIES} hosts, {FAULT_RATE:.0%} faults:", results))

        # without call-level retries a try fails exactly when one of its requests is faulted
        assert all(ok == (not faults) for ok, faults, _ in results[1]), results[1]
        # with them: tries survived faults on reads; a faulted write always failed the try,
        # and no failure is permanent (a create repeated would be refused as a duplicate name)
        assert any(ok and faults for ok, faults, _ in results[3]), results[3]
        for ok, faults, error in results[3]:
            assert not (ok and any(f.method != "GET" for f in faults)), faults
            assert error is None or isinstance(error, RetryableError), error

        # step-level tries finish the rest; then each host is in Foreman once, marked as its own
        registrar = ForemanRegistrar("foreman", config(3), state_dir=tmp_path / "state-3")
        set_proxy_rates(proxy, FaultRates())
        await registrar.start()
        set_proxy_rates(proxy, FaultRates.spread(FAULT_RATE))
        for host in hosts:
            for _ in range(30):
                try:
                    await registrar.register(host, classification(registrar, "node"))
                    break
                except RetryableError:
                    continue
            else:
                pytest.fail(f"{host.fqdn} not registered in 30 tries")
        await registrar.close()
        seen = lab.foreman_hosts()
        assert sorted(seen) == sorted(h.fqdn for h in hosts)
        assert all(seen[h.fqdn]["comment"] == f"governord:host-id={h.id}" for h in hosts)
        assert all(seen[h.fqdn]["puppet_classes"] == ["openshift::node", "profile::base"] for h in hosts)


PROVIDER_ID_PARAMETER = "openshift::node::provider_id"


def read_enc(sim: ForemanSim, fqdn: str) -> Any:
    """What Foreman's ENC gives Puppet for the node (GET /api/hosts/:id/enc: Host#info, which
    /node/NAME renders as YAML), or None when Foreman does not know the host."""
    response = requests.get(f"{sim.url}/api/hosts/{fqdn}/enc", auth=sim.auth, timeout=10)
    return response.json()["data"] if response.status_code == 200 else None


def read_overrides(sim: ForemanSim, klass: str, parameter: str) -> list[dict[str, Any]]:
    """The override values of a smart class parameter, found by class and name."""
    found = requests.get(f"{sim.url}/foreman_puppet/api/smart_class_parameters", auth=sim.auth, timeout=10,
                         params={"search": f'puppetclass_name = "{klass}" and parameter = "{parameter}"'}).json()
    [smart] = found["results"]
    values = requests.get(f"{sim.url}/foreman_puppet/api/smart_class_parameters/{smart['id']}/override_values",
                          params={"per_page": "all"}, auth=sim.auth, timeout=10).json()
    return list(values["results"])


@pytest.fixture
async def id_registrar(foreman_sim: ForemanSim, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[ForemanRegistrar]:
    """A registrar that hands a node group's host its providerID as a Puppet class parameter."""
    config = make_config(foreman_sim, monkeypatch).model_copy(update={"provider_id_parameter": PROVIDER_ID_PARAMETER})
    reg = ForemanRegistrar("foreman", config, state_dir=tmp_path)
    await reg.start()
    try:
        yield reg
    finally:
        await reg.close()


def with_provider_id(registrar: ForemanRegistrar, host: HostView, *tags: str) -> dict[str, Any]:
    """The classification the engine hands a node group's host's registrars (its providerID added)."""
    wanted = classification(registrar, *tags)
    wanted["parameters"]["governord_provider_id"] = f"governord://{host.id}"
    return wanted


async def test_the_provider_id_reaches_puppet_as_a_class_parameter(id_registrar: ForemanRegistrar,
                                                                  foreman_sim: ForemanSim) -> None:
    """A node group's host: its providerID is a smart class parameter override matching the host,
    and Foreman's ENC gives it to Puppet as openshift::node's provider_id (beside the host
    parameter); registering again changes nothing; the override goes with the host."""
    host, other = make_host(), make_host()
    record = await id_registrar.register(host, with_provider_id(id_registrar, host, "node"))
    await id_registrar.register(other, with_provider_id(id_registrar, other, "node"))
    enc = read_enc(foreman_sim, host.fqdn)
    assert enc["classes"]["openshift::node"] == {"provider_id": f"governord://{host.id}"}
    assert enc["parameters"]["governord_provider_id"] == f"governord://{host.id}"
    assert read_enc(foreman_sim, other.fqdn)["classes"]["openshift::node"] == {
        "provider_id": f"governord://{other.id}"}
    mine = [v for v in read_overrides(foreman_sim, "openshift::node", "provider_id") if v["match"] == f"fqdn={host.fqdn}"]
    assert [(v["id"], v["value"], v["omit"]) for v in mine] == [
        (record["provider_id_override"]["override_id"], f"governord://{host.id}", False)]

    again = await id_registrar.register(host, with_provider_id(id_registrar, host, "node"))
    assert again["provider_id_override"] == record["provider_id_override"]
    assert len([v for v in read_overrides(foreman_sim, "openshift::node", "provider_id")
                if v["match"] == f"fqdn={host.fqdn}"]) == 1

    await id_registrar.deregister(dataclasses.replace(host, registrations={"foreman": record}))
    assert read_enc(foreman_sim, host.fqdn) is None
    assert not [v for v in read_overrides(foreman_sim, "openshift::node", "provider_id")
                if v["match"] == f"fqdn={host.fqdn}"]
    # the other host keeps its own
    assert read_enc(foreman_sim, other.fqdn)["classes"]["openshift::node"] == {
        "provider_id": f"governord://{other.id}"}


async def test_a_host_without_the_class_cannot_carry_its_provider_id(id_registrar: ForemanRegistrar) -> None:
    """openshift::node is not a broker's class: the ENC would never hand Puppet the value."""
    host = make_host(tags=("broker",))
    with pytest.raises(PermanentError, match=r"openshift::node is not one of host .*'s Puppet classes"):
        await id_registrar.register(host, with_provider_id(id_registrar, host, "broker"))


async def test_a_class_without_the_parameter_is_permanent(foreman_sim: ForemanSim, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    config = make_config(foreman_sim, monkeypatch).model_copy(update={"provider_id_parameter": "profile::base::provider_id"})
    reg = ForemanRegistrar("foreman", config, state_dir=tmp_path)
    try:
        host = make_host(tags=("node",))
        with pytest.raises(PermanentError, match="no smart class parameter provider_id of Puppet class profile::base"):
            await reg.register(host, with_provider_id(reg, host, "node"))
    finally:
        await reg.close()


def test_provider_id_parameter_is_class_and_parameter() -> None:
    base = {"type": "foreman", "url": "https://f", "username": "u", "password": {"env": "HOME"},
            "organization": "o", "location": "l"}
    assert ForemanRegistrar.Config.model_validate(
        {**base, "provider_id_parameter": "k8s::kubelet::provider_id"}).provider_id_target() == ("k8s::kubelet", "provider_id")
    for wrong in ("provider_id", "k8s::Kubelet::x", "k8s::kubelet::", "::x"):
        with pytest.raises(ValueError, match="not CLASS::PARAMETER"):
            ForemanRegistrar.Config.model_validate({**base, "provider_id_parameter": wrong})


# -- health: the probe, and what the tags name -----------------------------------------------------


async def test_check_mappings_names_each_missing_hostgroup_and_class_and_nothing_that_exists(
        registrar: ForemanRegistrar) -> None:
    mappings = {tag: ForemanRegistrar.TagMapping.model_validate(table) for tag, table in {
        **TAGS,
        "typo": {"hostgroup": "openshift/nodes", "puppet_classes": ["profile::base", "openshift::nod", "x::y"]},
    }.items()}
    found = await registrar.check_mappings(mappings)
    assert set(found) == {("typo", "hostgroup"), ("typo", "puppet_classes")}
    assert "has no hostgroup 'openshift/nodes'" in found[("typo", "hostgroup")]
    classes = found[("typo", "puppet_classes")]
    assert "'openshift::nod', 'x::y'" in classes and "profile::base" not in classes and "'production'" in classes


async def test_probe_answers_and_a_stopped_foreman_fails_it(private_sim: ForemanSim, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    reg = ForemanRegistrar("foreman", make_config(private_sim, monkeypatch), state_dir=tmp_path)
    try:
        assert await reg.probe() is True
        private_sim.stop()
        with pytest.raises(RetryableError):
            await reg.probe()
    finally:
        await reg.close()


async def test_probe_fails_on_a_wrong_password(foreman_sim: ForemanSim, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    reg = ForemanRegistrar("foreman", make_config(foreman_sim, monkeypatch, password="wrong"), state_dir=tmp_path)
    try:
        with pytest.raises(PermanentError, match="401"):
            await reg.probe()
    finally:
        await reg.close()
