"""The Foreman simulator as a real client meets it: plain HTTP (requests) and apypie's ForemanApi.

Every expectation here is a fact about the real Foreman API (status codes, envelopes, error
bodies, quirks) from the research notes in shared/reference/foreman.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp.test_utils import TestClient, TestServer
from apypie import ForemanApi
from apypie.foreman import ForemanApiException

from lab.foreman_sim import create_app, default_seed
from tests.fixtures.foreman import KEEPER, NOBODY, ODD_GROUP, ODD_LOCATION, ForemanSim, launch_foreman_sim

pytestmark = pytest.mark.integration

JSON = {"Content-Type": "application/json"}
PER_PAGE = 2 << 31


def fqdn(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}.lab.example"


def get(sim: ForemanSim, path: str, **params: Any) -> requests.Response:
    return requests.get(sim.url + path, params=params, auth=sim.auth, timeout=10)


def create(sim: ForemanSim, host: dict[str, Any], **top: Any) -> requests.Response:
    body = {"host": {"location_id": 1, "organization_id": 1, "managed": False, **host}, **top}
    return requests.post(sim.url + "/api/hosts", json=body, auth=sim.auth, timeout=10)


@pytest.fixture
def api(foreman_sim: ForemanSim, tmp_path: Path) -> ForemanApi:
    return ForemanApi(uri=foreman_sim.url, username=foreman_sim.username, password=foreman_sim.password,
                      apidoc_cache_base_dir=str(tmp_path / "apypie"))


@pytest.fixture(scope="module")
def two_org_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForemanSim]:
    """A simulator with two organizations and locations, so none is assigned as the lone one."""
    seed = default_seed()
    seed["organizations"].append({"name": "Other Org"})
    seed["locations"].append({"name": "Elsewhere"})
    sim = launch_foreman_sim(seed, tmp_path_factory.mktemp("two-org"), name="foreman-sim-two-org")
    try:
        yield sim
    finally:
        sim.stop()


# -- status, headers, apidoc ----------------------------------------------------------------


def test_status_and_headers(foreman_sim: ForemanSim) -> None:
    response = get(foreman_sim, "/api/status")
    assert response.status_code == 200
    assert response.json() == {"result": "ok", "status": 200, "version": "3.13.0", "api_version": 2}
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.headers["Foreman_api_version"] == "2"
    assert response.headers["Foreman_version"] == "3.13.0"
    assert response.headers["Foreman_current_organization"] == "; ANY"
    assert response.headers["Foreman_current_location"] == "; ANY"
    assert response.headers["Apipie-Checksum"]


def test_ping_needs_no_credentials(foreman_sim: ForemanSim) -> None:
    response = requests.get(foreman_sim.url + "/api/ping", timeout=10)
    assert response.status_code == 200
    assert response.json()["foreman"]["database"]["active"] is True


def test_apidoc_is_served_with_the_advertised_checksum(foreman_sim: ForemanSim) -> None:
    response = requests.get(foreman_sim.url + "/apidoc/v2.json", timeout=10)
    assert response.status_code == 200
    doc = response.json()["docs"]
    assert doc["api_url"] == "/api"
    assert {"hosts", "hostgroups", "organizations", "locations", "domains", "environments",
            "puppetclasses", "host_classes", "home", "ping"} <= set(doc["resources"])
    assert response.headers["Apipie-Checksum"] == get(foreman_sim, "/api/status").headers["Apipie-Checksum"]
    create_method = next(m for m in doc["resources"]["hosts"]["methods"] if m["name"] == "create")
    host_param = create_method["params"][-1]
    assert host_param["name"] == "host" and host_param["required"] and host_param["expected_type"] == "hash"
    required = {p["name"] for p in host_param["params"] if p["required"]}
    assert required == {"name", "location_id", "organization_id"}
    assert "hostgroup_title" not in {p["name"] for p in host_param["params"]}


def test_apypie_loads_the_apidoc_and_caches_it_under_the_checksum(api: ForemanApi) -> None:
    assert api.resource_action("home", "status", {})["result"] == "ok"
    assert "hosts" in api.resources
    cached = list(Path(api.apidoc_cache_dir).glob("*.json"))
    assert [p.stem for p in cached] == [api.apidoc_cache_name]
    assert len(api.apidoc_cache_name) == 32


def test_a_stale_apidoc_cache_is_replaced(foreman_sim: ForemanSim, tmp_path: Path) -> None:
    base = tmp_path / "apypie"
    cache_dir = base / foreman_sim.url.replace(":", "_").replace("/", "_") / "v2"
    cache_dir.mkdir(parents=True)
    (cache_dir / "default.json").write_text(json.dumps({"docs": {"resources": {"home": {"methods": [
        {"name": "status", "apis": [{"api_url": "/api/status", "http_method": "GET", "short_description": ""}],
         "params": [], "examples": []}]}}}}))
    stale = ForemanApi(uri=foreman_sim.url, username=foreman_sim.username, password=foreman_sim.password,
                       apidoc_cache_base_dir=str(base))
    assert stale.resources == ["home"]
    stale.resource_action("home", "status", {})
    # the checksum header differed from "default": the cache was dropped and is fetched again
    assert not (cache_dir / "default.json").exists()
    assert "hosts" in stale.resources


# -- authentication ---------------------------------------------------------------------------


def test_wrong_password_is_401_with_foreman_body(foreman_sim: ForemanSim) -> None:
    response = requests.get(foreman_sim.url + "/api/hosts", auth=("admin", "wrong"), timeout=10)
    assert response.status_code == 401
    assert response.json() == {"error": {"message": "Unable to authenticate user admin"}}
    puppet = requests.get(foreman_sim.url + "/foreman_puppet/api/environments", auth=("bob", "x"), timeout=10)
    assert puppet.status_code == 401
    assert puppet.json() == {"error": {"message": "Unable to authenticate user bob"}}


def test_no_credentials_is_401(foreman_sim: ForemanSim) -> None:
    response = requests.get(foreman_sim.url + "/api/status", timeout=10)
    assert response.status_code == 401
    assert response.json() == {"error": {"message": "Unable to authenticate user "}}


def test_apypie_with_wrong_password_gets_foremans_message(foreman_sim: ForemanSim, tmp_path: Path) -> None:
    bad = ForemanApi(uri=foreman_sim.url, username="admin", password="wrong", apidoc_cache_base_dir=str(tmp_path))
    with pytest.raises(ForemanApiException, match="Unable to authenticate user admin"):
        bad.resource_action("home", "status", {})


# -- the index envelope and search ------------------------------------------------------------


def test_index_envelope_as_recorded(foreman_sim: ForemanSim) -> None:
    name = fqdn("env")
    assert create(foreman_sim, {"name": name}).status_code == 201
    total = get(foreman_sim, "/api/hosts", per_page="all").json()["total"]
    response = get(foreman_sim, "/api/hosts", thin="false", search=f'name="{name}"', per_page=PER_PAGE)
    assert response.status_code == 200
    assert response.text.startswith('{\n  "total": ')
    body = response.json()
    assert body["total"] == total >= 1
    assert body["subtotal"] == 1
    assert body["page"] == 1
    assert body["per_page"] == PER_PAGE and isinstance(body["per_page"], int)
    assert body["search"] == f'name="{name}"'
    assert body["sort"] == {"by": None, "order": None}
    missing = get(foreman_sim, "/api/hosts", search='name="nope.lab.example"', per_page=PER_PAGE).json()
    assert missing["results"] == [] and missing["subtotal"] == 0 and missing["total"] == total


def test_index_defaults_without_search(foreman_sim: ForemanSim) -> None:
    body = get(foreman_sim, "/api/organizations").json()
    assert body["per_page"] == 20 and body["page"] == 1 and body["search"] is None
    assert body["subtotal"] == body["total"] == 1
    assert get(foreman_sim, "/api/hostgroups", order="title DESC").json()["sort"] == {"by": "title", "order": "DESC"}


def test_thin_quirk_any_value_gives_thin_results(foreman_sim: ForemanSim) -> None:
    name = fqdn("thin")
    host_id = create(foreman_sim, {"name": name}).json()["id"]
    for thin in ("false", "true", "0"):
        body = get(foreman_sim, "/api/hosts", thin=thin, search=f'name="{name}"').json()
        assert body["results"] == [{"id": host_id, "name": name}]
    full = get(foreman_sim, "/api/hosts", search=f'name="{name}"').json()["results"]
    assert full[0]["id"] == host_id and "hostgroup_title" in full[0] and "managed" in full[0]


def test_search_syntax(foreman_sim: ForemanSim) -> None:
    name = fqdn("search")
    host_id = create(foreman_sim, {"name": name, "hostgroup_id": 2, "comment": "hello"}).json()["id"]
    for query in (f'name="{name}"', f"name = {name}", f"id={host_id}", f'name="{name}" and hostgroup_title="openshift/node"',
                  f'hostgroup = "openshift/node" and id = {host_id}', f"id ^ (0, {host_id})", f"name ~ {name[:10]}* and comment ~ hell"):
        ids = [h["id"] for h in get(foreman_sim, "/api/hosts", search=query, per_page=PER_PAGE, thin=1).json()["results"]]
        assert ids == [host_id], query
    assert get(foreman_sim, "/api/hosts", search=f'name="{name}" and id=0').json()["results"] == []
    groups = get(foreman_sim, "/api/hostgroups", search='title="openshift/node"').json()["results"]
    assert [(g["name"], g["title"], g["parent_name"]) for g in groups] == [("node", "openshift/node", "openshift")]
    assert [g["title"] for g in get(foreman_sim, "/api/hostgroups", search="name = broker").json()["results"]] == ["openshift/broker"]


def test_hosts_of_a_hostgroup(foreman_sim: ForemanSim, api: ForemanApi) -> None:
    name = fqdn("nested")
    host_id = create(foreman_sim, {"name": name, "hostgroup_id": 3}).json()["id"]
    nested = get(foreman_sim, "/api/hostgroups/3/hosts", search=f'name="{name}"').json()["results"]
    assert [h["id"] for h in nested] == [host_id]
    assert [h["id"] for h in api.list("hosts", search=f'name="{name}"', params={"hostgroup_id": 3})] == [host_id]
    assert api.list("hosts", search=f'name="{name}"', params={"hostgroup_id": 1}) == []
    missing = get(foreman_sim, "/api/hosts", hostgroup_id=99)
    assert missing.status_code == 404
    assert missing.json() == {"message": "Hostgroup not found by id '99'"}


@pytest.mark.parametrize(
    ("query", "message"),
    [("colour = blue", "Field 'colour' not recognized for searching!"),
     ("id = abc", "Value 'abc' is not valid for field 'id'"),
     ('name = "x" and (', "Unexpected end of query")],
)
def test_unsupported_search_is_400(foreman_sim: ForemanSim, query: str, message: str) -> None:
    response = get(foreman_sim, "/api/hosts", search=query)
    assert response.status_code == 400
    assert response.json() == {"error": {"message": message, "class": "ScopedSearch::QueryNotSupported"}}


# -- hosts: create, show, update, delete --------------------------------------------------------


def test_create_returns_201_with_the_full_host(foreman_sim: ForemanSim) -> None:
    name = fqdn("create")
    response = create(
        foreman_sim,
        {"name": name.upper(), "hostgroup_id": 2, "ip": "192.0.2.10", "comment": "governord:host-id=abc",
         "build": False,
         "host_parameters_attributes": [{"name": "role", "value": "node"},
                                        {"name": "count", "value": "3", "parameter_type": "integer"},
                                        {"name": "on", "value": "true", "parameter_type": "boolean"}]},
    )
    assert response.status_code == 201
    host = response.json()
    assert host["name"] == name  # Foreman lower-cases host names
    assert (host["domain_id"], host["domain_name"]) == (1, "lab.example")
    assert (host["hostgroup_id"], host["hostgroup_name"], host["hostgroup_title"]) == (2, "node", "openshift/node")
    assert (host["organization_name"], host["location_name"]) == ("Governor Lab", "Lab")
    assert host["ip"] == "192.0.2.10" and host["comment"] == "governord:host-id=abc"
    assert host["managed"] is False and host["build"] is False
    assert {p["name"]: (p["value"], p["parameter_type"]) for p in host["parameters"]} == {
        "role": ("node", "string"), "count": (3, "integer"), "on": (True, "boolean")}
    assert host["interfaces"][0]["primary"] is True and host["interfaces"][0]["fqdn"] == name
    keys = list(host)
    assert keys[:3] == ["ip", "ip6", "last_report"]
    assert keys.index("hostgroup_title") > keys.index("name") and "permissions" in keys


def test_managed_defaults_to_true_and_then_needs_provisioning_data(foreman_sim: ForemanSim) -> None:
    name = fqdn("managed")
    body = {"host": {"name": name, "location_id": 1, "organization_id": 1}}
    response = requests.post(foreman_sim.url + "/api/hosts", json=body, auth=foreman_sim.auth, timeout=10)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["id"] is None
    assert error["errors"] == {"architecture_id": ["can't be blank"], "operatingsystem_id": ["can't be blank"],
                               "interfaces.mac": ["can't be blank"]}
    body["host"].update(architecture_id=1, operatingsystem_id=1, mac="AA:BB:CC:00:00:01")
    response = requests.post(foreman_sim.url + "/api/hosts", json=body, auth=foreman_sim.auth, timeout=10)
    assert response.status_code == 201
    assert response.json()["managed"] is True and response.json()["mac"] == "aa:bb:cc:00:00:01"


def test_create_without_name_is_422(foreman_sim: ForemanSim) -> None:
    response = create(foreman_sim, {})
    assert response.status_code == 422
    assert response.json() == {"error": {"id": None, "errors": {"name": ["can't be blank"]},
                                         "full_messages": ["Name can't be blank"]}}


def test_lone_taxonomies_are_assigned(foreman_sim: ForemanSim) -> None:
    body = {"host": {"name": fqdn("lone"), "managed": False}}
    response = requests.post(foreman_sim.url + "/api/hosts", json=body, auth=foreman_sim.auth, timeout=10)
    assert response.status_code == 201
    assert (response.json()["organization_id"], response.json()["location_id"]) == (1, 1)


def test_create_without_taxonomies_is_422(two_org_sim: ForemanSim) -> None:
    body = {"host": {"name": fqdn("tax"), "managed": False}}
    response = requests.post(two_org_sim.url + "/api/hosts", json=body, auth=two_org_sim.auth, timeout=10)
    assert response.status_code == 422
    assert response.json() == {"error": {
        "id": None,
        "errors": {"location_id": ["can't be blank"], "organization_id": ["can't be blank"]},
        "full_messages": ["Location can't be blank", "Organization can't be blank"],
    }}
    # the request's taxonomy context fills them in
    body = {"host": {"name": fqdn("tax"), "managed": False}, "organization_id": 2, "location_id": 2}
    response = requests.post(two_org_sim.url + "/api/hosts", json=body, auth=two_org_sim.auth, timeout=10)
    assert response.status_code == 201
    assert (response.json()["organization_name"], response.json()["location_name"]) == ("Other Org", "Elsewhere")


def test_duplicate_name_is_422(foreman_sim: ForemanSim) -> None:
    name = fqdn("dup")
    assert create(foreman_sim, {"name": name}).status_code == 201
    response = create(foreman_sim, {"name": name})
    assert response.status_code == 422
    assert response.json() == {"error": {"id": None, "errors": {"name": ["has already been taken"]},
                                         "full_messages": ["Name has already been taken"]}}


def test_unknown_hostgroup_is_422_custom_error(foreman_sim: ForemanSim) -> None:
    response = create(foreman_sim, {"name": fqdn("hg"), "hostgroup_id": 999})
    assert response.status_code == 422
    assert response.json() == {"error": {"message": "Couldn't find Hostgroup with 'id'=999"}}


def test_hostgroup_title_is_not_a_create_parameter(foreman_sim: ForemanSim) -> None:
    response = create(foreman_sim, {"name": fqdn("title"), "hostgroup_title": "openshift/node"})
    assert response.status_code == 201  # unpermitted keys are dropped, as Rails strong parameters do
    assert response.json()["hostgroup_id"] is None


def test_show_by_id_or_name_and_404(foreman_sim: ForemanSim) -> None:
    name = fqdn("show")
    host_id = create(foreman_sim, {"name": name}).json()["id"]
    assert get(foreman_sim, f"/api/hosts/{host_id}").json()["name"] == name
    assert get(foreman_sim, f"/api/hosts/{name}").json()["id"] == host_id
    response = get(foreman_sim, "/api/hosts/missing.lab.example")
    assert response.status_code == 404
    assert response.json() == {"error": {"message": "Resource host not found by id 'missing.lab.example'"}}


def test_update_returns_200_with_the_full_host(foreman_sim: ForemanSim) -> None:
    name = fqdn("update")
    host = create(foreman_sim, {"name": name, "hostgroup_id": 2,
                                "host_parameters_attributes": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]}).json()
    params = {p["name"]: p["id"] for p in host["parameters"]}
    body = {"host": {"hostgroup_id": 3, "host_parameters_attributes": [
        {"id": params["a"], "value": "10"}, {"id": params["b"], "_destroy": True}, {"name": "c", "value": "3"}]}}
    response = requests.put(f"{foreman_sim.url}/api/hosts/{host['id']}", json=body, auth=foreman_sim.auth, timeout=10)
    assert response.status_code == 200
    updated = response.json()
    assert updated["hostgroup_title"] == "openshift/broker"
    assert {p["name"]: p["value"] for p in updated["parameters"]} == {"a": "10", "c": "3"}
    assert updated["name"] == name and updated["comment"] is None


def test_update_to_a_taken_name_is_422_with_the_id(foreman_sim: ForemanSim) -> None:
    first, second = fqdn("a"), fqdn("b")
    create(foreman_sim, {"name": first})
    host_id = create(foreman_sim, {"name": second}).json()["id"]
    response = requests.put(f"{foreman_sim.url}/api/hosts/{host_id}", json={"host": {"name": first}},
                            auth=foreman_sim.auth, timeout=10)
    assert response.status_code == 422
    assert response.json()["error"]["id"] == host_id
    assert response.json()["error"]["errors"] == {"name": ["has already been taken"]}


def test_update_unknown_host_is_404(foreman_sim: ForemanSim) -> None:
    response = requests.put(f"{foreman_sim.url}/api/hosts/4040404", json={"host": {}}, auth=foreman_sim.auth, timeout=10)
    assert response.status_code == 404
    assert response.json() == {"error": {"message": "Resource host not found by id '4040404'"}}


def test_delete_returns_200_with_the_raw_row(foreman_sim: ForemanSim) -> None:
    name = fqdn("delete")
    host_id = create(foreman_sim, {"name": name}).json()["id"]
    response = requests.delete(f"{foreman_sim.url}/api/hosts/{name}", auth=foreman_sim.auth, timeout=10)
    assert response.status_code == 200
    row = response.json()
    assert row["id"] == host_id and row["name"] == name
    assert {"root_pass", "otp", "grub_pass", "lookup_value_matcher", "build_errors"} <= set(row)
    assert "hostgroup_title" not in row and "parameters" not in row
    assert get(foreman_sim, f"/api/hosts/{host_id}").status_code == 404
    again = requests.delete(f"{foreman_sim.url}/api/hosts/{host_id}", auth=foreman_sim.auth, timeout=10)
    assert again.status_code == 404


def test_unparsable_json_is_400_unwrapped(foreman_sim: ForemanSim) -> None:
    response = requests.post(foreman_sim.url + "/api/hosts", data='{"host": {', headers=JSON, auth=foreman_sim.auth, timeout=10)
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"status", "error"} and body["status"] == 400
    assert body["error"].startswith("There was a problem in the JSON you submitted: ")


@pytest.mark.parametrize("method", ["post", "put"])
def test_wrong_content_type_is_415(foreman_sim: ForemanSim, method: str) -> None:
    path = "/api/hosts" if method == "post" else "/api/hosts/1"
    response = requests.request(method, foreman_sim.url + path, data="host[name]=x",
                                headers={"Content-Type": "application/x-www-form-urlencoded"}, auth=foreman_sim.auth, timeout=10)
    assert response.status_code == 415
    assert response.json() == {"error": {"message": (
        "Media type in 'Content-Type: application/x-www-form-urlencoded' is unsupported in API v2 for POST and PUT "
        "requests. Please use 'Content-Type: application/json'.")}}


# -- lookups ----------------------------------------------------------------------------------


def test_lookups_by_name_and_title(foreman_sim: ForemanSim) -> None:
    def one(path: str, search: str) -> dict[str, Any]:
        results = get(foreman_sim, path, search=search).json()["results"]
        assert len(results) == 1, (path, search, results)
        return results[0]

    assert one("/api/organizations", 'name="Governor Lab"')["id"] == 1
    assert one("/api/locations", 'title="Lab"')["name"] == "Lab"
    assert one("/api/domains", 'name="lab.example"')["id"] == 1
    assert one("/api/hostgroups", 'title="openshift"')["parent_id"] is None
    assert one("/foreman_puppet/api/environments", 'name="production"')["id"] == 1
    assert get(foreman_sim, "/api/organizations/Governor Lab").json()["id"] == 1
    missing = get(foreman_sim, "/api/hostgroups/77")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"message": "Resource hostgroup not found by id '77'"}}


def test_puppetclass_index_groups_by_module(foreman_sim: ForemanSim) -> None:
    body = get(foreman_sim, "/foreman_puppet/api/environments/1/puppetclasses").json()
    assert body["total"] == 4
    results = body["results"]
    assert sorted(results) == ["openshift", "profile"]
    assert sorted(c["name"] for c in results["openshift"]) == ["openshift::broker", "openshift::master", "openshift::node"]
    one = get(foreman_sim, "/foreman_puppet/api/puppetclasses", search='name="openshift::node"').json()
    assert [c["name"] for c in one["results"]["openshift"]] == ["openshift::node"] and one["subtotal"] == 1
    assert set(one["results"]["openshift"][0]) == {"id", "name", "created_at", "updated_at"}
    missing = get(foreman_sim, "/foreman_puppet/api/environments/99/puppetclasses")
    assert missing.status_code == 404
    assert missing.json() == {"message": "Environment not found by id '99'"}


# -- Puppet classes of a host -------------------------------------------------------------------


def test_host_puppet_classes(foreman_sim: ForemanSim) -> None:
    name = fqdn("classes")
    host_id = create(foreman_sim, {"name": name, "environment_id": "1"}).json()["id"]
    base = f"{foreman_sim.url}/foreman_puppet/api/hosts/{host_id}/puppetclass_ids"
    added = requests.post(base, json={"puppetclass_id": 2}, auth=foreman_sim.auth, timeout=10)
    assert added.status_code == 200
    assert added.json() == {"host_id": host_id, "puppetclass_id": 2}
    twice = requests.post(base, json={"puppetclass_id": 2}, auth=foreman_sim.auth, timeout=10)
    assert twice.status_code == 500
    assert requests.get(base, auth=foreman_sim.auth, timeout=10).json() == {"results": [2]}
    host = get(foreman_sim, f"/api/hosts/{host_id}").json()
    assert host["puppetclasses"] == [{"id": 2, "name": "openshift::node", "module_name": "openshift"}]
    assert host["environment_name"] == "production"
    enc = get(foreman_sim, f"/api/hosts/{name}/enc").json()["data"]
    assert enc["classes"] == {"openshift::node": None} and enc["environment"] == "production"
    removed = requests.delete(f"{base}/2", auth=foreman_sim.auth, timeout=10)
    assert removed.status_code == 200 and removed.json() == []
    assert requests.delete(f"{base}/2", auth=foreman_sim.auth, timeout=10).json() == []
    assert requests.get(base, auth=foreman_sim.auth, timeout=10).json() == {"results": []}
    unknown = requests.post(base, json={"puppetclass_id": 999}, auth=foreman_sim.auth, timeout=10)
    assert unknown.status_code == 422
    assert unknown.json() == {"error": {"message": "Couldn't find ForemanPuppet::Puppetclass with 'id'=999"}}


def test_enc_parameters(foreman_sim: ForemanSim) -> None:
    name = fqdn("enc")
    create(foreman_sim, {"name": name, "hostgroup_id": 2, "host_parameters_attributes": [
        {"name": "weight", "value": "2.5", "parameter_type": "real"}]})
    data = get(foreman_sim, f"/api/hosts/{name}/enc").json()["data"]
    assert data["parameters"]["hostgroup"] == "openshift/node"
    assert data["parameters"]["organization"] == "Governor Lab"
    assert data["parameters"]["weight"] == 2.5
    # the host took its hostgroup's Puppet environment (openshift's), and the group has no classes
    assert data["environment"] == "production" and data["classes"] == {}
    bare = fqdn("enc-bare")
    create(foreman_sim, {"name": bare})
    assert get(foreman_sim, f"/api/hosts/{bare}/enc").json()["data"]["classes"] == []  # no environment, no classes


def test_invalid_parameter_value_is_422(foreman_sim: ForemanSim) -> None:
    response = create(foreman_sim, {"name": fqdn("param"), "host_parameters_attributes": [
        {"name": "n", "value": "many", "parameter_type": "integer"}]})
    assert response.status_code == 422
    assert response.json()["error"]["errors"] == {"host_parameters.value": ["is invalid integer"]}


# -- the whole lifecycle through apypie ------------------------------------------------------------


def test_apypie_lifecycle(api: ForemanApi) -> None:
    """The FAM/apypie request sequence: look up, create, re-read, update, classes, delete."""
    name = fqdn("apypie")
    assert api.list("hosts", search=f'name="{name}"', params={"thin": False}) == []
    org = api.list("organizations", search='name="Governor Lab"')[0]
    loc = api.list("locations", search='title="Lab"')[0]
    group = api.list("hostgroups", search='title="openshift/node"')[0]
    env = api.list("environments", search='name="production"')[0]
    created = api.create("hosts", {"name": name, "location_id": loc["id"], "organization_id": org["id"],
                                   "build": False, "managed": False, "environment_id": str(env["id"])},
                         params={"location_id": loc["id"], "organization_id": org["id"]})
    assert created["name"] == name and created["environment_id"] == env["id"]
    found = api.list("hosts", search=f'name="{name}"', params={"thin": False})
    assert found == [{"id": created["id"], "name": name}]
    assert api.show("hosts", created["id"])["id"] == created["id"]
    updated = api.update("hosts", {"id": created["id"], "hostgroup_id": group["id"]})
    assert updated["hostgroup_title"] == "openshift/node"
    classes = api.list("puppetclasses", search='name="openshift::broker"', params={"environment_id": env["id"]})
    assert isinstance(classes, dict)
    class_id = classes["openshift"][0]["id"]
    assert api.resource_action("host_classes", "create", {"host_id": created["id"], "puppetclass_id": class_id}) == {
        "host_id": created["id"], "puppetclass_id": class_id}
    assert api.resource_action("host_classes", "index", {"host_id": created["id"]}) == {"results": [class_id]}
    assert api.resource_action("host_classes", "destroy", {"host_id": created["id"], "id": class_id}) == []
    api.delete("hosts", {"id": created["id"]})
    assert api.list("hosts", search=f'name="{name}"') == []
    with pytest.raises(ForemanApiException, match="Resource host not found by id"):
        api.show("hosts", created["id"])


# -- in-process --------------------------------------------------------------------------------


async def test_create_app_in_process() -> None:
    app = create_app(default_seed(), "admin", "pw")
    auth = {"Authorization": "Basic " + base64.b64encode(b"admin:pw").decode()}
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/api/hostgroups", params={"search": 'title="openshift/broker"'}, headers=auth)
        assert response.status == 200
        assert [g["name"] for g in (await response.json())["results"]] == ["broker"]
        denied = await client.get("/api/hostgroups")
        assert denied.status == 401


# -- the ENC endpoint (HostsController#externalNodes) -------------------------------------------


def test_external_nodes_yaml(foreman_sim: ForemanSim) -> None:
    import yaml

    name = fqdn("node")
    create(foreman_sim, {"name": name, "hostgroup_id": 2, "environment_id": 1, "puppetclass_ids": [1],
                         "host_parameters_attributes": [{"name": "role", "value": "node"}]})
    response = requests.get(f"{foreman_sim.url}/node/{name}", params={"format": "yml"}, auth=foreman_sim.auth, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.text.startswith("---\n")
    info = yaml.safe_load(response.text)
    assert info["classes"] == {"profile::base": None}
    assert info["environment"] == "production"
    assert info["parameters"]["hostgroup"] == "openshift/node"
    assert info["parameters"]["foreman_env"] == "production"
    assert info["parameters"]["role"] == "node"
    # the same data as the API's ENC view
    assert info == get(foreman_sim, f"/api/hosts/{name}/enc").json()["data"]
    page = requests.get(f"{foreman_sim.url}/node/{name}", auth=foreman_sim.auth, timeout=10)
    assert page.headers["Content-Type"].startswith("text/html") and page.text.startswith("<pre>---\n")


def test_external_nodes_unknown_is_bare_404(foreman_sim: ForemanSim) -> None:
    response = requests.get(f"{foreman_sim.url}/node/missing.lab.example", params={"format": "yml"},
                            auth=foreman_sim.auth, timeout=10)
    assert response.status_code == 404
    assert response.text == ""


def test_external_nodes_needs_credentials(foreman_sim: ForemanSim) -> None:
    name = fqdn("nodeauth")
    create(foreman_sim, {"name": name})
    anonymous = requests.get(f"{foreman_sim.url}/node/{name}", params={"format": "yml"}, timeout=10)
    assert anonymous.status_code == 401
    wrong = requests.get(f"{foreman_sim.url}/node/{name}", params={"format": "yml"}, auth=("admin", "nope"), timeout=10)
    assert wrong.status_code == 401
    assert "Unable to authenticate user admin" in wrong.text


def test_enc_script_prints_foremans_classification(foreman_sim: ForemanSim, tmp_path: Path) -> None:
    """lab/puppet/enc.py as puppetserver runs it: certname as last argument, YAML on stdout."""
    import subprocess
    import sys

    import yaml

    from lab.puppet import ENC_SCRIPT, write_enc_config

    name = fqdn("enc-script")
    create(foreman_sim, {"name": name, "environment_id": 1, "puppetclass_ids": [2]})
    command = write_enc_config(tmp_path / "enc.json", foreman_sim.url, foreman_sim.username, foreman_sim.password)
    assert foreman_sim.password not in command and str(ENC_SCRIPT) in command
    assert (tmp_path / "enc.json").stat().st_mode & 0o077 == 0
    known = subprocess.run([*command.split(), name], capture_output=True, text=True, timeout=30, check=False)
    assert known.returncode == 0, known.stderr
    assert yaml.safe_load(known.stdout)["classes"] == {"openshift::node": None}
    unknown = subprocess.run([*command.split(), "missing.lab.example"], capture_output=True, text=True, timeout=30,
                             check=False)
    assert unknown.returncode == 1 and unknown.stdout == ""
    env = {"PATH": "/usr/bin:/bin", "FOREMAN_URL": foreman_sim.url, "FOREMAN_USER": foreman_sim.username,
           "FOREMAN_PASSWORD": foreman_sim.password}
    from_env = subprocess.run([sys.executable, str(ENC_SCRIPT), name], capture_output=True, text=True, timeout=30,
                              check=False, env=env)
    assert from_env.returncode == 0 and yaml.safe_load(from_env.stdout)["environment"] == "production"


def test_smart_class_parameter_overrides_as_foreman_validates_them(tmp_path: Path) -> None:
    """foreman_puppet's override values: create! runs LookupValue's validations, and a refusal
    (RecordInvalid) reaches the client as the API's catch-all 500 "Validation failed: ..."; the
    first value turns the parameter's override on; the ENC gives the class the value matching the
    host; the host's deletion takes its fqdn= values with it."""
    sim = launch_foreman_sim(tmp_dir=tmp_path, name="foreman-sim-overrides")
    try:
        found = get(sim, "/foreman_puppet/api/smart_class_parameters",
                    search='puppetclass_name = "openshift::node" and parameter = "provider_id"').json()
        [smart] = found["results"]
        assert (smart["parameter"], smart["puppetclass_name"], smart["parameter_type"], smart["override"]) == (
            "provider_id", "openshift::node", "string", False)
        assert smart["override_value_order"] == "fqdn\nhostgroup\nos\ndomain"
        values = f"{sim.url}/foreman_puppet/api/smart_class_parameters/{smart['id']}/override_values"
        name = fqdn("ov")

        def post(match: Any, value: Any = "governord://x", **more: Any) -> requests.Response:
            return requests.post(values, json={"override_value": {"match": match, "value": value, **more}},
                                 auth=sim.auth, timeout=10)

        refused = post(f"fqdn={name}")
        assert refused.status_code == 500
        assert refused.json() == {"error": {"message": f"Validation failed: Match fqdn={name} does not match an existing host"}}
        assert get(sim, f"/foreman_puppet/api/smart_class_parameters/{smart['id']}").json()["override"] is False
        assert post("environment=production").json()["error"]["message"] == (
            "Validation failed: Match environment does not exist in order field")
        # sanitized to "fqdn=": no format, and (Ruby's "".split(",")[0] is nil) no such host
        assert post("fqdn").json()["error"]["message"] == (
            "Validation failed: Match is invalid, Match fqdn= does not match an existing host")
        assert post(None).json()["error"]["message"] == "Failed to save the record"
        assert post("hostgroup=nonesuch").json()["error"]["message"] == (
            "Validation failed: Match hostgroup=nonesuch does not match an existing host group")

        host = create(sim, {"name": name, "hostgroup_id": 2, "environment_id": "1",
                            "puppetclass_ids": [smart["puppetclass_id"]]}).json()
        assert post(f"fqdn={name}", "").json()["error"]["message"] == "Validation failed: Value can't be blank"
        made = post(f" FQDN = {name} ")  # sanitized: the matcher lower-cased, both sides stripped
        assert made.status_code == 201
        value = made.json()
        assert (value["match"], value["value"], value["omit"]) == (f"fqdn={name}", "governord://x", False)
        assert get(sim, f"/foreman_puppet/api/smart_class_parameters/{smart['id']}").json()["override"] is True
        assert post(f"fqdn={name}").json()["error"]["message"] == (
            "Validation failed: Match has already been taken, Match has already been taken")
        enc = get(sim, f"/api/hosts/{host['id']}/enc").json()["data"]
        assert enc["classes"]["openshift::node"] == {"provider_id": "governord://x"}
        assert "provider_id: governord://x" in requests.get(f"{sim.url}/node/{name}", params={"format": "yml"},
                                                            auth=sim.auth, timeout=10).text
        changed = requests.put(f"{values}/{value['id']}", json={"override_value": {"value": "governord://y"}},
                               auth=sim.auth, timeout=10)
        assert changed.status_code == 200 and changed.json()["value"] == "governord://y"
        assert get(sim, f"/foreman_puppet/api/smart_class_parameters/{smart['id']}/override_values/{value['id']}"
                   ).json()["value"] == "governord://y"

        assert requests.delete(f"{sim.url}/api/hosts/{host['id']}", auth=sim.auth, timeout=10).status_code == 200
        assert get(sim, f"/foreman_puppet/api/smart_class_parameters/{smart['id']}/override_values").json()["results"] == []
        missing = get(sim, f"/foreman_puppet/api/smart_class_parameters/{smart['id']}/override_values/{value['id']}")
        assert missing.status_code == 404
        unknown = get(sim, "/foreman_puppet/api/smart_class_parameters/999/override_values")
        assert (unknown.status_code, unknown.json()) == (404, {"message": "Smart class parameter not found by id '''"})
    finally:
        sim.stop()


