"""The real OpenShift deploy hooks against the running daemon: a signed v2 deploy event asks for
a node through the application's webhook rules, a repeat of the delivery does not ask twice,
and a hook with the wrong secret is refused; v4 deploy hooks keep N nodes per deployed
component, and the teardown hook releases a component's nodes."""

from __future__ import annotations

import json
import os
import re
import shlex
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from governord import webhooks
from governord.pki import CertificateAuthority
from lab.postgres import free_port
from lab.stack import Lab

from .conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ROOT / "hooks" / "openshift"
HOOK = HOOKS / "deploy"
#: the test receivers are plain http on loopback, which an application's rules must allow
LOOPBACK_CALLBACKS = '\n[applications.demo.callbacks]\nallow_http = true\nallow_networks = ["127.0.0.0/8", "::1/128"]\n'


def _hook(daemon_port: int, ca: Path, secret: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
        "OPENSHIFT_APP_NAME": "demo", "OPENSHIFT_NAMESPACE": "team", "OPENSHIFT_APP_DNS": "demo-team.example",
        "OPENSHIFT_GEAR_UUID": "52e9a2b6e0b8cd8a6b000012", "OPENSHIFT_APP_UUID": "52e9a2b6e0b8cd8a6b000012",
        "GOVERNORD_URL": f"https://127.0.0.1:{daemon_port}/v1/webhooks/openshift",
        "GOVERNORD_CA_FILE": str(ca), "GOVERNORD_SECRET": secret, "GOVERNORD_APPLICATION": "demo",
        "GOVERNORD_ATTEMPTS": "1", **extra,
    }
    return subprocess.run([str(HOOK)], env=env, capture_output=True, text=True, timeout=60)


def test_the_deploy_hook_asks_for_a_node(lab: Lab) -> None:
    secret = lab.passwords.setdefault("LAB_WEBHOOK_SECRET", lab.new_password())
    config = lab.write_config()
    config.write_text(config.read_text() + """
[applications.demo.webhook]
secrets = [{ env = "LAB_WEBHOOK_SECRET" }]

[[applications.demo.webhook.rules]]
event = "deploy"
role = "node"
add = 1
""")
    daemon = lab.start_governord(config)
    try:
        ca = daemon.state_dir / "pki" / "ca.pem"
        done = _hook(daemon.api_port, ca, secret)
        assert done.returncode == 0, done.stderr
        [request] = daemon.ctl_json("requests", "list")
        assert request["actor"] == "webhook:demo" and request["decision"] == "accepted"
        assert request["idempotency_key"].startswith("webhook:")
        wait_until(lambda: list(lab.vsphere_vms()) == ["demo-node-01"], 120, what="the node the hook asked for")

        # the same delivery again (a retry after a lost answer): the first outcome, no new request
        body = json.dumps({"event": "deploy", "openshift_version": "v2", "app": "demo", "namespace": "team"}).encode()
        headers = {**webhooks.signature_headers(secret.encode(), body, delivery="retry-1"),
                   webhooks.APPLICATION_HEADER: "demo", "Content-Type": "application/json"}
        url = f"https://127.0.0.1:{daemon.api_port}/v1/webhooks/openshift"
        context = ssl.create_default_context(cafile=str(ca))
        replies = []
        for _ in range(2):
            with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method="POST"),
                                        context=context, timeout=30) as resp:  # noqa: S310 - loopback
                replies.append((resp.status, json.loads(resp.read())))
        assert [status for status, _ in replies] == [202, 200]
        assert replies[0][1]["request"]["id"] == replies[1][1]["request"]["id"]
        assert len(daemon.ctl_json("requests", "list")) == 2

        refused = _hook(daemon.api_port, ca, "not-the-secret")
        assert refused.returncode == 1 and "HTTP 401: signature does not match" in refused.stderr
        assert len(daemon.ctl_json("requests", "list")) == 2
        assert "webhook refused" in daemon.log.read_text()
    finally:
        daemon.stop()


