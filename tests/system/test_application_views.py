"""What an application sees of its hosts, through the running daemon: of each registrar's record
only the keys the registrar declares (never the Satellite activation key, nor a Puppet autosign
token or its cloud-config: tests/system/test_puppet.py checks those with the real Puppet CA), and
of a failed step a reason without the peer's own words (URLs, host names, ports). The operators'
view (governord-ctl, the admin socket) keeps both whole."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

from aiohttp import web

from governord import webhooks
from lab.stack import Governord, Lab

from .conftest import wait_until

#: the activation key the lab's [tags.node] gives Satellite (lab/stack.py)
ACTIVATION_KEY = "1-openshift-node"


class Application:
    """The application ``demo`` on the HTTPS API, with the certificate governord issued it."""

    def __init__(self, daemon: Governord) -> None:
        issued = daemon.ctl_json("apps", "register", "demo")
        self.context = ssl.create_default_context(cafile=issued["ca"])
        self.context.load_cert_chain(issued["certificate"], issued["key"])
        self.base = f"https://127.0.0.1:{daemon.api_port}"

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             data: bytes | None = None) -> tuple[int, Any, bytes]:
        payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base + path, data=payload, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as resp:  # noqa: S310 - loopback
                raw = resp.read()
                return resp.status, json.loads(raw), raw
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw), raw


def _no_secret(raw: bytes, *secrets: str) -> None:
    text = raw.decode()
    for secret in ("activation_key", "autosign_token", "cloud_config", *secrets):
        assert secret not in text, f"{secret!r} reached the application: {text[:2000]}"


async def test_applications_see_no_activation_key_anywhere(lab: Lab) -> None:
    secret = lab.passwords.setdefault("LAB_WEBHOOK_SECRET", lab.new_password())
    config = lab.write_config()
    config.write_text(config.read_text() + """
[applications.demo.webhook]
secrets = [{ env = "LAB_WEBHOOK_SECRET" }]

[[applications.demo.webhook.rules]]
event = "deploy"
role = "node"
add = 1

