"""Drain before retire against the running daemon and the lab: a scale-down over the HTTPS API
(the application's client certificate) puts the host in draining and a signed ``draining`` event
arrives at a real server here; the VM stays in vcsim until the application confirms, by
``POST /v1/hosts/NAME/drained`` or by the real ``hooks/openshift/drained`` script, and is then
really destroyed. Another host's or an unknown name is 404, a host that is not draining 409."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web

from governord import webhooks
from lab.stack import Governord, Lab

ROOT = Path(__file__).resolve().parents[2]
DRAINED = ROOT / "hooks" / "openshift" / "drained"


def _call(daemon: Governord, context: ssl.SSLContext, path: str,
          body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"https://127.0.0.1:{daemon.api_port}{path}", method="POST",
                                     data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as resp:  # noqa: S310 - loopback
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


async def _until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)
    return value


def _states(daemon: Governord) -> dict[str, str]:
    return {h["name"]: h["state"] for h in daemon.db_rows("hosts")}


async def _drained_hook(daemon: Governord, secret: str, host: str) -> tuple[int, str]:
    env = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
        "OPENSHIFT_DEPLOYMENT_NAME": "frontend-3", "OPENSHIFT_DEPLOYMENT_NAMESPACE": "shop-prod",
        "HOSTNAME": "frontend-drain", "GOVERNORD_URL": f"https://127.0.0.1:{daemon.api_port}/v1/webhooks/openshift",
        "GOVERNORD_CA_FILE": str(daemon.state_dir / "pki" / "ca.pem"), "GOVERNORD_SECRET": secret,
        "GOVERNORD_APPLICATION": "demo", "GOVERNORD_ATTEMPTS": "1",
    }
    process = await asyncio.create_subprocess_exec(str(DRAINED), host, env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    _out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_a_scale_down_drains_until_the_application_confirms(lab: Lab) -> None:
    secret = lab.passwords.setdefault("LAB_WEBHOOK_SECRET", lab.new_password())
    arrived: list[tuple[str, dict[str, Any]]] = []

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        delivery = webhooks.verify([secret.encode()], request.headers, body, now=time.time())
        arrived.append((delivery, json.loads(body)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/drain", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    config = lab.write_config()
    config.write_text(config.read_text() + f"""
[applications.demo.webhook]
secrets = [{{ env = "LAB_WEBHOOK_SECRET" }}]

[applications.demo.callbacks]
allow_http = true
allow_networks = ["127.0.0.0/8"]

[applications.demo.drain]
timeout = 3600
callback_url = "http://127.0.0.1:{port}/drain"
""")
    daemon = lab.start_governord(config)
    try:
        issued = daemon.ctl_json("apps", "register", "demo")
        context = ssl.create_default_context(cafile=issued["ca"])
        context.load_cert_chain(issued["certificate"], issued["key"])
        status, _ = _call(daemon, context, "/v1/scale", {"role": "node", "add": 3})
        assert status == 202
        await _until(lambda: set(_states(daemon).values()) == {"ready"} and len(_states(daemon)) == 3, 120,
                     "three ready nodes")
        assert sorted(lab.vsphere_vms()) == ["demo-node-01", "demo-node-02", "demo-node-03"]

        # an operator: a plain retire drains too; --now cuts it short and the VM goes at once
        assert daemon.ctl_json("retire", "demo-node-03")["state"] == "draining"
        await _until(lambda: arrived, 30, "the draining callback of demo-node-03")
        done = daemon.ctl("retire", "demo-node-03", "--now", "--wait")
        assert "demo-node-03" in done.stderr + done.stdout
        assert _states(daemon)["demo-node-03"] == "gone"
        assert sorted(lab.vsphere_vms()) == ["demo-node-01", "demo-node-02"]
        arrived.clear()

        status, body = _call(daemon, context, "/v1/hosts/demo-node-01/drained")
        assert status == 409 and body["field"] == "host" and "is ready, not draining" in body["error"]

        status, down = _call(daemon, context, "/v1/scale", {"role": "node", "count": 1})
        assert status == 202 and down["status"] == "in-progress"
        await _until(lambda: arrived, 30, "the draining callback")
        [(delivery, event)] = arrived
        assert event["event"] == "draining" and event["delivery"] == delivery
        assert event["host"]["name"] == "demo-node-02" and event["deadline"] > time.time() + 3000
        assert _states(daemon)["demo-node-02"] == "draining"
        await asyncio.sleep(2)  # it waits for the application: the VM is still there
        assert sorted(lab.vsphere_vms()) == ["demo-node-01", "demo-node-02"]
        assert _states(daemon)["demo-node-02"] == "draining"

        status, body = _call(daemon, context, "/v1/hosts/no-such-host/drained")
        assert status == 404 and body["field"] == "host"
        status, host = _call(daemon, context, "/v1/hosts/demo-node-02/drained")
        assert status == 200 and host["name"] == "demo-node-02"
        await _until(lambda: _states(daemon)["demo-node-02"] == "gone", 120, "the drained node gone")
        assert sorted(lab.vsphere_vms()) == ["demo-node-01"]  # its VM really destroyed
        status, host = _call(daemon, context, "/v1/hosts/demo-node-02/drained")  # a repeat
        assert status == 200 and host["state"] == "gone"
        [drained] = [e["detail"] for e in daemon.db_rows("events") if e["kind"] == "drained"]
        assert (json.loads(drained) if isinstance(drained, str) else drained)["by"] == "application"

        # the last one, confirmed by the OpenShift hook script
        status, _ = _call(daemon, context, "/v1/scale", {"role": "node", "count": 0})
        assert status == 202
        await _until(lambda: _states(daemon)["demo-node-01"] == "draining", 30, "the last node draining")
        code, err = await _drained_hook(daemon, secret, "demo-node-09")  # no such host of the application
        assert code == 1 and "HTTP 404" in err
        code, err = await _drained_hook(daemon, secret, "demo-node-01")
        assert code == 0, err
        await _until(lambda: _states(daemon)["demo-node-01"] == "gone", 120, "the last node gone")
        assert lab.vsphere_vms() == {}
        code, err = await _drained_hook(daemon, secret, "demo-node-01")  # a repeat: no error
        assert code == 0, err
        # the outbox delivers the second notice on its own schedule (at least once): wait for it
        await _until(lambda: len(arrived) >= 2, 60, "the second draining notice")
        assert [e["event"] for _, e in arrived] == ["draining", "draining"]
    finally:
        daemon.stop()
        await runner.cleanup()