async def test_the_application_is_called_back_signed_with_retries(lab: Lab) -> None:
    """A request with a callback_url: once its hosts are ready, governord POSTs the outcome to
    the application, signed with its webhook secret; a 503 is retried with the same delivery."""
    import asyncio
    import time

    from aiohttp import web

    from governord import webhooks as wh

    secret = lab.passwords.setdefault("LAB_WEBHOOK_SECRET", lab.new_password())
    config = lab.write_config()
    config.write_text(config.read_text() + '\n[applications.demo.webhook]\nsecrets = [{ env = "LAB_WEBHOOK_SECRET" }]\n'
                      + LOOPBACK_CALLBACKS)
    arrived: list[tuple[int, str, dict]] = []  # type: ignore[type-arg]

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        delivery = wh.verify([secret.encode()], request.headers, body, now=time.time())
        arrived.append((len(arrived) + 1, delivery, json.loads(body)))
        return web.Response(status=503 if len(arrived) == 1 else 200)

    app = web.Application()
    app.router.add_post("/governor-callback", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    daemon = lab.start_governord(config)
    try:
        issued = daemon.ctl_json("apps", "register", "demo")
        context = ssl.create_default_context(cafile=issued["ca"])
        context.load_cert_chain(issued["certificate"], issued["key"])
        body = json.dumps({"role": "node", "add": 2, "callback_url": f"http://127.0.0.1:{port}/governor-callback"})
        request = urllib.request.Request(f"https://127.0.0.1:{daemon.api_port}/v1/scale", data=body.encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, context=context, timeout=30) as resp:  # noqa: S310 - loopback
            accepted = json.loads(resp.read())
        deadline = time.monotonic() + 120
        while len(arrived) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert [n for n, _, _ in arrived] == [1, 2]
        assert {delivery for _, delivery, _ in arrived} == {accepted["id"]}  # a retry keeps its delivery id
        payload = arrived[-1][2]
        assert payload["event"] == "request-completed"
        assert sorted(h["state"] for h in payload["request"]["hosts"]) == ["ready", "ready"]
        await asyncio.sleep(2.5)
        assert len(arrived) == 2  # delivered: not sent again
    finally:
        daemon.stop()
        await runner.cleanup()


def test_a_callback_never_reaches_governords_own_api(lab: Lab) -> None:
    """Loopback is allowed for callbacks, but not the port the daemon's application API is
    bound to (a port it picked: the daemon registers it once it listens): a literal address
    is refused when asked (422 naming callback_url), a name resolving to it at delivery
    (audited, never sent: the API sees no connection)."""
    lab.passwords.setdefault("LAB_WEBHOOK_SECRET", lab.new_password())
    config = lab.write_config(max_hosts=1)
    config.write_text(config.read_text() + '\n[applications.demo.webhook]\nsecrets = [{ env = "LAB_WEBHOOK_SECRET" }]\n'
                      + LOOPBACK_CALLBACKS)
    daemon = lab.start_governord(config)
    try:
        issued = daemon.ctl_json("apps", "register", "demo")
        context = ssl.create_default_context(cafile=issued["ca"])
        context.load_cert_chain(issued["certificate"], issued["key"])
        port = daemon.api_port

        def scale(url: str) -> tuple[int, dict]:  # type: ignore[type-arg]
            # add 5 over a cap of 1: declined at once, so the callback is due at once
            body = json.dumps({"role": "node", "add": 5, "callback_url": url}).encode()
            request = urllib.request.Request(f"https://127.0.0.1:{port}/v1/scale", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, context=context, timeout=30) as resp:  # noqa: S310 - loopback
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as refused:
                return refused.code, json.loads(refused.read())

        status, body = scale(f"https://127.0.0.1:{port}/v1/scale")
        assert status == 422 and body["field"] == "callback_url", body
        assert f"port {port} on this machine" in body["error"]

        status, body = scale(f"https://localhost:{port}/v1/scale")
        assert status == 409, body
        [row] = wait_until(lambda: [r for r in daemon.db_rows("callbacks") if r["attempts"]], 30,
                           what="the callback's first attempt")
        assert row["request_id"] == body["id"] and row["delivered_at"] is None
        assert row["last_error"].startswith("refused to connect: localhost resolves to ")
        assert f"governord's own listener (port {port} on this machine)" in row["last_error"]
        [event] = [e for e in daemon.db_rows("events") if e["kind"] == "callback-refused"][:1]
        assert event["request_id"] == body["id"]
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=context,  # noqa: S310 - loopback
                                    timeout=30) as resp:
            metrics = resp.read().decode()
        # no connection without a certificate or with a failed handshake came in
        assert not [line for line in metrics.splitlines()
                    if line.startswith("governord_api_refusals_total{") and not line.endswith(" 0.0")]
    finally:
        daemon.stop()


