"""Regression tests for what fuzzing the APIs found (tests/system/test_fuzz.py), each on the
real aiohttp application from the app factory with the real store: a bad request is refused
with the documented status and names its field, and the OpenAPI documents say what the
server enforces."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
import yarl
from hypothesis import given, settings
from hypothesis import strategies as st

from governord.api import admin_api, app_api, schemas
from governord.rules import RequestError
from governord.runtime import Runtime

DOCS = {"app": app_api.endpoints.openapi(), "admin": admin_api.endpoints.openapi()}


def _body_schema(doc: dict[str, Any], path: str, method: str = "post") -> dict[str, Any]:
    ref = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return {**ref, "components": doc["components"]}


def _valid(doc: str, path: str, body: Any) -> bool:
    return jsonschema.Draft202012Validator(_body_schema(DOCS[doc], path)).is_valid(body)


@pytest.fixture
async def admin(runtime: Runtime, aiohttp_client: Callable[..., Any]) -> Any:
    return await aiohttp_client(admin_api.create_admin_api(runtime))


@pytest.fixture
async def app(runtime: Runtime, aiohttp_client: Callable[..., Any]) -> Any:
    return await aiohttp_client(app_api.create_app_api(runtime))


async def test_a_wrong_method_is_405_with_allow_and_a_json_body(admin: Any, app: Any) -> None:
    """RFC 9110: a 405 lists the allowed methods (the error middleware used to drop Allow)."""
    for client, path in ((admin, "/v1/status"), (admin, "/v1/apps/demo/scale"), (app, "/healthz")):
        resp = await client.request("TRACE", path)
        assert resp.status == 405
        assert resp.headers["Allow"], path
        assert (await resp.json())["error"] == "Method Not Allowed"


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/apps/{app}/scale", {"role": "node"}),
    ("/v1/apps/{app}/scale", {"role": "node", "add": 1, "count": 1}),
    ("/v1/apps/{app}/scale", {"role": "node", "add": None, "count": None}),
    ("/v1/apps/{app}/plan", {"role": "node"}),
    ("/v1/apps/{app}/release", {}),
    ("/v1/apps/{app}/release", {"hosts": ["a"], "count": 1}),
    ("/v1/hosts/{host}/tags", {}),
    ("/v1/hosts/{host}/tags", {"add": [], "remove": []}),
])
async def test_cross_field_rules_are_in_the_document_and_name_a_field(admin: Any, path: str,
                                                                     body: dict[str, Any]) -> None:
    """A body the model refuses is one the document calls invalid, and the 422 names a field."""
    assert not _valid("admin", path, body)
    resp = await admin.post(path.format(app="demo", host="h1.lab.example"), json=body)
    assert resp.status == 422
    assert (await resp.json())["field"] in {"add", "hosts"}


@pytest.mark.parametrize(("doc", "path", "body"), [
    ("admin", "/v1/apps/{app}/scale", {"role": "node", "count": 2}),
    ("admin", "/v1/apps/{app}/scale", {"role": "node", "add": 1, "count": None}),
    ("admin", "/v1/apps/{app}/release", {"count": 1, "hosts": None}),
    ("admin", "/v1/hosts/{host}/tags", {"remove": ["node"]}),
    ("app", "/v1/scale", {"role": "node", "add": 1}),
])
def test_what_the_model_takes_the_document_takes(doc: str, path: str, body: dict[str, Any]) -> None:
    assert _valid(doc, path, body)


@pytest.mark.parametrize("raw", [b"[1, 2]", b"null", b"3", b'"role"'])
async def test_a_json_body_that_is_no_object_is_400(admin: Any, raw: bytes) -> None:
    resp = await admin.post("/v1/apps/demo/scale", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert await resp.json() == {"error": f"body must be a JSON object, not {type(json.loads(raw)).__name__}",
                                 "field": None}


async def test_an_unknown_field_with_an_empty_name_is_named(admin: Any) -> None:
    resp = await admin.post("/v1/apps/demo/scale", json={"role": "node", "add": 1, "": 1})
    assert resp.status == 422
    assert await resp.json() == {"error": "'': unknown field", "field": ""}


@pytest.mark.parametrize("limit", ["many", "1_000", " 5", "٣", "1.5", ""])
async def test_audit_limit_is_an_integer_as_documented(admin: Any, limit: str) -> None:
    [param] = [p for p in DOCS["admin"]["paths"]["/v1/audit"]["get"]["parameters"] if p["name"] == "limit"]
    assert param["schema"]["type"] == "integer"
    assert "422" in DOCS["admin"]["paths"]["/v1/audit"]["get"]["responses"]
    resp = await admin.get("/v1/audit", params={"limit": limit})
    assert resp.status == 422 and (await resp.json())["field"] == "limit"


async def test_audit_limit_out_of_range_is_refused_naming_it(admin: Any) -> None:
    """The most one page holds is a maximum, not a suggestion (it used to be clamped)."""
    [param] = [p for p in DOCS["admin"]["paths"]["/v1/audit"]["get"]["parameters"] if p["name"] == "limit"]
    for limit in ("0", "-3", str(param["schema"]["maximum"] + 1), "999999", "1788222863226449518595924694138880",
                  "-" + "9" * 5000):
        resp = await admin.get("/v1/audit", params={"limit": limit})
        assert resp.status == 422 and (await resp.json())["field"] == "limit", limit
    assert (await admin.get("/v1/audit", params={"limit": str(param["schema"]["maximum"])})).status == 200


@pytest.mark.parametrize("url", [
    "http://\x15host/cb",       # a control character
    "http://ho\u0085st/cb",     # Unicode whitespace JSON Schema's \\s and pydantic's disagreed on
    "http:///cb",               # no host
    "http://host:99999/cb",     # a port no client can connect to (the notifier raised on it)
    "http://host:0/cb",
    "http://h\u00e9st/cb",      # not ASCII
    "ftp://host/cb",
])
async def test_a_callback_url_no_client_can_send_to_is_refused(admin: Any, url: str) -> None:
    resp = await admin.post("/v1/apps/demo/scale", json={"role": "node", "add": 1, "callback_url": url})
    assert resp.status == 422 and (await resp.json())["field"] == "callback_url"
    assert not _valid("admin", "/v1/apps/{app}/scale", {"role": "node", "add": 1, "callback_url": url})


@settings(max_examples=300, deadline=None)
@given(url=st.from_regex(schemas.CALLBACK_URL, fullmatch=True))
def test_every_url_the_document_allows_can_be_sent_to(url: str) -> None:
    parsed = yarl.URL(url)  # raises on what aiohttp could not send to
    assert parsed.scheme in ("http", "https") and parsed.host and 1 <= (parsed.port or 0) <= 65535
    assert _valid("app", "/v1/scale", {"role": "node", "add": 1, "callback_url": url})


def test_the_webhook_is_documented_as_signed_not_under_mtls() -> None:
    op = DOCS["app"]["paths"]["/v1/webhooks/openshift"]["post"]
    assert "security" not in op and "403" not in op["responses"]
    headers = {p["name"] for p in op["parameters"] if p["in"] == "header" and p["required"]}
    assert headers == {"Governord-Application", "Governord-Delivery", "Governord-Timestamp", "Governord-Signature"}
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/DeployEvent"}
    assert {"401", "413", "415", "422"} <= set(op["responses"])
    # an unknown application is refused as a bad signature (401), never 404: a 404 is only for a
    # drained event (signed, so from the application itself) naming a host it does not have
    assert "404" in op["responses"] and "drained" in op["summary"]
    scale = DOCS["app"]["paths"]["/v1/scale"]["post"]
    assert scale["security"] == [{"applicationCertificate": []}]


@pytest.mark.parametrize(("version", "field"), [("v2", "pod"), ("v2", "deployment"), ("v4", "branch"),
                                                ("v4", "gear_uuid")])
def test_the_event_document_says_which_generation_sends_which_field(version: str, field: str) -> None:
    event = {"event": "deploy", "openshift_version": version, "app": "a", "namespace": "n", field: "x-1"}
    assert not jsonschema.Draft202012Validator(_body_schema(DOCS["app"], "/v1/webhooks/openshift")).is_valid(event)


async def test_a_used_idempotency_key_is_refused_for_another_request(runtime: Runtime) -> None:
    """IETF Idempotency-Key draft: the same key with another request is 422, never answered
    with the first request's outcome; the same request again is the first outcome."""
    first = await runtime.governor.scale("demo", "node", add=1, actor="t", idempotency_key="k")
    again = await runtime.governor.scale("demo", "node", add=1, actor="t", idempotency_key="k")
    assert again.replayed and again.request["id"] == first.request["id"]
    for attempt in (
        runtime.governor.scale("demo", "node", add=2, actor="t", idempotency_key="k"),
        runtime.governor.scale("demo", "node", count=1, actor="t", idempotency_key="k"),
        runtime.governor.release("demo", count=1, actor="t", idempotency_key="k"),
    ):
        with pytest.raises(RequestError) as info:
            await attempt
        assert (info.value.status, info.value.field) == (422, "idempotency_key")
    assert len(await runtime.store.list_requests(app="demo")) == 1