# -- edges: search quoting, permissions, Puppet facets, owners, unknown routes --------------------

def quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_a_search_value_escapes_quotes_and_backslashes(foreman_edge_sim: ForemanSim) -> None:
    title = f"openshift/{ODD_GROUP}"
    found = get(foreman_edge_sim, "/api/hostgroups", search=f"title = {quoted(title)}").json()
    assert [g["title"] for g in found["results"]] == [title]
    # unescaped, the value ends at its second quote: the rest is other terms, and nothing matches
    raw = get(foreman_edge_sim, "/api/hostgroups", search=f'title = "{title}"')
    assert raw.status_code == 200 and raw.json()["results"] == []
    located = get(foreman_edge_sim, "/api/locations", search=f"title = {quoted(ODD_LOCATION)}").json()["results"]
    assert [loc["title"] for loc in located] == [ODD_LOCATION]
    # single quotes quote nothing in scoped_search: they are part of the value
    assert get(foreman_edge_sim, "/api/hostgroups", search="title = 'openshift'").json()["results"] == []
    # == and <> are = and !=; - is not; a ! inside a bare word is part of it
    titles = lambda search: [g["title"] for g in get(foreman_edge_sim, "/api/hostgroups", search=search).json()["results"]]  # noqa: E731
    assert titles("title == openshift") == titles("-title <> openshift") == ["openshift"]
    odd_field = get(foreman_edge_sim, "/api/hostgroups", search="title!=openshift")
    assert odd_field.status_code == 400 and "'title!'" in odd_field.json()["error"]["message"]
    # a value left open runs to the end of the query
    assert [g["title"] for g in get(foreman_edge_sim, "/api/hostgroups", search='title = "openshift').json()["results"]] == ["openshift"]