def _v4_hook(script: str, daemon_port: int, ca: Path, secret: str, deployment: str,
             namespace: str = "shop-prod", **extra: str) -> subprocess.CompletedProcess[str]:
    """A hook as a DeploymentConfig's lifecycle-hook pod runs it (or, for teardown, a one-off pod)."""
    env = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
        "OPENSHIFT_DEPLOYMENT_NAME": deployment, "OPENSHIFT_DEPLOYMENT_NAMESPACE": namespace,
        "HOSTNAME": f"{deployment}-hook-{script}".replace("_", "-"),
        "GOVERNORD_URL": f"https://127.0.0.1:{daemon_port}/v1/webhooks/openshift",
        "GOVERNORD_CA_FILE": str(ca), "GOVERNORD_SECRET": secret, "GOVERNORD_APPLICATION": "demo",
        "GOVERNORD_ATTEMPTS": "1", **extra,
    }
    return subprocess.run([str(HOOKS / script)], env=env, capture_output=True, text=True, timeout=60)


def test_deploy_hooks_keep_n_nodes_per_component_and_teardown_releases_them(lab: Lab) -> None:
    secret = lab.passwords.setdefault("LAB_WEBHOOK_SECRET", lab.new_password())
    config = lab.write_config(max_hosts=5)
    config.write_text(config.read_text() + """
[applications.demo.webhook]
secrets = [{ env = "LAB_WEBHOOK_SECRET" }]

[[applications.demo.webhook.rules]]
event = "deploy"
role = "node"
keep = 2

[[applications.demo.webhook.rules]]
event = "teardown"
role = "node"
keep = 0
""")
    daemon = lab.start_governord(config)
    try:
        ca = daemon.state_dir / "pki" / "ca.pem"

        def live_by_component() -> dict[str, list[str]]:
            found: dict[str, list[str]] = {}
            for host in daemon.ctl_json("hosts", "list"):
                if host["state"] != "gone" and not host["retire_requested"]:
                    found.setdefault(host["component"], []).append(host["name"])
            return {component: sorted(names) for component, names in found.items()}

        first = _v4_hook("deploy", daemon.api_port, ca, secret, "frontend-1")
        assert first.returncode == 0, first.stderr
        frontend = live_by_component()["shop-prod/frontend"]
        assert len(frontend) == 2

        again = _v4_hook("deploy", daemon.api_port, ca, secret, "frontend-2")  # the next rollout
        assert again.returncode == 0, again.stderr
        assert live_by_component() == {"shop-prod/frontend": frontend}
        newest = daemon.ctl_json("requests", "list")[0]
        assert newest["decision"] == "accepted" and newest["hosts"] == []
        assert newest["reason"] == "node of shop-prod/frontend has 2 hosts already"

        worker = _v4_hook("deploy", daemon.api_port, ca, secret, "worker-1")  # another component
        assert worker.returncode == 0, worker.stderr
        workers = live_by_component()["shop-prod/worker"]
        assert len(workers) == 2 and not set(workers) & set(frontend)
        wait_until(lambda: sorted(lab.vsphere_vms()) == sorted(frontend + workers), 180, what="four VMs")

        # the application's cap still holds: 4 of 5, a third component would take it to 6
        batch = _v4_hook("deploy", daemon.api_port, ca, secret, "batch-1")
        assert batch.returncode == 1 and "HTTP 409" in batch.stderr and "cap reached" in batch.stderr
        assert "shop-prod/batch" not in live_by_component()

        # frontend goes away: its nodes are released and torn down everywhere; worker's stay
        gone = _v4_hook("teardown", daemon.api_port, ca, secret, "frontend")
        assert gone.returncode == 0, gone.stderr
        assert live_by_component() == {"shop-prod/worker": workers}
        wait_until(lambda: sorted(lab.vsphere_vms()) == workers, 180, what="frontend's VMs destroyed")
        foreman = lab.foreman_hosts()
        assert not any(name.split(".")[0] in frontend for name in foreman)
        assert all(f"{name}.lab.example" in foreman for name in workers)
        # the request's parameters, less the delivery's body digest (a replay must match it)
        events = [{k: v for k, v in r["params"].items() if k != "fingerprint"}
                  for r in daemon.ctl_json("requests", "list")]
        assert {"role": "node", "add": None, "count": 0, "component": "shop-prod/frontend"} in events
    finally:
        daemon.stop()


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The hook's one line on stderr (each outcome prints one)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_the_hook_says_why_a_deploy_was_declined_or_held(lab: Lab) -> None:
    """The hook prints governord's decision and its reason, not the reply's JSON: a deploy over
    the application's cap is declined and fails the hook, naming the cap; one that waits for an
    operator succeeds, naming the command that decides it (which works); an event no rule is
    for is said to be ignored."""
    secret = lab.passwords.setdefault("LAB_WEBHOOK_SECRET", lab.new_password())
    config = lab.write_config(max_hosts=2)
    config.write_text(config.read_text().replace("max_hosts = 2\n", 'max_hosts = 2\napproval = "always"\n') + """
[applications.demo.webhook]
secrets = [{ env = "LAB_WEBHOOK_SECRET" }]

[[applications.demo.webhook.rules]]
event = "deploy"
component = "batch"
role = "node"
add = 3

[[applications.demo.webhook.rules]]
event = "deploy"
role = "node"
add = 1
""")
    daemon = lab.start_governord(config)
    try:
        ca = daemon.state_dir / "pki" / "ca.pem"

        declined = _v4_hook("deploy", daemon.api_port, ca, secret, "batch-1", GOVERNORD_COMPONENT="batch")
        assert declined.returncode == 1
        [request] = daemon.ctl_json("requests", "list")
        assert request["decision"] == "declined"
        line = _one_line(declined)
        assert line.startswith("governord-hook: governord answered the deploy event for shop-prod/batch (v4, ")
        assert line.endswith(f"HTTP 409: declined (request {request['id']}): cap reached: application demo may "
                             "have 2 hosts, has 0 (in flight included), asked for 3 more"), line
        assert "{" not in line

        held = _v4_hook("deploy", daemon.api_port, ca, secret, "frontend-1")
        assert held.returncode == 0, held.stderr
        request = daemon.ctl_json("requests", "list")[0]
        assert request["decision"] == "pending"
        command = f"governord-ctl requests approve|deny {request['id']} -m REASON"
        assert _one_line(held).endswith(
            f"HTTP 202: held for an operator's approval (request {request['id']}): pending approval: application "
            f"demo needs an operator's approval for every request; an operator decides with: {command}")
        # the command it names decides the request (deny: nothing to provision in this test)
        daemon.ctl("requests", "deny", request["id"], "-m", "not now")
        assert daemon.ctl_json("requests", "show", request["id"])["decision"] == "denied"

        ignored = _v4_hook("post_deploy", daemon.api_port, ca, secret, "frontend-1")
        assert ignored.returncode == 0, ignored.stderr
        assert _one_line(ignored).endswith("HTTP 200: ignored: no rule for post_deploy of any")
        assert lab.vsphere_vms() == {}
    finally:
        daemon.stop()