async def test_a_fingerprint_decides_whether_a_delivery_is_the_same(runtime: Runtime) -> None:
    first = await runtime.governor.scale("demo", "node", add=1, actor="t", idempotency_key="w", fingerprint="sha256:a")
    same = await runtime.governor.scale("demo", "node", add=1, actor="t", idempotency_key="w", fingerprint="sha256:a")
    assert same.replayed and same.request["id"] == first.request["id"]
    with pytest.raises(RequestError, match="was used for another request"):
        await runtime.governor.scale("demo", "node", add=1, actor="t", idempotency_key="w", fingerprint="sha256:b")


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/apps/{app}/scale", {"role": "node", "add": 1, "idempotency_key": "k\x00"}, "idempotency_key"),
    ("/v1/apps/{app}/release", {"count": 1, "idempotency_key": "line\nbreak"}, "idempotency_key"),
    ("/v1/apps/{app}/release", {"hosts": ["demo-node-01\x00"]}, "hosts.0"),
    ("/v1/requests/{request_id}/deny", {"comment": "no\x00"}, "comment"),
])
async def test_stored_text_has_no_control_characters(admin: Any, path: str, body: dict[str, Any], field: str) -> None:
    """What a client chooses and the store keeps holds no NUL or control character (PostgreSQL
    refuses NUL in text and JSON): refused up front, as the document says."""
    assert not _valid("admin", path, body)
    resp = await admin.post(path.format(app="demo", request_id="r-1"), json=body)
    assert resp.status == 422 and (await resp.json())["field"] == field
    assert _valid("admin", "/v1/requests/{request_id}/deny", {"comment": "two\tlines\r\nof reasons"})