def test_puppetclass_ids_need_edit_classes(foreman_edge_sim: ForemanSim) -> None:
    name = fqdn("perm")
    host_id = create(foreman_edge_sim, {"name": name, "environment_id": 1, "puppetclass_ids": [2]}).json()["id"]
    base = f"{foreman_edge_sim.url}/foreman_puppet/api/hosts/{host_id}/puppetclass_ids"
    keeper = (KEEPER["login"], KEEPER["password"])
    denied = {"error": {"message": "Access denied", "details": "Missing one of the required permissions: edit_classes",
                        "missing_permissions": ["edit_classes"]}}
    for response in (
        requests.get(base, auth=keeper, timeout=10),
        requests.post(base, json={"puppetclass_id": 2}, auth=keeper, timeout=10),
        requests.delete(f"{base}/2", auth=keeper, timeout=10),
        # the permission is checked before the host is looked up
        requests.get(f"{foreman_edge_sim.url}/foreman_puppet/api/hosts/999999/puppetclass_ids", auth=keeper, timeout=10),
    ):
        assert (response.status_code, response.json()) == (403, denied)
    # nothing changed, and the user may still read the host and its classes there
    assert requests.get(base, auth=foreman_edge_sim.auth, timeout=10).json() == {"results": [2]}
    shown = requests.get(f"{foreman_edge_sim.url}/api/hosts/{host_id}", auth=keeper, timeout=10)
    assert shown.status_code == 200 and [c["id"] for c in shown.json()["puppetclasses"]] == [2]
    # the show view's permissions are the requesting user's
    assert shown.json()["permissions"]["edit_hosts"] and not shown.json()["permissions"]["power_hosts"]
    assert all(get(foreman_edge_sim, f"/api/hosts/{host_id}").json()["permissions"].values())