def _matches(pattern: str, line: str) -> bool:
    """Whether ``line`` holds ``pattern``, a line as the README quotes it: "..." for any text,
    N for a number."""
    regex = re.escape(" ".join(pattern.split())).replace(r"\.\.\.", ".*").replace(r"\ N\ ", r"\ \d+\ ")
    return re.search(regex, line) is not None


def test_the_readmes_check_by_hand_works_as_written(lab: Lab, tmp_path: Path) -> None:
    """hooks/openshift/README.md's "Check by hand", run as written: its secret made with its
    command, its CA written by governord-ctl, its teardown of a component with no hosts
    sent from a checkout, answered as the README says. Only what an operator fills in differs:
    governord's address, the application's name and the state directory. Then what its table
    says a wrong secret, a wrong clock, a wrong CA and a wrong port print."""
    readme = (HOOKS / "README.md").read_text()
    section = readme.split("## governord's side", 1)[1].split("\n## ", 1)[0]
    make_secret, copy_ca, check = (block.split("```", 1)[0] for block in section.split("```sh\n")[1:])
    answers = section.split("It prints one line and exits 0.", 1)[1].split("| the line says", 1)[0]
    accepted, ignored = re.findall(r"`([^`]+)`", answers)
    wrong = {row.split("`")[1]: row for row in section.splitlines() if row.startswith("| `")}
    home = tmp_path / "operator"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    subprocess.run(["sh", "-ec", make_secret.splitlines()[0]], cwd=home, env=env, check=True)
    secret_file = home / "shop-webhook-secret"
    assert len(secret_file.read_text().strip()) == 64 and secret_file.stat().st_mode & 0o777 == 0o600

    config = lab.write_config()
    config.write_text(config.read_text() + f"""
[applications.demo.webhook]
secrets = [{{ file = "{secret_file}" }}]

[[applications.demo.webhook.rules]]
event = "teardown"
role = "node"
keep = 0
""")
    daemon = lab.start_governord(config)
    try:
        assert copy_ca.startswith("governord-ctl ca ")  # this daemon's socket is not the default one
        ctl = f"{shlex.quote(sys.executable)} -m governord.ctl --socket {shlex.quote(str(daemon.socket))}"
        subprocess.run(["sh", "-ec", copy_ca.replace("governord-ctl", ctl, 1)], cwd=home, env=env, check=True)
        assert (home / "shop-governord-ca.pem").read_text() == (daemon.state_dir / "pki" / "ca.pem").read_text()

        def run_check(authority: str = f"127.0.0.1:{daemon.api_port}", **extra: str) -> subprocess.CompletedProcess[str]:
            script = check
            for written, replaced in (("https://governor.example.com:8443", f"https://{authority}"),
                                      ("GOVERNORD_APPLICATION=shop ", "GOVERNORD_APPLICATION=demo ")):
                assert written in script
                script = script.replace(written, replaced)
            return subprocess.run(["sh", "-ec", script], cwd=ROOT, env={**env, **extra}, capture_output=True,
                                  text=True, timeout=60)

        done = run_check()
        assert done.returncode == 0, done.stderr
        [request] = daemon.ctl_json("requests", "list")
        assert request["actor"] == "webhook:demo" and request["hosts"] == []
        assert _one_line(done).endswith(f"HTTP 202: accepted (request {request['id']}): node of "
                                        "check/governord-check has 0 hosts already")
        assert _matches(accepted, _one_line(done)) and not _matches(ignored, _one_line(done))

        # what the table says each mistake prints
        secret_file.rename(home / "right-secret")
        secret_file.write_text("not-the-secret\n")
        refused = run_check()
        assert refused.returncode == 1 and _matches("HTTP 401: signature does not match", _one_line(refused))
        (home / "right-secret").replace(secret_file)

        clock = tmp_path / "clock"
        clock.mkdir()
        (clock / "date").write_text("#!/bin/sh\necho 1700000000\n")
        (clock / "date").chmod(0o755)
        late = run_check(PATH=f"{clock}:{env['PATH']}")
        assert late.returncode == 1 and _matches(next(p for p in wrong if "timestamp" in p), _one_line(late))

        ca = home / "shop-governord-ca.pem"
        ca.rename(home / "right-ca.pem")
        other = CertificateAuthority(tmp_path / "other-ca")
        other.ensure()
        ca.write_bytes(other.cert_path.read_bytes())
        untrusted = run_check()
        assert untrusted.returncode == 1
        assert _matches(next(p for p in wrong if "certificate problem" in p), _one_line(untrusted))
        (home / "right-ca.pem").replace(ca)

        closed = run_check(f"127.0.0.1:{free_port()}", GOVERNORD_ATTEMPTS="1")
        assert closed.returncode == 1 and _matches(next(p for p in wrong if "(7)" in p), closed.stderr)
        assert len(daemon.ctl_json("requests", "list")) == 1
    finally:
        daemon.stop()
