"""The applications' HTTPS API with real client certificates, and the OpenAPI documents both
listeners serve, checked against every response this test receives."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

from governord.api import admin_api, app_api
from governord.pki import CertificateAuthority
from lab.stack import Governord, Lab

from .conftest import wait_until

SEEN: list[tuple[str, str, int, Any]] = []


def _template_of(doc: dict[str, Any], method: str, path: str) -> str:
    for template in doc["paths"]:
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path.split("?")[0]) and method.lower() in doc["paths"][template]:
            return template
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


def _check_against(doc: dict[str, Any], method: str, path: str, status: int, body: Any) -> None:
    operation = doc["paths"][_template_of(doc, method, path)][method.lower()]
    assert str(status) in operation["responses"], f"{method} {path} answered {status}, not documented"
    content = operation["responses"][str(status)].get("content", {})
    if "application/json" in content:
        schema = {**content["application/json"]["schema"], "components": doc["components"]}
        jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.session.request(method, self.base + path, **kwargs) as resp:
            text = await resp.text()
            body = json.loads(text) if resp.content_type == "application/json" else text
            SEEN.append((method, path, resp.status, body))
            return resp.status, body


def _ssl(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if cert and key:
        context.load_cert_chain(cert, key)
    return context


async def _wait_request(client: Client, request_id: str, status: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        code, body = await client.call("GET", f"/v1/requests/{request_id}")
        assert code == 200
        if body["status"] == status:
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.3)


async def test_application_api_over_mtls(lab: Lab, governord: Governord, tmp_path: Path) -> None:
    issued = governord.ctl_json("apps", "register", "demo")
    assert Path(issued["key"]).stat().st_mode & 0o777 == 0o600
    ca = issued["ca"]
    base = f"https://127.0.0.1:{governord.api_port}"
    SEEN.clear()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_ssl(ca, issued["certificate"],
                                                                             issued["key"]))) as session:
        app = Client(session, base)
        code, first = await app.call("POST", "/v1/scale", json={"role": "node", "add": 2, "idempotency_key": "k-1"})
        assert code == 202 and first["decision"] == "accepted" and len(first["hosts"]) == 2
        code, again = await app.call("POST", "/v1/scale", json={"role": "node", "add": 2, "idempotency_key": "k-1"})
        assert code == 200 and again["id"] == first["id"]
        done = await _wait_request(app, first["id"], "completed")
        assert {h["state"] for h in done["hosts"]} == {"ready"}
        code, listed = await app.call("GET", "/v1/hosts")
        assert code == 200 and sorted(h["name"] for h in listed["hosts"]) == ["demo-node-01", "demo-node-02"]
        assert sorted(lab.vsphere_vms()) == ["demo-node-01", "demo-node-02"]

        # a declined request says why
        code, declined = await app.call("POST", "/v1/scale", json={"role": "node", "add": 20})
        assert code == 409 and declined["decision"] == "declined" and "cap reached" in declined["reason"]

        # bad requests: 4xx naming the field
        cases = [
            ({"role": "node", "add": 0}, 422, "add"),
            ({"role": "node", "add": 1, "colour": "red"}, 422, "colour"),
            ({"role": "nope", "add": 1}, 422, "role"),
            ({"role": "node"}, 422, "add"),
            ({"role": "../x", "add": 1}, 422, "role"),
        ]
        for body, status, field in cases:
            code, error = await app.call("POST", "/v1/scale", json=body)
            assert code == status, (body, error)
            assert error["field"] == field, (body, error)
        code, error = await app.call("POST", "/v1/scale", data=b"{not json", headers={"Content-Type":
                                                                                       "application/json"})
        assert code == 400 and "not valid JSON" in error["error"]
        code, error = await app.call("POST", "/v1/scale", data=b"role=node", headers={"Content-Type": "text/plain"})
        assert code == 415
        code, error = await app.call("POST", "/v1/scale", data=b"x" * 70000,
                                     headers={"Content-Type": "application/json"})
        assert code == 413
        code, error = await app.call("GET", "/v1/requests/does-not-exist")
        assert code == 404

        # hand one back, named
        code, released = await app.call("POST", "/v1/release", json={"hosts": ["demo-node-01"]})
        assert code == 202
        await _wait_request(app, released["id"], "completed")
        assert sorted(lab.vsphere_vms()) == ["demo-node-02"]
        assert "demo-node-01.lab.example" not in lab.foreman_hosts()
        code, error = await app.call("POST", "/v1/release", json={"hosts": ["someone-else"]})
        assert code == 404 and error["field"] == "hosts"

        code, doc = await app.call("GET", "/openapi.json")
        assert code == 200
        code, metrics = await app.call("GET", "/metrics")
        assert code == 200 and 'governord_hosts{state="ready"} 1.0' in metrics
        code, health = await app.call("GET", "/healthz")
        assert code == 200

    # without a certificate: the API refuses, health and metrics answer
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_ssl(ca))) as session:
        anonymous = Client(session, base)
        code, error = await anonymous.call("GET", "/v1/hosts")
        assert code == 401 and "client certificate" in error["error"]
        assert (await anonymous.call("GET", "/healthz"))[0] == 200

    # a certificate from governord's CA for a name that is no application
    stranger = CertificateAuthority(governord.state_dir / "pki").issue("intruder", stem="intruder")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            ssl=_ssl(ca, str(stranger.certificate), str(stranger.key)))) as session:
        code, error = await Client(session, base).call("GET", "/v1/hosts")
        assert code == 403 and "intruder" in error["error"]

    # a certificate from another CA is refused in the TLS handshake
    other = CertificateAuthority(tmp_path / "other-ca")
    other.ensure()
    forged = other.issue("demo", stem="demo")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            ssl=_ssl(ca, str(forged.certificate), str(forged.key)))) as session:
        with pytest.raises(aiohttp.ClientError):
            await Client(session, base).call("GET", "/v1/hosts")

    # every response above is what the served OpenAPI document says
    assert doc == app_api.endpoints.openapi()
    for method, path, status, body in SEEN:
        _check_against(doc, method, path, status, body)
    log = governord.log.read_text()
    assert "refused: no client certificate" in log and "refused: unknown application certificate" in log


async def test_admin_api_answers_as_its_openapi_document_says(lab: Lab, governord: Governord) -> None:
    governord.ctl("scale", "demo", "node", "--add", "1", "--wait")
    SEEN.clear()
    connector = aiohttp.UnixConnector(path=str(governord.socket))
    async with aiohttp.ClientSession(connector=connector) as session:
        admin = Client(session, "http://governord")
        _, doc = await admin.call("GET", "/openapi.json")
        calls = [
            ("GET", "/v1/status", None), ("GET", "/v1/plugins", None), ("GET", "/v1/hosts", None),
            ("GET", "/v1/hosts/demo-node-01", None), ("GET", "/v1/hosts/nope", None),
            ("GET", "/v1/hosts/demo-node-01/events", None), ("GET", "/v1/requests", None),
            ("POST", "/v1/hosts/demo-node-01/tags", {"add": ["broker"]}),
            ("POST", "/v1/hosts/demo-node-01/tags", {"add": ["nonesuch"]}),
            ("POST", "/v1/hosts/demo-node-01/tags", {}),
            ("POST", "/v1/hosts/demo-node-01/retry", None),
            ("POST", "/v1/apps/demo/scale", {"role": "node", "count": 1}),
            ("POST", "/v1/apps/nope/scale", {"role": "node", "add": 1}),
            ("POST", "/v1/apps/demo/certificate", None),
            ("GET", "/metrics", None), ("GET", "/healthz", None),
        ]
        for method, path, body in calls:
            await admin.call(method, path, json=body) if body is not None else await admin.call(method, path)
        plugins = {p["name"]: p for p in SEEN[2][3]["plugins"]}
        assert plugins["vsphere"]["loaded"] and "governord_register_providers" in plugins["vsphere"]["hooks"]
        assert "governord_register_host" in plugins["registrar:foreman"]["hooks"]
    assert doc == admin_api.endpoints.openapi()
    statuses = {(m, p): s for m, p, s, _ in SEEN}
    assert statuses[("GET", "/v1/hosts/nope")] == 404
    assert statuses[("POST", "/v1/hosts/demo-node-01/retry")] == 409
    assert statuses[("POST", "/v1/apps/nope/scale")] == 404
    for method, path, status, body in SEEN:
        _check_against(doc, method, path, status, body)


def test_every_route_is_documented() -> None:
    """The aiohttp routers and the OpenAPI documents list the same operations."""
    from aiohttp import web

    for module in (app_api, admin_api):
        application = web.Application()
        module.endpoints.install(application)
        routes = {(r.method, r.resource.canonical) for r in application.router.routes()  # type: ignore[union-attr]
                  if r.method != "HEAD"}
        doc = module.endpoints.openapi()
        documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
        assert routes == documented


async def test_a_cap_holds_under_500_concurrent_https_requests(lab: Lab, governord: Governord) -> None:
    """500 applications' requests for one host each, all at once over mTLS, against a cap of 10:
    exactly 10 are accepted, 490 declined with the reason, and exactly 10 machines appear."""
    issued = governord.ctl_json("apps", "register", "demo")
    context = _ssl(issued["ca"], issued["certificate"], issued["key"])
    base = f"https://127.0.0.1:{governord.api_port}"
    start = asyncio.Event()

    async def one(session: aiohttp.ClientSession, n: int) -> tuple[int, dict[str, Any]]:
        await start.wait()
        async with session.post(f"{base}/v1/scale", json={"role": "node", "add": 1,
                                                           "idempotency_key": f"burst-{n}"}) as resp:
            return resp.status, await resp.json()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=200)) as session:
        tasks = [asyncio.create_task(one(session, n)) for n in range(500)]
        start.set()
        results = await asyncio.gather(*tasks)
    statuses = [status for status, _ in results]
    assert statuses.count(202) == 10 and statuses.count(409) == 490, sorted(set(statuses))
    assert all("cap reached" in body["reason"] for status, body in results if status == 409)
    hosts = governord.ctl_json("hosts", "list")
    assert len(hosts) == 10 and len({h["name"] for h in hosts}) == 10
    wait_until(lambda: len(lab.vsphere_vms()) == 10, 180, what="ten VMs")
    assert len(lab.vsphere_vms()) == 10



async def test_a_revoked_certificate_is_refused_at_once(lab: Lab, governord: Governord) -> None:
    first = governord.ctl_json("apps", "register", "demo")
    base = f"https://127.0.0.1:{governord.api_port}"

    async def status_with(cert: dict[str, Any]) -> int:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                ssl=_ssl(cert["ca"], cert["certificate"], cert["key"]))) as session:
            code, _ = await Client(session, base).call("GET", "/v1/hosts")
            return code

    assert await status_with(first) == 200
    rotated = governord.ctl_json("apps", "rotate", "demo")
    assert rotated["revoked"] == [first["serial"]]
    assert await status_with(first) == 403  # no restart: the next request is refused
    assert await status_with(rotated) == 200
    revoked = governord.ctl_json("apps", "revoke", "demo")
    assert revoked["revoked"] == [rotated["serial"]]
    assert await status_with(rotated) == 403
    [app] = [a for a in governord.ctl_json("apps", "list") if a["name"] == "demo"]
    assert len(app["certificates"]) == 2 and all(c["revoked_at"] for c in app["certificates"])
    assert "refused: revoked certificate" in governord.log.read_text()