[applications.demo.callbacks]
allow_http = true
allow_networks = ["127.0.0.0/8"]
""")
    bodies: list[bytes] = []

    async def receive(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response(status=200)

    receiver = web.Application()
    receiver.router.add_post("/callback", receive)
    runner = web.AppRunner(receiver)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    callback = f"http://127.0.0.1:{runner.addresses[0][1]}/callback"
    daemon = lab.start_governord(config)
    try:
        app = Application(daemon)
        ask = {"role": "node", "add": 1, "idempotency_key": "views-1", "callback_url": callback}
        code, accepted, _ = await asyncio.to_thread(app.call, "POST", "/v1/scale", ask)
        assert code == 202, accepted

        def done() -> Any:
            status = app.call("GET", f"/v1/requests/{accepted['id']}")
            return status if status[1]["status"] == "completed" else None

        _, status, raw_status = await asyncio.to_thread(wait_until, done, 120, 0.3, "the request completed")
        [host] = status["hosts"]
        # the operators' view has the key, in the classification and the record: it was there to leak
        whole = daemon.ctl_json("hosts", "show", host["name"])
        assert whole["classification"]["satellite"]["activation_key"] == ACTIVATION_KEY
        assert whole["registrations"]["satellite"]["activation_key"] == ACTIVATION_KEY
        # the application's: what the registrars declare, nothing else
        assert host["registrations"]["satellite"] == {"id": whole["registrations"]["satellite"]["id"],
                                                      "groups": ["openshift-nodes"]}
        assert host["classification"]["satellite"] == {"groups": ["openshift-nodes"]}
        assert host["registrations"]["foreman"]["hostgroup"] == "openshift/node"
        assert "parameters" not in host["registrations"]["foreman"]
        _no_secret(raw_status, ACTIVATION_KEY)

        code, listed, raw_list = await asyncio.to_thread(app.call, "GET", "/v1/hosts")
        assert code == 200 and [h["name"] for h in listed["hosts"]] == [host["name"]]
        _no_secret(raw_list, ACTIVATION_KEY)
        # the idempotent repeat answers with the hosts as they are now: registered
        code, again, raw_again = await asyncio.to_thread(app.call, "POST", "/v1/scale", ask)
        assert code == 200 and again["id"] == accepted["id"] and again["hosts"][0]["state"] == "ready"
        _no_secret(raw_again, ACTIVATION_KEY)
        # the callback body
        await asyncio.to_thread(wait_until, lambda: bodies, 60, 0.2, "the callback")
        assert json.loads(bodies[0])["request"]["hosts"][0]["registrations"]["satellite"]["groups"] == [
            "openshift-nodes"]
        _no_secret(bodies[0], ACTIVATION_KEY)

        # a webhook delivery, repeated once its host is registered
        event = json.dumps({"event": "deploy", "openshift_version": "v2", "app": "demo", "namespace": "team"}).encode()
        headers = {**webhooks.signature_headers(secret.encode(), event, delivery="views-hook-1"),
                   webhooks.APPLICATION_HEADER: "demo"}
        code, hooked, _ = await asyncio.to_thread(app.call, "POST", "/v1/webhooks/openshift", headers=headers,
                                                  data=event)
        assert code == 202, hooked
        await asyncio.to_thread(
            wait_until, lambda: daemon.ctl_json("requests", "show", hooked["request"]["id"])["status"] == "completed",
            120, 0.3, "the webhook's request completed")
        headers = {**webhooks.signature_headers(secret.encode(), event, delivery="views-hook-1"),
                   webhooks.APPLICATION_HEADER: "demo"}
        code, repeated, raw_hook = await asyncio.to_thread(app.call, "POST", "/v1/webhooks/openshift",
                                                           headers=headers, data=event)
        assert code == 200 and repeated["request"]["hosts"][0]["state"] == "ready"
        assert repeated["request"]["hosts"][0]["registrations"]["satellite"]["groups"] == ["openshift-nodes"]
        _no_secret(raw_hook, ACTIVATION_KEY)
    finally:
        daemon.stop()
        await runner.cleanup()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_application_gets_the_failed_step_not_the_peers_words(lab: Lab) -> None:
    """Satellite is unreachable: the error names its URL (for the operator); the application is
    told which step failed and what became of the host, and nothing of the URL. (Before, it got
    the error as it was: "... cannot reach http://127.0.0.1:PORT/rpc/api: ConnectionRefusedError".)"""
    port = _closed_port()
    config = lab.write_config(retry_limit=1, retry_backoff=0.1, retry_backoff_max=0.2)
    text = config.read_text()
    satellite_url = lab.url_for(lab.satellite)
    assert satellite_url in text
    config.write_text(text.replace(satellite_url, f"http://127.0.0.1:{port}/rpc/api"))
    daemon = lab.start_governord(config)
    try:
        app = Application(daemon)
        code, accepted, _ = app.call("POST", "/v1/scale", {"role": "node", "add": 1})
        assert code == 202
        deadline = time.monotonic() + 180
        while True:
            _, status, raw = app.call("GET", f"/v1/requests/{accepted['id']}")
            if status["status"] == "failed":
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.3)
        [host] = status["hosts"]
        whole = daemon.ctl_json("hosts", "show", host["name"])
        step = whole["failed_step"]  # classify: the registrar logs in first
        assert step in ("classify", "register") and f"127.0.0.1:{port}" in whole["error"]
        assert host["failed_step"] == step
        assert host["error"] == (f"step {step} failed for good; the host was rolled back "
                                 "(the detail is with governord's operators)")
        for internal in (str(port), "127.0.0.1", "http", "rpc/api", "Satellite", "cannot reach"):
            assert internal not in raw.decode(), internal
        code, listed, raw_list = app.call("GET", "/v1/hosts?state=gone")
        assert listed["hosts"][0]["error"] == host["error"] and str(port) not in raw_list.decode()
    finally:
        daemon.stop()