def test_every_api_action_needs_one_of_its_permissions(foreman_edge_sim: ForemanSim) -> None:
    nobody = (NOBODY["login"], NOBODY["password"])

    def denied(response: requests.Response, *permissions: str) -> None:
        assert response.status_code == 403, response.text
        assert response.json() == {"error": {
            "message": "Access denied", "details": f"Missing one of the required permissions: {', '.join(permissions)}",
            "missing_permissions": list(permissions)}}

    url = foreman_edge_sim.url
    denied(requests.get(f"{url}/api/hostgroups", auth=nobody, timeout=10), "view_hostgroups")
    denied(requests.get(f"{url}/api/hosts/1", auth=nobody, timeout=10), "view_hosts")
    # authorize comes before the media type check
    denied(requests.post(f"{url}/api/hosts", data="x", headers={"Content-Type": "text/plain"}, auth=nobody, timeout=10),
           "create_hosts")
    denied(requests.get(f"{url}/foreman_puppet/api/smart_class_parameters", auth=nobody, timeout=10),
           "view_external_parameters", "view_puppetclasses")
    denied(requests.post(f"{url}/foreman_puppet/api/smart_class_parameters/1/override_values",
                         json={"override_value": {"match": "fqdn=x", "value": "y"}}, auth=nobody, timeout=10),
           "create_external_parameters", "edit_external_parameters", "destroy_external_parameters")
    # public: any user who logged in
    assert requests.get(f"{url}/api/status", auth=nobody, timeout=10).status_code == 200
    # the keeper may read hostgroups but not change override values
    keeper = (KEEPER["login"], KEEPER["password"])
    assert requests.get(f"{url}/api/hostgroups", auth=keeper, timeout=10).status_code == 200
    denied(requests.delete(f"{url}/foreman_puppet/api/smart_class_parameters/1/override_values/1", auth=keeper, timeout=10),
           "edit_external_parameters", "destroy_external_parameters")


