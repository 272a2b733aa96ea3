"""The applications' HTTPS API with real client certificates, and the OpenAPI documents both
listeners serve, checked against every response this test receives."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import signal
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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
        assert listed["next_cursor"] is None
        assert sorted(lab.vsphere_vms()) == ["demo-node-01", "demo-node-02"]
        # a page at a time: the cursor leads on, null on the last page; the maximum is enforced
        code, page = await app.call("GET", "/v1/hosts", params={"limit": "1"})
        assert code == 200 and len(page["hosts"]) == 1 and page["next_cursor"]
        code, last = await app.call("GET", "/v1/hosts", params={"limit": "1", "cursor": page["next_cursor"]})
        assert code == 200 and last["next_cursor"] is None
        assert [h["name"] for h in page["hosts"] + last["hosts"]] == [h["name"] for h in listed["hosts"]]
        for params, field in (({"limit": "1001"}, "limit"), ({"limit": "0"}, "limit"),
                              ({"cursor": "garbage"}, "cursor"), ({"state": "sleeping"}, "state")):
            code, error = await app.call("GET", "/v1/hosts", params=params)
            assert code == 422 and error["field"] == field, (params, error)

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
        # a gone host is listed only when asked for
        code, listed = await app.call("GET", "/v1/hosts")
        assert [h["name"] for h in listed["hosts"]] == ["demo-node-02"]
        code, listed = await app.call("GET", "/v1/hosts", params={"state": "gone"})
        assert [h["name"] for h in listed["hosts"]] == ["demo-node-01"]

        code, doc = await app.call("GET", "/openapi.json")
        assert code == 200
        code, metrics = await app.call("GET", "/metrics")
        assert code == 200 and 'governord_hosts{app="demo",provider="vsphere",role="node",state="ready"} 1.0' in metrics
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
            ("POST", "/v1/sweep", {"dry_run": True}), ("POST", "/v1/sweep", {"dry_run": "maybe"}),
            ("GET", "/metrics", None), ("GET", "/healthz", None),
            ("GET", "/v1/audit?limit=2", None), ("GET", "/v1/apps", None), ("GET", "/v1/hosts?limit=1001", None),
            ("GET", "/v1/requests?cursor=x", None),
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
    assert statuses[("GET", "/v1/hosts?limit=1001")] == 422 and statuses[("GET", "/v1/requests?cursor=x")] == 422
    sweeps = [(status, body) for m, p, status, body in SEEN if p == "/v1/sweep"]
    assert sweeps[0][0] == 200 and sweeps[0][1]["dry_run"] is True and sweeps[0][1]["findings"] == []
    assert sweeps[1][0] == 422 and sweeps[1][1]["field"] == "dry_run"
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


async def test_a_cap_holds_under_500_concurrent_https_requests(lab: Lab) -> None:
    """500 applications' requests for one host each, all at once over mTLS, against a cap of 10:
    exactly 10 are accepted, 490 declined with the reason, and exactly 10 machines appear.
    (The application's rate limit is raised above the burst: the cap is under test here.)"""
    config = lab.write_config()
    config.write_text(config.read_text() + "\n[applications.demo.rate_limit]\nrequests_per_second = 1000.0\n"
                      "burst = 1000\n")
    governord = lab.start_governord(config)
    try:
        await _five_hundred_at_once(lab, governord)
    finally:
        governord.stop()


async def _five_hundred_at_once(lab: Lab, governord: Governord) -> None:
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


# --- refusals in the TLS handshake, and a site CA with its CRL ------------------------------------

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


class MadeCA:
    """A CA made here with ``cryptography``: governord's own (loaded from its state directory)
    or a site's, issuing client certificates with any dates, and CRLs."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, directory: Path) -> None:
        self.cert, self.key, self.directory = cert, key, directory
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "ca.pem"
        self.path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    @classmethod
    def new(cls, name: str, directory: Path) -> MadeCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(NOW - DAY)
                .not_valid_after(NOW + 30 * DAY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(cert, key, directory)

    @classmethod
    def governords(cls, daemon: Governord, directory: Path) -> MadeCA:
        pki = daemon.state_dir / "pki"
        key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()), key, directory)

    def issue(self, cn: str, stem: str, *, not_before: datetime.datetime = NOW - DAY,
              not_after: datetime.datetime = NOW + 10 * DAY, more_cns: tuple[str, ...] = (),
              sans: list[x509.GeneralName] | None = None, serial: int | None = None) -> dict[str, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name) for name in (cn, *more_cns)])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(serial or x509.random_serial_number()).not_valid_before(not_before)
                   .not_valid_after(not_after)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return {"certificate": str(cert_path), "key": str(key_path), "serial": cert.serial_number,
                "subject": f"CN={cn}"}

    def write_crl(self, path: Path, revoked: list[int]) -> None:
        """Write a CRL revoking ``revoked`` to ``path`` the way a site would: a new file renamed
        over the old one."""
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(NOW - datetime.timedelta(minutes=5)).next_update(NOW + 7 * DAY))
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - datetime.timedelta(
                    minutes=1)).build())
        fresh = path.with_suffix(".new")
        fresh.write_bytes(builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        fresh.replace(path)


LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def log_records(daemon: Governord) -> list[dict[str, str]]:
    """governord's log lines, parsed from logfmt."""
    records = []
    for line in daemon.log.read_text(errors="replace").splitlines():
        if line.startswith("ts="):
            records.append({k: (json.loads(v) if v.startswith('"') else v) for k, v in LOGFMT.findall(line)})
    return records


def refusals(daemon: Governord, **match: str) -> list[dict[str, str]]:
    return [r for r in log_records(daemon)
            if r.get("msg", "").startswith("refused: ") and all(r.get(k) == v for k, v in match.items())]


def refusal_counts(metrics: str) -> dict[tuple[str, str], float]:
    found = re.findall(r'^governord_api_refusals_total\{reason="([^"]+)",stage="([^"]+)"\} (\S+)$', metrics, re.M)
    return {(reason, stage): float(value) for reason, stage, value in found}


async def _get(base: str, path: str, context: ssl.SSLContext) -> tuple[int, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        return await Client(session, base).call("GET", path)


async def _refused(base: str, ca: str, cert: dict[str, Any], version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> None:
    """A scale request with ``cert`` fails: the server ends the connection in the handshake.
    (A POST: aiohttp tries an idempotent request that lost its connection a second time.)"""
    context = _ssl(ca, cert["certificate"], cert["key"])
    context.maximum_version = version
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        with pytest.raises(aiohttp.ClientError):
            await Client(session, base).call("POST", "/v1/scale", json={"role": "node", "add": 1})


async def test_every_handshake_refusal_is_logged_with_its_reason_and_counted(
        lab: Lab, governord: Governord, tmp_path: Path) -> None:
    """Expired, not yet valid and foreign certificates fail in the TLS handshake: each is logged
    with the reason, OpenSSL's code, the peer and the certificate, counted by reason, and no
    request reaches the rules."""
    ca = str(governord.state_dir / "pki" / "ca.pem")
    base = f"https://127.0.0.1:{governord.api_port}"
    own = MadeCA.governords(governord, tmp_path / "own")
    foreign = MadeCA.new("foreign CA", tmp_path / "foreign")
    cases = {
        "expired": own.issue("demo", "expired", not_before=NOW - 10 * DAY, not_after=NOW - DAY),
        "not_yet_valid": own.issue("demo", "future", not_before=NOW + DAY, not_after=NOW + 10 * DAY),
        "unknown_ca": foreign.issue("demo", "foreign"),
    }
    words = {"expired": ("expired", 10), "not_yet_valid": ("not yet valid", 9), "unknown_ca": ("unknown CA", 20)}
    for reason, cert in cases.items():
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            await _refused(base, ca, cert, version)
        description, code = words[reason]
        found = wait_until(lambda r=reason: len(refusals(governord, reason=r)) == 2 and refusals(governord, reason=r),
                           20, what=f"{reason} refusals in the log")
        for record in found:
            assert record["msg"] == f"refused: {description}" and record["level"] == "warning", record
            assert record["stage"] == "handshake" and record["verify_code"] == str(code), record
            assert record["subject"] == "CN=demo" and record["serial"] == format(cert["serial"], "x"), record
            assert record["peer"].startswith("127.0.0.1:"), record
        assert found[0]["issuer"] == ("CN=foreign CA" if reason == "unknown_ca" else "CN=governord CA")

    # a client that speaks plain HTTP to the TLS port is refused too, at info level
    reader, writer = await asyncio.open_connection("127.0.0.1", governord.api_port)
    writer.write(b"GET /v1/hosts HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await reader.read()
    writer.close()
    [plain] = wait_until(lambda: refusals(governord, reason="handshake_failed"), 20, what="plain HTTP refusal")
    assert plain["level"] == "info" and plain["error"] == "HTTP_REQUEST" and "verify_code" not in plain

    # the application's own certificate still works, and the counts name the reasons
    issued = governord.ctl_json("apps", "register", "demo")
    code, _ = await _get(base, "/v1/hosts", _ssl(ca, issued["certificate"], issued["key"]))
    assert code == 200
    code, metrics = await _get(base, "/metrics", _ssl(ca))
    assert refusal_counts(metrics) == {("expired", "handshake"): 2.0, ("not_yet_valid", "handshake"): 2.0,
                                       ("unknown_ca", "handshake"): 2.0, ("handshake_failed", "handshake"): 1.0}
    assert governord.ctl_json("requests", "list") == []  # nothing reached the rules
    assert governord.ctl_json("hosts", "list") == []


def _site_config(lab: Lab, site: MadeCA, crl: Path) -> Path:
    config = lab.write_config()
    config.write_text(config.read_text() + f"""
[api.tls]
client_ca = "{site.path}"
client_crl = "{crl}"
""")
    return config


async def test_a_site_ca_and_its_crl_reloaded_without_a_restart(lab: Lab, tmp_path: Path) -> None:
    """Applications' certificates from a site CA, checked against its CRL: a revocation applies
    to new connections (refused in the handshake) and to connections already open (refused per
    request) as soon as the file changes; a bad CRL is logged and the old one stays; SIGHUP
    re-reads it."""
    site = MadeCA.new("Site CA", tmp_path / "site")
    crl = tmp_path / "site" / "site.crl"
    site.write_crl(crl, [])
    keep, revoke = site.issue("demo", "keep"), site.issue("demo", "revoke")
    daemon = lab.start_governord(_site_config(lab, site, crl))
    try:
        ca = str(daemon.state_dir / "pki" / "ca.pem")
        base = f"https://127.0.0.1:{daemon.api_port}"
        assert (await _get(base, "/v1/hosts", _ssl(ca, keep["certificate"], keep["key"])))[0] == 200
        # governord's own CA is not trusted for clients once a site CA is
        own = daemon.ctl_json("apps", "register", "demo")
        await _refused(base, ca, own)
        wait_until(lambda: refusals(daemon, reason="unknown_ca"), 20, what="governord's CA refused")

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                ssl=_ssl(ca, revoke["certificate"], revoke["key"]))) as open_session:
            held = Client(open_session, base)
            assert (await held.call("GET", "/v1/hosts"))[0] == 200  # a kept-alive connection

            site.write_crl(crl, [revoke["serial"]])
            await _refused(base, ca, revoke)  # a new connection: refused in the handshake
            [handshake] = wait_until(lambda: refusals(daemon, reason="revoked_by_crl", stage="handshake"), 20,
                                     what="the handshake refusal")
            assert handshake["msg"] == "refused: revoked by CRL" and handshake["verify_code"] == "23"
            assert handshake["serial"] == format(revoke["serial"], "x") and handshake["issuer"] == "CN=Site CA"
            code, error = await held.call("GET", "/v1/hosts")  # the open connection: refused per request
            assert code == 403 and "revoked by its CA's CRL" in error["error"]
            assert refusals(daemon, reason="revoked_by_crl", stage="request")
            assert any(r["msg"] == "CRL reloaded" and r["why"] == "the file changed" for r in log_records(daemon))
        assert (await _get(base, "/v1/hosts", _ssl(ca, keep["certificate"], keep["key"])))[0] == 200

        # a broken CRL: logged, the previous one stays in force
        crl.write_text("-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n")
        assert (await _get(base, "/v1/hosts", _ssl(ca, keep["certificate"], keep["key"])))[0] == 200
        await _refused(base, ca, revoke)
        [kept] = [r for r in log_records(daemon) if r["msg"].startswith("CRL not reloaded")]
        assert kept["level"] == "error" and kept["key"] == "api.tls.client_crl" and kept["file"] == str(crl)
        # ... also on SIGHUP, which refuses the reload naming the key and the file
        daemon.signal(signal.SIGHUP)
        refused = wait_until(lambda: [r for r in log_records(daemon) if r["msg"].startswith("reload refused")],
                             20, what="the refused reload")
        assert "api.tls.client_crl" in refused[0]["msg"] and str(crl) in refused[0]["msg"]

        # the revocation withdrawn, then SIGHUP: the CRL is read again and the certificate works
        site.write_crl(crl, [])
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: any(r["msg"] == "CRL reloaded" and r["why"] == "SIGHUP" for r in log_records(daemon)), 20,
                   what="the CRL reloaded on SIGHUP")
        assert (await _get(base, "/v1/hosts", _ssl(ca, revoke["certificate"], revoke["key"])))[0] == 200
        code, metrics = await _get(base, "/metrics", _ssl(ca))
        counts = refusal_counts(metrics)
        assert counts[("revoked_by_crl", "handshake")] == 2.0 and counts[("revoked_by_crl", "request")] == 1.0
    finally:
        daemon.stop()


@pytest.mark.parametrize("problem", ["garbage", "foreign", "missing", "no client_ca"])
def test_a_bad_crl_stops_the_start_naming_file_and_key(lab: Lab, tmp_path: Path, problem: str) -> None:
    site = MadeCA.new("Site CA", tmp_path / "site")
    crl = tmp_path / "site" / "site.crl"
    if problem == "garbage":
        crl.write_text("not a CRL\n")
    elif problem == "foreign":
        MadeCA.new("Site CA", tmp_path / "impostor").write_crl(crl, [])  # same name, another key
    elif problem == "no client_ca":
        site.write_crl(crl, [])
    config = _site_config(lab, site, crl)
    if problem == "no client_ca":
        config.write_text(config.read_text().replace(f'client_ca = "{site.path}"\n', ""))
    daemon = lab.start_governord(config, wait_ready=False)
    assert daemon.process.wait(60) == 2
    daemon.stop()
    message = daemon.log.read_text()
    assert f"{config}: api.tls.client_crl: " in message
    expected = {"garbage": f"{crl} holds no PEM CRL", "foreign": "its signature does not verify",
                "missing": f"cannot read CRL file {crl}", "no client_ca": "needs the site CA"}[problem]
    assert expected in message, message
    assert not (daemon.state_dir / "governord.db").exists()  # nothing written


# --- which certificate field names the application, and revoking a site CA's certificates ---------


def _identity_config(lab: Lab, site: MadeCA, crl: Path, identity: str, demo_identity: str | None) -> Path:
    config = _site_config(lab, site, crl)
    text = config.read_text().replace("[api.tls]\n", f'[api.tls]\nidentity = "{identity}"\n')
    if demo_identity is not None:
        text = text.replace("[applications.demo]\n", f'[applications.demo]\ncertificate_identity = "{demo_identity}"\n')
    config.write_text(text)
    return config


async def _status(base: str, ca: str, cert: dict[str, Any]) -> tuple[int, Any]:
    return await _get(base, "/v1/hosts", _ssl(ca, cert["certificate"], cert["key"]))


async def test_the_identity_is_one_cn_never_the_first_of_several(lab: Lab, tmp_path: Path) -> None:
    site = MadeCA.new("Site CA", tmp_path / "site")
    crl = tmp_path / "site" / "site.crl"
    site.write_crl(crl, [])
    one = site.issue("demo", "one")
    two = site.issue("demo", "two-cns", more_cns=("admin",))  # the first CN is demo's
    daemon = lab.start_governord(_identity_config(lab, site, crl, "cn", None))
    try:
        ca, base = str(daemon.state_dir / "pki" / "ca.pem"), f"https://127.0.0.1:{daemon.api_port}"
        assert (await _status(base, ca, one))[0] == 200
        code, error = await _status(base, ca, two)
        assert code == 403 and "has 2 common names" in error["error"], error
        [refusal] = refusals(daemon, reason="ambiguous_identity")
        assert refusal["serial"] == format(two["serial"], "x")
    finally:
        daemon.stop()


async def test_a_san_uri_identifies_the_application(lab: Lab, tmp_path: Path) -> None:
    """api.tls.identity = "san-uri": the application is the one URI SAN (a SPIFFE ID), whatever
    the CN says; none, two, or another application's URI are refused."""
    spiffe = "spiffe://lab.example/ns/demo/sa/autoscaler"
    site = MadeCA.new("Site CA", tmp_path / "site")
    crl = tmp_path / "site" / "site.crl"
    site.write_crl(crl, [])
    uri = x509.UniformResourceIdentifier
    good = site.issue("anything", "good", sans=[uri(spiffe), x509.DNSName("demo.lab.example")])
    cn_only = site.issue("demo", "cn-only")
    two = site.issue("demo", "two", sans=[uri(spiffe), uri("spiffe://lab.example/ns/other/sa/x")])
    other = site.issue("demo", "other", sans=[uri("spiffe://lab.example/ns/demo/sa/someone-else")])
    daemon = lab.start_governord(_identity_config(lab, site, crl, "san-uri", spiffe))
    try:
        ca, base = str(daemon.state_dir / "pki" / "ca.pem"), f"https://127.0.0.1:{daemon.api_port}"
        assert (await _status(base, ca, good))[0] == 200
        code, error = await _status(base, ca, cn_only)
        assert code == 403 and "has no URI subject alternative name" in error["error"], error
        code, error = await _status(base, ca, two)
        assert code == 403 and "has 2 URI subject alternative names" in error["error"], error
        code, error = await _status(base, ca, other)
        assert code == 403 and "does not belong to a configured application" in error["error"], error
        assert len(refusals(daemon, reason="no_identity")) == len(refusals(daemon, reason="ambiguous_identity")) == 1
        # governord's own CA puts the URI in what it issues (here not trusted: a site CA is)
        issued = daemon.ctl_json("apps", "register", "demo")
        cert = x509.load_pem_x509_certificate(Path(issued["certificate"]).read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe]
    finally:
        daemon.stop()


async def test_revoking_a_site_ca_certificate_by_issuer_and_serial(lab: Lab, tmp_path: Path) -> None:
    """`apps revoke demo --serial S` denies a site CA's certificate at once (new connections and
    open ones), and only that CA's: a certificate of governord's CA with the same serial, revoked
    before, does not make the site's refused, nor the other way round."""
    site = MadeCA.new("Site CA", tmp_path / "site")
    crl = tmp_path / "site" / "site.crl"
    site.write_crl(crl, [])
    daemon = lab.start_governord(_identity_config(lab, site, crl, "cn", None))
    try:
        ca, base = str(daemon.state_dir / "pki" / "ca.pem"), f"https://127.0.0.1:{daemon.api_port}"
        # governord's own certificate, revoked; a site certificate with the very same serial
        own = daemon.ctl_json("apps", "register", "demo")
        assert daemon.ctl_json("apps", "revoke", "demo", "--serial", own["serial"]) == {
            "app": "demo", "revoked": [own["serial"]], "issuer": "CN=governord CA"}
        twin = site.issue("demo", "twin", serial=int(own["serial"], 16))
        keep, revoke = site.issue("demo", "keep"), site.issue("demo", "revoke")
        assert (await _status(base, ca, twin))[0] == 200  # another issuer's serial

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                ssl=_ssl(ca, revoke["certificate"], revoke["key"]))) as open_session:
            held = Client(open_session, base)
            assert (await held.call("GET", "/v1/hosts"))[0] == 200
            serial = format(revoke["serial"], "X")
            colons = ":".join(serial.rjust(len(serial) + len(serial) % 2, "0")[i:i + 2]
                              for i in range(0, len(serial) + len(serial) % 2, 2))
            done = daemon.ctl_json("apps", "revoke", "demo", "--serial", colons)  # as openssl prints it
            assert done == {"app": "demo", "revoked": [format(revoke["serial"], "x")], "issuer": "CN=Site CA"}
            code, error = await held.call("GET", "/v1/hosts")  # the open connection, at its next request
            assert code == 403 and "is revoked" in error["error"]
        code, error = await _status(base, ca, revoke)  # a new one
        assert code == 403 and "is revoked" in error["error"]
        assert (await _status(base, ca, keep))[0] == 200 and (await _status(base, ca, twin))[0] == 200
        [refusal] = [r for r in refusals(daemon, reason="revoked") if r["serial"] == format(revoke["serial"], "x")][:1]
        assert refusal["issuer"] == "CN=Site CA"

        # shown, refused twice, and a wrong issuer is named
        shown = daemon.ctl_json("apps", "show", "demo")
        assert [(r["serial"], r["issuer"]) for r in shown["site_revocations"]] == [
            (format(revoke["serial"], "x"), "CN=Site CA")]
        again = daemon.ctl("apps", "revoke", "demo", "--serial", format(revoke["serial"], "x"), check=False)
        assert again.returncode == 1 and "revoked already" in again.stderr
        wrong = daemon.ctl("apps", "revoke", "demo", "--serial", "1234", "--issuer", "CN=Nobody", check=False)
        assert wrong.returncode == 1 and "'CN=Nobody' is no CA of api.tls.client_ca (CN=Site CA)" in wrong.stderr
        events = [e for e in daemon.ctl_json("audit", "--kind", "certificate-revoked")]
        assert {e["detail"]["issuer"] for e in events} == {"CN=governord CA", "CN=Site CA"}
    finally:
        daemon.stop()
