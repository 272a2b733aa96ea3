"""Bad deliveries to /v1/webhooks/openshift on the running daemon: each is refused with its
status and a body naming the header or field, and none writes anything (no request, no audit
event, no host, no callback: the database is compared before and after). A repeated delivery
returns the first outcome without acting again; the same delivery id with another body is
refused. An application that does not exist, or takes no webhooks, is answered exactly as a
bad signature is, so the answers do not tell which applications exist."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from governord import webhooks
from lab.stack import Governord, Lab

SECRET_ENV = "LAB_WEBHOOK_SECRET"
EVENT = {"event": "deploy", "openshift_version": "v2", "app": "shop", "namespace": "acme"}


@dataclass
class Hook:
    daemon: Governord
    url: str
    ca: str
    secret: bytes

    def post(self, body: bytes | dict[str, Any], *, app: str = "demo", delivery: str | None = None,
             now: float | None = None, secret: bytes | None = None, headers: dict[str, str] | None = None,
             drop: tuple[str, ...] = ()) -> requests.Response:
        """POST a delivery signed as the hook signs it; ``headers`` replace, ``drop`` removes."""
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        sent = {"Content-Type": "application/json", webhooks.APPLICATION_HEADER: app,
                **webhooks.signature_headers(secret or self.secret, raw, delivery=delivery, now=now),
                **(headers or {})}
        for name in drop:
            sent.pop(name)
        with requests.Session() as session:
            session.trust_env = False
            return session.post(self.url, data=raw, headers=sent, verify=self.ca, timeout=30)


def written(daemon: Governord) -> dict[str, list[tuple[Any, ...]]]:
    """Everything a delivery could write, read from the database file (read-only)."""
    conn = sqlite3.connect(f"file:{daemon.state_dir / 'governord.db'}?mode=ro", uri=True, timeout=5)
    try:
        return {table: sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)  # noqa: S608 - fixed names
                for table in ("requests", "events", "hosts", "callbacks", "address_leases")}
    finally:
        conn.close()


def _start(lab: Lab) -> Hook:
    lab.start_peers()
    secret = lab.passwords.setdefault(SECRET_ENV, lab.new_password())
    config = lab.write_config(max_hosts=1)
    config.write_text(config.read_text() + f"""
[applications.demo.webhook]
secrets = [{{ env = "{SECRET_ENV}" }}]
tolerance = 300.0

[[applications.demo.webhook.rules]]
event = "deploy"
role = "node"
add = 1