def test_a_host_without_a_puppet_facet_has_no_puppet_keys(foreman_sim: ForemanSim) -> None:
    puppet_keys = {"environment_id", "environment_name", "puppet", "puppetclasses", "all_puppetclasses", "config_groups"}
    name = fqdn("bare")
    host_id = create(foreman_sim, {"name": name}).json()["id"]
    assert not puppet_keys & set(get(foreman_sim, f"/api/hosts/{host_id}").json())
    listed = get(foreman_sim, "/api/hosts", search=f'name = "{name}"').json()["results"]
    assert [h["id"] for h in listed] == [host_id] and "environment_id" not in listed[0]
    # foreman_puppet's host class controller makes the facet when it finds the host
    assert get(foreman_sim, f"/foreman_puppet/api/hosts/{host_id}/puppetclass_ids").json() == {"results": []}
    shown = get(foreman_sim, f"/api/hosts/{host_id}").json()
    assert puppet_keys <= set(shown) and shown["environment_id"] is None and shown["puppetclasses"] == []
    # a host given a hostgroup gets the facet, with the group's (inherited) environment
    grouped = create(foreman_sim, {"name": fqdn("grouped"), "hostgroup_id": 2}).json()
    assert grouped["environment_name"] == "production" and grouped["puppet"]["environment_id"] == 1
    # an environment given explicitly wins over the group's
    explicit = create(foreman_sim, {"name": fqdn("explicit"), "hostgroup_id": 2, "environment_id": None}).json()
    assert explicit["environment_id"] is None and "puppet" in explicit


