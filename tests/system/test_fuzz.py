"""Fuzzing both HTTP APIs of the running daemon from their OpenAPI documents (schemathesis):
the applications' API over mTLS with the application's certificate, the webhook beside it
(every delivery sent as generated, then again signed with the application's secret, so the
fuzz reaches the event's validation, the rules and the replay check), and the operators' API on
its Unix socket. The documents are made from the code that serves them (schemathesis's pytest
fixture loader does not work with pytest 9.2), and the first test checks that the daemon serves
exactly those.

Every response is checked by schemathesis's checks (no 5xx; status code, content type, headers
and body as documented; schema-invalid data refused; a 405 lists the allowed methods) and by
two of the project's: a refusal says why and a 422 names its field; a schema-valid request is
taken or refused only for what a document cannot say (credentials, no such thing, the rules,
a used idempotency key or delivery id, a host to adopt), which replaces schemathesis's
positive_data_acceptance. The daemon is the real process against the lab's peers (vcsim and
the Foreman and Satellite simulators), so schema-valid scale requests really make and release
machines. Afterwards the daemon is still up, answers on both listeners, logged no handler
failure or traceback, and still provisions a host end to end.

Schema-valid data is steered to this deployment where validity depends on the configuration:
a body's ``role`` becomes the configured role, tag names become configured tags, and an
operator's ``app`` becomes the configured application (except for the certificate operations,
which would revoke the certificate the application fuzz uses). Everything else is as generated.

Length: ``GOVERNORD_FUZZ_EXAMPLES`` (default 15) examples per operation, in both generation
modes, on top of schemathesis's examples and coverage phases; ``make test`` runs the default in
about a minute. To fuzz for longer, and with a fixed seed to reproduce a run::

    GOVERNORD_FUZZ_EXAMPLES=1000 .venv/bin/python -m pytest tests/system/test_fuzz.py \\
        --hypothesis-seed=1234 --timeout=0
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from requests_unixsocket.adapters import UnixAdapter
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from governord import webhooks
from governord.api import admin_api as admin_api_module
from governord.api import app_api as app_api_module
from lab.stack import Governord, Lab

from .conftest import wait_until

EXAMPLES = int(os.environ.get("GOVERNORD_FUZZ_EXAMPLES", "15"))
APP = "demo"
ROLE = "node"
TAGS = ["node", "broker"]
#: operations that would take the application fuzz's certificate away
CERTIFICATE_PATHS = {"/v1/apps/{app}/certificate", "/v1/apps/{app}/rotate", "/v1/apps/{app}/revoke"}
WEBHOOK_PATH = "/v1/webhooks/openshift"

SCHEMATHESIS_CONFIG = {
    "generation": {"max-examples": EXAMPLES, "mode": "all"},
    "checks": {
        # replaced by schema_valid_requests_are_taken, which knows which 422s the state decides
        "positive_data_acceptance": {"enabled": False},
        # a body over the size limit is refused too
        "negative_data_rejection": {"expected-statuses": ["400", "401", "403", "404", "405", "409", "413", "415",
                                                           "422"]},
    },
}


class SocketAdapter(UnixAdapter):  # type: ignore[misc]
    """Sends every request of the session to one Unix socket, whatever the URL's host says
    (schemathesis needs an http:// base URL; requests-unixsocket reads the socket from it)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._socket_url = "http+unix://" + urllib.parse.quote(str(path), safe="")

    def get_connection(self, url: str, proxies: Any = None) -> Any:
        return super().get_connection(self._socket_url, proxies)


@dataclass
class Target:
    lab: Lab
    daemon: Governord
    app_url: str
    ca: str
    app_session: requests.Session
    admin_url: str
    admin_session: requests.Session
    secret: str
    responses: list[tuple[str, int, Any]]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with Lab(tmp_path_factory.mktemp("fuzz") / "lab") as lab:
        lab.start_peers()
        secret = lab.passwords.setdefault("LAB_WEBHOOK_SECRET", lab.new_password())
        config = lab.write_config(max_hosts=3)
        config.write_text(config.read_text() + f"""
[applications.{APP}.webhook]
secrets = [{{ env = "LAB_WEBHOOK_SECRET" }}]

[[applications.{APP}.webhook.rules]]
event = "deploy"
role = "{ROLE}"
add = 1

# the fuzz's callback URLs are steered to a loopback port where nothing listens (test traffic
# stays on loopback), and its requests are not to be held up by the rate limit
[applications.{APP}.callbacks]
allow_networks = ["127.0.0.0/8"]

[applications.{APP}.rate_limit]
requests_per_second = 10000.0
burst = 10000
""")
        daemon = lab.start_governord(config)
        issued = daemon.ctl_json("apps", "register", APP)
        app_session = requests.Session()
        app_session.trust_env = False  # verify this CA, not one from REQUESTS_CA_BUNDLE
        app_session.verify = issued["ca"]
        app_session.cert = (issued["certificate"], issued["key"])
        admin_session = requests.Session()
        admin_session.mount("http://governord/", SocketAdapter(daemon.socket))
        yield Target(lab, daemon, f"https://127.0.0.1:{daemon.api_port}", issued["ca"], app_session,
                     "http://governord", admin_session, secret, [])
        app_session.close()
        admin_session.close()
        daemon.stop()


def test_the_served_documents_are_the_fuzzed_ones(target: Target) -> None:
    """What the daemon serves on each listener is the document the tests below are made from."""
    served = requests.get(f"{target.app_url}/openapi.json", verify=target.ca, timeout=30).json()
    assert served == APP_DOC
    assert target.admin_session.get(f"{target.admin_url}/openapi.json", timeout=30).json() == ADMIN_DOC


#: a valid body per operation, for this deployment: a hostile value put in one field of it
#: reaches that field's validation and, where the field takes it, the handler behind
BASES: dict[str, dict[str, Any]] = {
    "/v1/scale": {"role": ROLE, "count": 0},
    "/v1/release": {"role": ROLE, "count": 1},
    WEBHOOK_PATH: {"event": "post_deploy", "openshift_version": "v4", "app": "web", "namespace": "ns"},
    "/v1/hosts/{host}/tags": {"add": [TAGS[0]]},
    "/v1/apps/{app}/scale": {"role": ROLE, "count": 0},
    "/v1/apps/{app}/plan": {"role": ROLE, "count": 0},
    "/v1/apps/{app}/release": {"role": ROLE, "count": 1},
    "/v1/apps/{app}/revoke": {"serial": "ab"},
    "/v1/requests/{request_id}/approve": {"comment": "ok"},
    "/v1/requests/{request_id}/deny": {"comment": "ok"},
    "/v1/sweep": {"dry_run": True},
    "/v1/autosign": {"certname": "fuzz.lab.example", "csr": "x" * 64},
}
#: path parameters: none of them names the application the fuzz's certificate belongs to
PATH_VALUES = {"host": "fuzz-hostile.lab.example", "app": "nosuchapp", "request_id": "nosuch"}
#: JSON texts of hostile values: strings with lone surrogates (escaped), NUL, non-ASCII in and
#: out of the BMP, a BOM; numbers past a float's range and integers past int()'s 4300 digits
HOSTILE_STRINGS = [json.dumps(v) for v in ("\ud800", "\udfff\ud800x", "\u0000", "a\u0000b", "\ufeff",
                                           "\u00e9\u65e5\u672c\U0001f642", "\U0001d518" * 2000)]
HOSTILE_STRINGS.append(json.dumps("\u00e9\u65e5\u672c\U0001f642", ensure_ascii=False))  # as raw UTF-8
HOSTILE_NUMBERS = ["1e400", "-1e400", "1e-400", "1" + "0" * 5000, "-" + "9" * 4300, "1" + "0" * 400,
                   "123456789012345678901234567890.5"]


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def _hostile_bodies(doc: dict[str, Any], path: str) -> Iterator[tuple[str, bytes]]:
    """(what, body) for every top-level field of the operation's body: each string value, each
    number, and nesting past the limit; for a list of strings, each string as its item; and
    the whole body nested 30,000 deep (4,000 for the webhook's 8 KiB)."""
    name = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
    properties = doc["components"]["schemas"][name]["properties"]
    levels = 4000 if path == WEBHOOK_PATH else 30_000
    yield "the whole body nested", _deep(levels).encode()
    base = BASES.get(path, {})
    for field in properties:
        def body(value: str, field: str = field) -> bytes:
            text = json.dumps({**base, field: "\0HOSTILE\0"})
            return text.replace(json.dumps("\0HOSTILE\0"), value).encode()
        for value in [*HOSTILE_STRINGS, *HOSTILE_NUMBERS, _deep(levels)]:
            yield f"{field} = {value[:40]}", body(value)
            yield f"{field} = [{value[:40]}]", body(f"[{value}]")


def _state(daemon: Governord) -> list[dict[str, Any]]:
    return daemon.db_query(
        "SELECT (SELECT count(*) FROM hosts) AS hosts, (SELECT count(*) FROM requests) AS requests, "
        "(SELECT count(*) FROM events) AS events, (SELECT count(*) FROM callbacks) AS callbacks, "
        "(SELECT count(*) FROM app_certificates) AS certificates, (SELECT count(*) FROM address_leases) AS leases")


@pytest.mark.parametrize(("api", "path"), [
    (api, path) for api, module in (("app", app_api_module), ("admin", admin_api_module))
    for path, ops in module.endpoints.openapi()["paths"].items()
    if "requestBody" in ops.get("post", {})])
def test_hostile_values_in_every_field(target: Target, api: str, path: str) -> None:
    """Runs before the fuzz, on an idle daemon: every field of every body with deep nesting, huge
    numbers and hostile strings. Never a 5xx; a refusal says why (a 422 names its field) and
    leaves the database as it was."""
    doc = APP_DOC if api == "app" else ADMIN_DOC
    url = (target.app_url if api == "app" else target.admin_url) + path.format(**PATH_VALUES)
    session = target.app_session if api == "app" else target.admin_session
    for what, body in _hostile_bodies(doc, path):
        headers = {"Content-Type": "application/json"}
        if path == WEBHOOK_PATH:
            headers |= {webhooks.APPLICATION_HEADER: APP, **webhooks.signature_headers(target.secret.encode(), body)}
        before = _state(target.daemon)
        response = session.post(url, data=body, headers=headers, timeout=30)
        target.responses.append((f"POST {path}", response.status_code, response.text[:200]))
        assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
        if response.status_code >= 400:
            refusal = response.json()
            if "error" in refusal:  # else a documented refusal of another shape (an autosign decision)
                assert isinstance(refusal["error"], str) and refusal["error"], (what, refusal)
            if response.status_code == 422:
                assert isinstance(refusal.get("field"), str), (what, refusal)
            after = _state(target.daemon)
            if path == "/v1/autosign":  # a refused certificate request is audited
                for state in (before, after):
                    state[0].pop("events")
            assert after == before, f"{what}: refused ({response.status_code}) but written"


def refusals_name_their_field(ctx: Any, response: Any, case: Any) -> bool | None:
    """A refusal says why (``{"error": "...", "field": ...}``), and a 422 names the field."""
    if response.status_code < 400 or "json" not in response.headers.get("content-type", [""])[0]:
        return None
    body = response.json()
    if not (isinstance(body, dict) and "error" in body):
        return None  # a documented refusal of another shape (a declined request), checked by the schema
    assert isinstance(body["error"], str) and body["error"], body
    if response.status_code == 422:
        assert isinstance(body.get("field"), str), f"422 without the field it refuses: {body}"
    return None


#: fields a schema-valid request may still be refused on (422), because what is valid there is
#: the state or the configuration, not the document: a used idempotency key or delivery id, a
#: host name or address to adopt, a list's cursor (only one the server gave is one), a callback
#: URL the application's callback rules refuse
STATE_FIELDS = {"idempotency_key", webhooks.DELIVERY_HEADER, "host", "address", "cursor", "callback_url"}
#: where steered callback URLs go: loopback, a port nothing listens on (the discard service)
CALLBACK_PLACE = "127.0.0.1:9"


def schema_valid_requests_are_taken(ctx: Any, response: Any, case: Any) -> bool | None:
    """Schemathesis's positive_data_acceptance, knowing this API: a schema-valid request is
    taken, or refused for what the document cannot say (401/403 credentials, 404 no such thing,
    409 the rules or the state, 422 only on the fields of :data:`STATE_FIELDS`). A 400, 415 or
    another 422 means the document promises what the server refuses."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code == 405:
        return None  # 405: a method the operation does not have, checked by unsupported_method
    status = response.status_code
    if status < 400 or status in (401, 403, 404, 409):
        return None
    field = response.json().get("field") if status == 422 else None
    assert status == 422 and field in STATE_FIELDS, (
        f"schema-valid request refused with {status}: {response.text[:500]}")
    return None


EXTRA_CHECKS = [refusals_name_their_field, schema_valid_requests_are_taken]
#: the checks that hold whatever the request was generated as (for requests the test re-signs)
RESPONSE_CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
                   response_schema_conformance]


def _steer(case: Any) -> None:
    """Schema-valid data made valid for this deployment where validity is configuration."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    if isinstance(case.body, dict):
        if isinstance(case.body.get("role"), str):
            case.body["role"] = ROLE
        if isinstance(case.body.get("callback_url"), str):
            # keep the generated scheme, path and query; send nothing off this machine
            scheme, _, rest = case.body["callback_url"].partition("://")
            tail = rest[len(re.match(r"[^/?#]*", rest).group()):]  # type: ignore[union-attr]
            case.body["callback_url"] = f"{scheme}://{CALLBACK_PLACE}{tail}"
        for key in ("add", "remove"):
            if case.operation.path.endswith("/tags") and isinstance(case.body.get(key), list):
                case.body[key] = [TAGS[i % len(TAGS)] for i, _ in enumerate(case.body[key])]
    if case.path_parameters and "app" in case.path_parameters and case.operation.path not in CERTIFICATE_PATHS:
        case.path_parameters["app"] = APP


def _record(target: Target, case: Any, response: Any) -> None:
    try:
        body: Any = response.text
    except UnicodeDecodeError:  # a backup's gzip
        body = f"<{len(response.content)} bytes, not text>"
    if "json" in str(response.headers.get("Content-Type", "")):
        body = response.json()
    target.responses.append((f"{case.method} {case.operation.path}", response.status_code, body))


def _signed(case: Any, target: Target) -> requests.Response:
    """The same delivery, signed with the application's secret: the body is refused or acted
    on for what it says, not for its signature."""
    kwargs = case.as_transport_kwargs(base_url=target.app_url)
    body = kwargs.pop("data", None)
    if "json" in kwargs:
        body = json.dumps(kwargs.pop("json")).encode()
    body = body.encode() if isinstance(body, str) else (body or b"")
    delivery = kwargs["headers"].get(webhooks.DELIVERY_HEADER, "")
    if not re.fullmatch(r"[A-Za-z0-9_:-]{1,128}", delivery):
        delivery = str(uuid.uuid4())
    kwargs["headers"] = {**kwargs["headers"], webhooks.APPLICATION_HEADER: APP,
                         **webhooks.signature_headers(target.secret.encode(), body, delivery=delivery)}
    return target.app_session.request(data=body, timeout=30, **kwargs)


# Loaded at collection time from the code that also serves them (checked equal above):
# schemathesis's pytest fixture loader does not work with pytest 9.2.
APP_DOC = app_api_module.endpoints.openapi()
ADMIN_DOC = admin_api_module.endpoints.openapi()
app_api = schemathesis.openapi.from_dict(APP_DOC, config=schemathesis.Config.from_dict(SCHEMATHESIS_CONFIG))
admin_api = schemathesis.openapi.from_dict(ADMIN_DOC, config=schemathesis.Config.from_dict(SCHEMATHESIS_CONFIG))
FUZZ_SETTINGS = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


@app_api.parametrize()
@FUZZ_SETTINGS
def test_fuzz_application_api(case: Any, target: Target) -> None:
    _steer(case)
    # verify and cert given per call: schemathesis passes its own (verify=True) otherwise
    response = case.call_and_validate(base_url=target.app_url, session=target.app_session, timeout=30,
                                      verify=target.ca, cert=target.app_session.cert,
                                      additional_checks=EXTRA_CHECKS)
    _record(target, case, response)
    if case.operation.path == WEBHOOK_PATH:
        signed = _signed(case, target)
        _record(target, case, signed)
        case.validate_response(signed, checks=[*RESPONSE_CHECKS, *EXTRA_CHECKS])
        assert signed.status_code != 401, signed.text  # the signature is right and fresh


@admin_api.parametrize()
@FUZZ_SETTINGS
def test_fuzz_admin_api(case: Any, target: Target) -> None:
    _steer(case)
    response = case.call_and_validate(base_url=target.admin_url, session=target.admin_session, timeout=30,
                                      additional_checks=EXTRA_CHECKS)
    _record(target, case, response)


def test_the_daemon_is_whole_after_the_fuzz(target: Target) -> None:
    """Runs after both fuzz tests (same module): the process is up, answers on both listeners,
    logged no handler failure, and still does its job end to end."""
    daemon = target.daemon
    assert target.responses, "the fuzz tests did not run before this one"
    assert all(status < 500 for _, status, _ in target.responses)
    assert daemon.process.poll() is None, daemon.log_tail()
    assert target.app_session.get(f"{target.app_url}/healthz", timeout=30).json() == {"status": "ok", "store": "ok"}
    assert target.admin_session.get(f"{target.admin_url}/v1/status", timeout=30).status_code == 200
    # what bad input could set off: a handler's failure, aiohttp's own "Error handling request",
    # a callback to a URL the API took and no client can send to
    failures = [line for line in daemon.log.read_text().splitlines()
                if re.search(r"logger=(governord\.api\S*|governord\.callbacks|aiohttp\.server) ", line)
                and ("level=error" in line or "exc=" in line)]
    assert not failures, "\n".join(failures[:5])
    # the fuzz may have filled the cap: release everything, then one host end to end
    daemon.ctl("scale", APP, ROLE, "--count", "0", "--wait", "--key", f"after-fuzz-{uuid.uuid4()}")
    wait_until(lambda: not target.lab.vsphere_vms(), 180, what="the fuzz's machines gone")
    daemon.ctl("scale", APP, ROLE, "--add", "1", "--wait", "--key", f"after-fuzz-{uuid.uuid4()}")
    [host] = [h for h in daemon.ctl_json("hosts", "list") if h["state"] == "ready" and h["app"] == APP]
    assert list(target.lab.vsphere_vms()) == [host["name"]]
    assert host["fqdn"] in target.lab.foreman_hosts()