[applications.quiet]
description = "an application that takes no webhooks"
""")
    daemon = lab.start_governord(config)
    return Hook(daemon, f"https://127.0.0.1:{daemon.api_port}/v1/webhooks/openshift",
                str(daemon.state_dir / "pki" / "ca.pem"), secret.encode())


@pytest.fixture(scope="module")
def hook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hook]:
    """A daemon that is sent only deliveries it refuses: its database stays still."""
    with Lab(tmp_path_factory.mktemp("webhook-refusals") / "lab") as lab:
        started = _start(lab)
        yield started
        started.daemon.stop()


@pytest.fixture
def fresh_hook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hook]:
    """A daemon of its own, for a delivery that is acted on."""
    with Lab(tmp_path_factory.mktemp("webhook-replay") / "lab") as lab:
        started = _start(lab)
        yield started
        started.daemon.stop()


def _refused(response: requests.Response, status: int, field: str | None, words: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "field"} and body["field"] == field, body
    assert words in body["error"], body
    return body  # type: ignore[no-any-return]


def _big(size: int) -> bytes:
    return json.dumps({**EVENT, "component": "x" * size}).encode()


Change = Callable[[Hook], requests.Response]

REFUSALS: list[tuple[str, Change, int, str | None, str]] = [
    # malformed bodies (signed correctly: the body itself is what is wrong)
    ("not JSON", lambda h: h.post(b"{not json"), 400, None, "not valid JSON"),
    ("not UTF-8", lambda h: h.post(b'{"event": "\xff"}'), 400, None, "not valid JSON"),
    ("empty body", lambda h: h.post(b""), 400, None, "not valid JSON"),
    ("a JSON list", lambda h: h.post(b"[1, 2]"), 400, None, "must be a JSON object"),
    ("missing field", lambda h: h.post({k: v for k, v in EVENT.items() if k != "namespace"}), 422, "namespace",
     "Field required"),
    ("wrong type", lambda h: h.post({**EVENT, "app": 7}), 422, "app", "valid string"),
    ("wrong type (bool)", lambda h: h.post({**EVENT, "component": True}), 422, "component", "valid string"),
    ("unknown event", lambda h: h.post({**EVENT, "event": "build"}), 422, "event", "'deploy', 'post_deploy', 'teardown' or 'drained'"),
    ("drained without its host", lambda h: h.post({**EVENT, "event": "drained"}), 422, "host",
     "a drained event names its host"),
    ("a host on another event", lambda h: h.post({**EVENT, "host": "demo-node-01"}), 422, "host",
     "a drained event names its host"),
    ("unknown field", lambda h: h.post({**EVENT, "colour": "red"}), 422, "colour", "unknown field"),
    ("field of the other generation", lambda h: h.post({**EVENT, "pod": "p-1"}), 422, "pod",
     "only sent by OpenShift v4"),
    ("malformed value", lambda h: h.post({**EVENT, "namespace": "-bad-"}), 422, "namespace", "should match"),
    ("wrong content type", lambda h: h.post(EVENT, headers={"Content-Type": "text/plain"}), 415, None,
     "application/json"),
    # oversized: refused before it is read (Content-Length) and while it is read (chunked)
    ("oversized", lambda h: h.post(_big(webhooks.MAX_BODY_BYTES)), 413, None, f"{webhooks.MAX_BODY_BYTES} bytes"),
    ("oversized, chunked", lambda h: _chunked(h, _big(webhooks.MAX_BODY_BYTES)), 413, None, "bytes"),
    # headers
    ("no signature", lambda h: h.post(EVENT, drop=(webhooks.SIGNATURE_HEADER,)), 400, webhooks.SIGNATURE_HEADER,
     "missing"),
    ("no delivery id", lambda h: h.post(EVENT, drop=(webhooks.DELIVERY_HEADER,)), 400, webhooks.DELIVERY_HEADER,
     "missing"),
    ("malformed delivery id", lambda h: h.post(EVENT, headers={webhooks.DELIVERY_HEADER: "a.b"}), 400,
     webhooks.DELIVERY_HEADER, "malformed"),
    ("no timestamp", lambda h: h.post(EVENT, drop=(webhooks.TIMESTAMP_HEADER,)), 400, webhooks.TIMESTAMP_HEADER,
     "missing"),
    ("malformed timestamp", lambda h: h.post(EVENT, headers={webhooks.TIMESTAMP_HEADER: "yesterday"}), 400,
     webhooks.TIMESTAMP_HEADER, "malformed"),
    ("malformed signature", lambda h: h.post(EVENT, headers={webhooks.SIGNATURE_HEADER: "sha1=abc"}), 400,
     webhooks.SIGNATURE_HEADER, "no v1= signature"),
    # authentication
    ("wrongly signed", lambda h: h.post(EVENT, secret=b"not the secret"), 401, webhooks.SIGNATURE_HEADER,
     "signature does not match"),
    ("body changed after signing", lambda h: _tampered(h), 401, webhooks.SIGNATURE_HEADER, "does not match"),
    ("stale timestamp", lambda h: h.post(EVENT, now=time.time() - 301), 401, webhooks.TIMESTAMP_HEADER, "behind"),
    ("future timestamp", lambda h: h.post(EVENT, now=time.time() + 301), 401, webhooks.TIMESTAMP_HEADER,
     "ahead of"),
    ("unknown application", lambda h: h.post(EVENT, app="nonesuch"), 401, webhooks.SIGNATURE_HEADER,
     "signature does not match"),
    ("application without webhooks", lambda h: h.post(EVENT, app="quiet"), 401, webhooks.SIGNATURE_HEADER,
     "signature does not match"),
    ("no application header", lambda h: h.post(EVENT, drop=(webhooks.APPLICATION_HEADER,)), 401,
     webhooks.SIGNATURE_HEADER, "signature does not match"),
]


def _chunked(hook: Hook, body: bytes) -> requests.Response:
    """The body sent in chunks, without a Content-Length (the size is only known by reading)."""
    headers = {"Content-Type": "application/json", webhooks.APPLICATION_HEADER: "demo",
               **webhooks.signature_headers(hook.secret, body)}
    with requests.Session() as session:
        session.trust_env = False
        return session.post(hook.url, data=(body[i:i + 1000] for i in range(0, len(body), 1000)), headers=headers,
                            verify=hook.ca, timeout=30)


def _tampered(hook: Hook) -> requests.Response:
    signed = json.dumps(EVENT).encode()
    headers = {"Content-Type": "application/json", webhooks.APPLICATION_HEADER: "demo",
               **webhooks.signature_headers(hook.secret, signed)}
    with requests.Session() as session:
        session.trust_env = False
        return session.post(hook.url, data=signed.replace(b"acme", b"acne"), headers=headers, verify=hook.ca,
                            timeout=30)


@pytest.mark.parametrize(("case", "send", "status", "field", "words"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_bad_delivery_is_refused_naming_what_is_wrong_and_writes_nothing(
    hook: Hook, case: str, send: Change, status: int, field: str | None, words: str
) -> None:
    before = written(hook.daemon)
    _refused(send(hook), status, field, words)
    assert written(hook.daemon) == before
    assert hook.daemon.process.poll() is None


def test_an_unknown_application_is_answered_as_a_bad_signature(hook: Hook) -> None:
    """The same answer, byte for byte, whether the application is unknown, takes no webhooks
    or signed wrongly; the log still tells the operator which it was."""
    answers = {app: hook.post(EVENT, app=app, secret=b"guess") for app in ("demo", "quiet", "nonesuch")}
    assert {a.status_code for a in answers.values()} == {401}
    assert len({a.content for a in answers.values()}) == 1
    # a malformed header is found first either way, so that tells nothing either
    malformed = {app: hook.post(EVENT, app=app, headers={webhooks.TIMESTAMP_HEADER: "x"}) for app in ("demo", "nonesuch")}
    assert len({(a.status_code, a.content) for a in malformed.values()}) == 1
    assert "no application of that name takes webhooks" in hook.daemon.log.read_text()


def test_a_replay_returns_the_first_outcome_and_another_body_under_its_id_is_refused(fresh_hook: Hook) -> None:
    hook = fresh_hook
    delivery = "replay-1"
    first = hook.post(EVENT, delivery=delivery)
    assert first.status_code == 202, first.text
    request_id = first.json()["request"]["id"]
    after_first = written(hook.daemon)
    assert [r for r in after_first["requests"] if r[0] == request_id]

    # the same delivery again (a retry, signed anew): the first outcome, nothing done twice
    again = hook.post(EVENT, delivery=delivery)
    assert again.status_code == 200 and again.json()["request"]["id"] == request_id
    assert again.json()["decision"] == first.json()["decision"] == "accepted"
    assert written(hook.daemon)["requests"] == after_first["requests"]
    assert len(written(hook.daemon)["hosts"]) == len(after_first["hosts"])

    # the same id with another body: not the first delivery, and not a new one either
    other = hook.post({**EVENT, "namespace": "other"}, delivery=delivery)
    _refused(other, 422, webhooks.DELIVERY_HEADER, "received before with another body")
    assert written(hook.daemon)["requests"] == after_first["requests"]

    # a replay after the window is refused as stale, even with the first body
    stale = hook.post(EVENT, delivery=delivery, now=time.time() - 3600)
    _refused(stale, 401, webhooks.TIMESTAMP_HEADER, "behind")
    assert written(hook.daemon)["requests"] == after_first["requests"]