def test_a_created_host_is_owned_by_the_api_user(foreman_edge_sim: ForemanSim) -> None:
    admin_made = create(foreman_edge_sim, {"name": fqdn("own")}).json()
    assert (admin_made["owner_type"], admin_made["owner_name"]) == ("User", "Admin User")
    body = {"host": {"name": fqdn("own"), "location_id": 1, "organization_id": 1, "managed": False}}
    keeper = (KEEPER["login"], KEEPER["password"])
    made = requests.post(foreman_edge_sim.url + "/api/hosts", json=body, auth=keeper, timeout=10).json()
    assert (made["owner_type"], made["owner_name"]) == ("User", "Host Keeper")
    assert made["owner_id"] != admin_made["owner_id"]
    # an update by someone else keeps the owner
    updated = requests.put(f"{foreman_edge_sim.url}/api/hosts/{made['id']}", json={"host": {"comment": "x"}},
                           auth=foreman_edge_sim.auth, timeout=10).json()
    assert (updated["owner_id"], updated["owner_name"]) == (made["owner_id"], "Host Keeper")
    deleted = requests.delete(f"{foreman_edge_sim.url}/api/hosts/{made['id']}", auth=foreman_edge_sim.auth, timeout=10).json()
    assert (deleted["owner_id"], deleted["owner_type"]) == (made["owner_id"], "User")


def test_unknown_routes_are_rails_404s(foreman_sim: ForemanSim) -> None:
    accept_json = {"Accept": "application/json;version=2"}
    not_found = {"status": 404, "error": "Not Found"}
    for method, path in (("GET", "/api/nothing"), ("POST", "/api/hosts/1"), ("PATCH", "/api/hosts"),
                         ("GET", "/foreman_puppet/api/hosts/1/nothing")):
        response = requests.request(method, foreman_sim.url + path, headers=accept_json, auth=foreman_sim.auth, timeout=10)
        assert (response.status_code, response.json()) == (404, not_found), (method, path)
        assert "Foreman_version" not in response.headers
    # PATCH is update, as Rails' resources route it
    patched = requests.patch(f"{foreman_sim.url}/api/hosts/{create(foreman_sim, {'name': fqdn('patch')}).json()['id']}",
                             json={"host": {"comment": "patched"}}, auth=foreman_sim.auth, timeout=10)
    assert patched.status_code == 200 and patched.json()["comment"] == "patched"
    # routing comes before authentication and body parsing
    anonymous = requests.post(foreman_sim.url + "/api/hosts/1", data="{", headers={**accept_json, **JSON}, timeout=10)
    assert (anonymous.status_code, anonymous.json()) == (404, not_found)
    # a client that asks for no JSON gets Rails' static page
    page = requests.get(foreman_sim.url + "/api/nothing", headers={"Accept": "text/html"}, timeout=10)
    assert page.status_code == 404 and page.headers["Content-Type"].startswith("text/html")
