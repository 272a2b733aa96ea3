"""The OpenShift hook scripts, run for real: as a v2 gear and a v4 lifecycle-hook pod would run
them (their environment, their install layout), against a real HTTPS server on 127.0.0.1 that
verifies every delivery with governord.webhooks.verify and records what arrived."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from governord.pki import CertificateAuthority, IssuedPair
from governord.webhooks import (
    APPLICATION_HEADER,
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeployEvent,
    WebhookRefused,
    sign,
    verify,
)

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ROOT / "hooks" / "openshift"
SCRIPTS = ["deploy", "post_deploy", "teardown", "drained", "lib/governord-hook.sh"]
SECRET = "s3cr3t-for-the-shop-application"

# what a v2 gear's environment holds (names from the OSE 2 cartridge guide; values made up)
V2_ENV = {
    "OPENSHIFT_APP_NAME": "shop",
    "OPENSHIFT_NAMESPACE": "acme",
    "OPENSHIFT_APP_DNS": "shop-acme.rhcloud.com",
    "OPENSHIFT_APP_UUID": "52e9a2b6e0b8cd8a6b000012",
    "OPENSHIFT_GEAR_UUID": "52e9a2b6e0b8cd8a6b000012",
    "OPENSHIFT_GEAR_NAME": "shop",
    "OPENSHIFT_GEAR_DNS": "shop-acme.rhcloud.com",
    "OPENSHIFT_CLOUD_DOMAIN": "rhcloud.com",
    "OPENSHIFT_DEPLOYMENT_BRANCH": "master",
    "OPENSHIFT_DEPLOYMENT_TYPE": "git",
    "OPENSHIFT_SECRET_TOKEN": "not-for-governord-0123456789",
}
# what a DeploymentConfig's "pre" hook pod gets from the deployer and the kubelet
V4_ENV = {
    "OPENSHIFT_DEPLOYMENT_NAME": "frontend-3",
    "OPENSHIFT_DEPLOYMENT_NAMESPACE": "shop-prod",
    "HOSTNAME": "frontend-3-hook-pre",
    "KUBERNETES_SERVICE_HOST": "172.30.0.1",
}


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    refused: WebhookRefused | None
    event: DeployEvent | None
    client_cn: str | None


@dataclass
class Governor:
    """A stand-in for governord's webhook endpoint."""

    url: str
    secrets: list[bytes]
    deliveries: list[Delivery] = field(default_factory=list)
    #: (status, body) answered to the next verified deliveries, before the default 202
    script: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        cn = next((v for rdn in (peercert or {}).get("subject", ()) for k, v in rdn if k == "commonName"), None)
        record = Delivery(dict(request.headers), raw, None, None, cn)
        self.deliveries.append(record)
        try:
            delivery = verify(self.secrets, request.headers, raw, now=time.time())
        except WebhookRefused as exc:
            record.refused = exc
            return web.json_response({"error": exc.reason, "field": exc.field}, status=exc.status)
        if self.script:
            status, body = self.script.pop(0)
            return web.json_response(body, status=status)
        try:
            record.event = DeployEvent.model_validate_json(raw)
        except ValidationError as exc:
            return web.json_response({"error": str(exc), "field": None}, status=422)
        return web.json_response({"delivery": delivery}, status=202)


@dataclass
class Pki:
    ca: Path
    server: IssuedPair
    client: IssuedPair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    authority = CertificateAuthority(tmp_path_factory.mktemp("pki"))
    authority.ensure()
    return Pki(
        authority.cert_path,
        authority.issue("127.0.0.1", server_names=["127.0.0.1"], stem="server"),
        authority.issue("shop", stem="shop"),
    )


@pytest.fixture
async def governor(pki: Pki) -> AsyncIterator[Governor]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server.certificate, pki.server.key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_OPTIONAL
    gov = Governor(url="", secrets=[SECRET.encode()])
    app = web.Application()
    app.router.add_post("/v1/webhooks/openshift", gov.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    gov.url = f"https://127.0.0.1:{port}/v1/webhooks/openshift"
    yield gov
    await runner.cleanup()


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def v2_repo(tmp_path: Path) -> Path:
    """An application repository with the hooks installed as the README says."""
    hooks = tmp_path / "repo" / ".openshift" / "action_hooks"
    hooks.parent.mkdir(parents=True)
    shutil.copytree(HOOKS, hooks, ignore=shutil.ignore_patterns("*.md"))
    return hooks


def base_env(tmp_path: Path, gov: Governor, pki: Pki, **extra: str) -> dict[str, str]:
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    # a clean environment: no proxies, nothing from the developer's shell
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "GOVERNORD_URL": gov.url,
        "GOVERNORD_CA_FILE": str(pki.ca),
        "GOVERNORD_SECRET_FILE": str(secret_file),
        "GOVERNORD_RETRY_DELAY": "0",
    }
    env.update(extra)
    return env


async def run(command: list[str | Path], env: dict[str, str], cwd: Path | None = None) -> Run:
    # asynchronous, so the server on this event loop keeps answering while the script runs
    proc = await asyncio.create_subprocess_exec(
        *map(str, command), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    result = Run(proc.returncode, out.decode(), err.decode())
    assert SECRET not in result.stdout + result.stderr, "the secret was printed"
    return result


def only(gov: Governor) -> Delivery:
    assert len(gov.deliveries) == 1, gov.deliveries
    return gov.deliveries[0]


# --- events as v2 and v4 send them ---------------------------------------------------------


@pytest.mark.parametrize("shell", ["sh", "bash"])
@pytest.mark.parametrize("event", ["deploy", "post_deploy", "teardown"])
async def test_v2_action_hook(governor: Governor, pki: Pki, v2_repo: Path, tmp_path: Path,
                              shell: str, event: str) -> None:
    env = base_env(tmp_path, governor, pki, **V2_ENV, OPENSHIFT_REPO_DIR=str(v2_repo.parents[1]))
    # sh is dash here (Debian); RHEL's /bin/sh is bash
    result = await run([shell, v2_repo / event], env, cwd=v2_repo.parents[1])
    assert result.returncode == 0, result.stderr
    got = only(governor)
    assert got.refused is None
    assert got.event is not None
    assert got.event.model_dump(exclude_none=True) == {
        "event": event, "openshift_version": "v2", "app": "shop", "namespace": "acme",
        "dns": "shop-acme.rhcloud.com", "gear_uuid": "52e9a2b6e0b8cd8a6b000012",
        "app_uuid": "52e9a2b6e0b8cd8a6b000012", "branch": "master",
    }
    assert b"not-for-governord" not in got.body
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers[APPLICATION_HEADER] == "shop"
    assert abs(int(got.headers[TIMESTAMP_HEADER]) - time.time()) < 30
    delivery = got.headers[DELIVERY_HEADER]
    assert len(delivery) == 36 and delivery.count("-") == 4
    # the same signature governord's own signer makes
    assert got.headers[SIGNATURE_HEADER] == sign(
        SECRET.encode(), delivery, int(got.headers[TIMESTAMP_HEADER]), got.body)
    assert result.stderr.count("\n") == 1 and "governord accepted the" in result.stderr
    assert f"delivery {delivery}" in result.stderr


@pytest.mark.parametrize("event", ["deploy", "post_deploy", "teardown"])
async def test_v4_lifecycle_hook_pod(governor: Governor, pki: Pki, tmp_path: Path, event: str) -> None:
    env = base_env(tmp_path, governor, pki, **V4_ENV, GOVERNORD_COMPONENT="web",
                   GOVERNORD_DNS="shop.apps.example.com", GOVERNORD_APPLICATION="webshop")
    # from a Secret through execNewPod.env (secretKeyRef) rather than a mounted file
    del env["GOVERNORD_SECRET_FILE"]
    env["GOVERNORD_SECRET"] = SECRET
    result = await run([HOOKS / event], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    got = only(governor)
    assert got.event is not None
    assert got.event.model_dump(exclude_none=True) == {
        "event": event, "openshift_version": "v4", "app": "frontend", "namespace": "shop-prod",
        "deployment": "frontend-3", "pod": "frontend-3-hook-pre", "component": "web",
        "dns": "shop.apps.example.com",
    }
    assert got.headers[APPLICATION_HEADER] == "webshop"


@pytest.mark.parametrize("generation", ["v2", "v4"])
async def test_the_drained_hook_names_its_host(governor: Governor, pki: Pki, tmp_path: Path, v2_repo: Path,
                                               generation: str) -> None:
    env = base_env(tmp_path, governor, pki, **(V2_ENV if generation == "v2" else V4_ENV))
    script = v2_repo / "drained" if generation == "v2" else HOOKS / "drained"
    result = await run([script, "ose-node-03.example.com"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    got = only(governor)
    assert got.event is not None and got.event.event == "drained"
    assert got.event.host == "ose-node-03.example.com" and got.event.openshift_version == generation
    assert "drained event for" in result.stderr and "(host ose-node-03.example.com)" in result.stderr


async def test_a_refused_drained_event_fails_the_hook(governor: Governor, pki: Pki, tmp_path: Path) -> None:
    """governord's 409 (the host is not draining) fails the script with governord's words."""
    governor.script.append((409, {"delivery": "x", "decision": "refused", "request": None,
                                  "reason": "host ose-node-03 is ready, not draining"}))
    result = await run([HOOKS / "drained", "ose-node-03"], base_env(tmp_path, governor, pki, **V4_ENV))
    assert result.returncode == 1
    assert result.stderr.rstrip("\n").endswith("HTTP 409: refused: host ose-node-03 is ready, not draining")
    assert len(governor.deliveries) == 1


#: a decline as governord answers it: the reply's own fields, then the request, whose fields and
#: hosts' fields have the same names (a failed host's error, the request's reason)
DECLINED = {
    "delivery": "d-1", "decision": "declined", "reason": "cap reached: application shop may have 2 hosts",
    "message": "declined (request r-1): cap reached: application shop may have 2 hosts",
    "request": {"id": "r-1", "reason": "the request's own", "decision": "declined",
                "hosts": [{"error": "a host's error", "message": "not this"}]},
}


@pytest.mark.parametrize(("answer", "printed"), [
    (DECLINED, "HTTP 409: declined (request r-1): cap reached: application shop may have 2 hosts"),
    # an older governord's reply, without the message: its decision and reason
    ({**{k: v for k, v in DECLINED.items() if k != "message"}, "request": None},
     "HTTP 409: declined: cap reached: application shop may have 2 hosts"),
    # the request first: only the top-level fields count
    ({"request": DECLINED["request"], "delivery": "d-1", "decision": "declined", "reason": "over \"the\" cap\n"},
     'HTTP 409: declined: over "the" cap'),
])
@pytest.mark.parametrize("hook", ["deploy", "post_deploy"])
async def test_a_decline_prints_governords_reason_and_fails_a_deploy(
        governor: Governor, pki: Pki, tmp_path: Path, answer: dict[str, Any], printed: str, hook: str) -> None:
    """A 409 is a decision, printed as governord's one-line message (or decision and reason),
    never as the reply's JSON; it fails the deploy hook, and the post_deploy hook fails open."""
    governor.script.append((409, answer))
    result = await run([HOOKS / hook], base_env(tmp_path, governor, pki, **V4_ENV))
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"governord-hook: governord answered the {hook} event for shop-prod/frontend (v4, ")
    assert lines[0].endswith(printed) and "{" not in lines[0]
    if hook == "deploy":
        assert result.returncode == 1 and len(lines) == 1
    else:
        assert result.returncode == 0 and "continuing the deployment anyway" in lines[1]


async def test_a_request_held_for_approval_is_said_so_and_the_deploy_goes_on(
        governor: Governor, pki: Pki, tmp_path: Path) -> None:
    message = ("held for an operator's approval (request r-2): pending approval: application shop needs an "
               "operator's approval for every request; an operator decides with: governord-ctl requests "
               "approve|deny r-2 -m REASON")
    governor.script.append((202, {"delivery": "d-2", "decision": "pending", "reason": "pending approval: ...",
                                  "message": message, "request": {"id": "r-2", "hosts": []}}))
    result = await run([HOOKS / "deploy"], base_env(tmp_path, governor, pki, **V4_ENV))
    assert result.returncode == 0
    assert result.stderr.splitlines() == [line for line in result.stderr.splitlines() if line.endswith(
        f"HTTP 202: {message}")] != []


@pytest.mark.parametrize(("args", "message"), [
    ([], "usage: drained HOST"),
    (["-rf"], "not a host name: '-rf'"),
    (["a host"], "not a host name: 'a host'"),
    (["$(id)"], "not a host name"),
])
async def test_the_drained_hook_without_a_host_sends_nothing(governor: Governor, pki: Pki, tmp_path: Path,
                                                             args: list[str], message: str) -> None:
    result = await run([HOOKS / "drained", *args], base_env(tmp_path, governor, pki, **V4_ENV))
    assert result.returncode == 2 and message in result.stderr
    assert governor.deliveries == []


def test_only_a_drained_event_names_a_host() -> None:
    base = {"openshift_version": "v4", "app": "frontend", "namespace": "shop-prod"}
    DeployEvent.model_validate({**base, "event": "drained", "host": "ose-node-03"})
    for wrong in ({**base, "event": "drained"}, {**base, "event": "deploy", "host": "ose-node-03"}):
        with pytest.raises(ValidationError, match="a drained event names its host"):
            DeployEvent.model_validate(wrong)


async def test_rotated_secrets_and_crlf_secret_files(governor: Governor, pki: Pki, tmp_path: Path) -> None:
    env = base_env(tmp_path, governor, pki, **V4_ENV)
    Path(env["GOVERNORD_SECRET_FILE"]).write_bytes(b"new-secret\r\n\n")
    governor.secrets = [b"new-secret", SECRET.encode()]
    result = await run([HOOKS / "deploy"], env)
    assert result.returncode == 0, result.stderr
    assert only(governor).refused is None


# --- retries, refusals, failure policy -----------------------------------------------------


async def test_503_twice_then_202_is_three_attempts_of_one_delivery(
        governor: Governor, pki: Pki, tmp_path: Path) -> None:
    governor.script = [(503, {"error": "store busy", "field": None})] * 2
    result = await run([HOOKS / "deploy"], base_env(tmp_path, governor, pki, **V4_ENV))
    assert result.returncode == 0, result.stderr
    assert len(governor.deliveries) == 3
    assert all(d.refused is None for d in governor.deliveries)  # each attempt signed validly
    assert len({d.headers[DELIVERY_HEADER] for d in governor.deliveries}) == 1
    assert len({d.body for d in governor.deliveries}) == 1
    assert "attempt 1 of 4: governord answered HTTP 503: store busy; retrying" in result.stderr
    assert "attempt 2 of 4" in result.stderr and "governord accepted" in result.stderr


async def test_retries_give_up_after_the_attempts(governor: Governor, pki: Pki, tmp_path: Path) -> None:
    governor.script = [(502, {"error": "bad gateway", "field": None})] * 5
    env = base_env(tmp_path, governor, pki, **V4_ENV, GOVERNORD_ATTEMPTS="2")
    result = await run([HOOKS / "deploy"], env)
    assert result.returncode == 1
    assert len(governor.deliveries) == 2
    assert "after 2 attempt(s): governord answered HTTP 502: bad gateway" in result.stderr


async def test_401_fails_the_deploy_with_governords_message(governor: Governor, pki: Pki, tmp_path: Path) -> None:
    env = base_env(tmp_path, governor, pki, **V2_ENV)
    governor.secrets = [b"the secret governord really has"]
    result = await run([HOOKS / "deploy"], env)
    assert result.returncode == 1
    got = only(governor)  # a refusal is not retried
    assert got.refused is not None and got.refused.status == 401
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("governord-hook: governord refused the deploy event for acme/shop (v2, delivery ")
    assert lines[0].endswith("HTTP 401: signature does not match")


async def test_422_names_the_field(governor: Governor, pki: Pki, tmp_path: Path) -> None:
    governor.script = [(422, {"error": "app: String should match pattern", "field": "app"})]
    result = await run([HOOKS / "deploy"], base_env(tmp_path, governor, pki, **V4_ENV))
    assert result.returncode == 1
    assert result.stderr.strip().endswith("HTTP 422: app: String should match pattern")


@pytest.mark.parametrize(("event", "fail_open", "expected"), [
    ("deploy", None, 1), ("deploy", "1", 0), ("deploy", "0", 1),
    ("post_deploy", None, 0), ("post_deploy", "0", 1), ("post_deploy", "1", 0),
    ("teardown", None, 1), ("teardown", "1", 0),
])
async def test_failure_policy(governor: Governor, pki: Pki, tmp_path: Path,
                              event: str, fail_open: str | None, expected: int) -> None:
    governor.secrets = [b"another"]
    env = base_env(tmp_path, governor, pki, **V4_ENV)
    if fail_open is not None:
        env["GOVERNORD_FAIL_OPEN"] = fail_open
    result = await run([HOOKS / event], env)
    assert result.returncode == expected
    assert "HTTP 401: signature does not match" in result.stderr
    assert ("continuing the deployment anyway" in result.stderr) == (expected == 0)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_governord_is_retried_then_fails(governor: Governor, pki: Pki, tmp_path: Path) -> None:
    env = base_env(tmp_path, governor, pki, **V4_ENV, GOVERNORD_ATTEMPTS="3",
                   GOVERNORD_URL=f"https://127.0.0.1:{closed_port()}/v1/webhooks/openshift")
    result = await run([HOOKS / "deploy"], env)
    assert result.returncode == 1
    assert result.stderr.count("cannot reach governord") == 3
    assert "after 3 attempt(s)" in result.stderr


async def test_an_untrusted_server_certificate_is_not_retried(governor: Governor, pki: Pki, tmp_path: Path) -> None:
    env = base_env(tmp_path, governor, pki, **V4_ENV)
    del env["GOVERNORD_CA_FILE"]  # the system trust store does not know the throw-away CA
    result = await run([HOOKS / "deploy"], env)
    assert result.returncode == 1
    assert governor.deliveries == []
    assert "after 1 attempt(s)" in result.stderr and "certificate" in result.stderr


async def test_a_curlrc_cannot_switch_verification_off(governor: Governor, pki: Pki, tmp_path: Path) -> None:
    """curl runs with -q: the HOME's .curlrc (here `insecure`) is not read, so a server whose
    certificate is not trusted is still refused (it was delivered to before)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".curlrc").write_text("insecure\n")
    env = base_env(tmp_path, governor, pki, **V4_ENV, HOME=str(home), CURL_HOME=str(home))
    del env["GOVERNORD_CA_FILE"]  # the throw-away CA is not in the system trust store
    result = await run([HOOKS / "deploy"], env)
    assert result.returncode == 1, result.stderr
    assert governor.deliveries == []
    assert "after 1 attempt(s)" in result.stderr and "certificate" in result.stderr


async def test_the_secret_from_a_mounted_kubernetes_secret(governor: Governor, pki: Pki, tmp_path: Path) -> None:
    """A Secret mounted as a volume, as the kubelet lays it out (each key a symlink through
    ..data to a timestamped directory), read through GOVERNORD_SECRET_FILE."""
    mount = tmp_path / "etc-governord-secret"
    payload = mount / "..2026_12_03_18_00_00.000000001"
    payload.mkdir(parents=True)
    (payload / "secret").write_text(SECRET)  # the kubelet writes the value as it is, no newline
    (mount / "..data").symlink_to(payload.name)
    (mount / "secret").symlink_to("..data/secret")
    env = base_env(tmp_path, governor, pki, **V4_ENV, GOVERNORD_SECRET_FILE=str(mount / "secret"))
    result = await run([HOOKS / "teardown"], env)
    assert result.returncode == 0, result.stderr
    got = only(governor)
    assert got.refused is None and got.event is not None and got.event.event == "teardown"


async def test_client_certificate(governor: Governor, pki: Pki, tmp_path: Path) -> None:
    env = base_env(tmp_path, governor, pki, **V4_ENV, GOVERNORD_CERT_FILE=str(pki.client.certificate),
                   GOVERNORD_KEY_FILE=str(pki.client.key))
    result = await run([HOOKS / "deploy"], env)
    assert result.returncode == 0, result.stderr
    assert only(governor).client_cn == "shop"


# --- configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    ({"GOVERNORD_SECRET_FILE": None}, "no secret: set GOVERNORD_SECRET_FILE"),
    ({"GOVERNORD_SECRET_FILE": "/nonexistent/secret"}, "cannot read the secret file GOVERNORD_SECRET_FILE=/nonexistent/secret"),
    ({"GOVERNORD_SECRET_FILE": None, "GOVERNORD_SECRET": ""}, "no secret"),
    ({"GOVERNORD_URL": None}, "GOVERNORD_URL is not set"),
    ({"GOVERNORD_URL": "http://127.0.0.1:1/v1/webhooks/openshift"}, "GOVERNORD_URL must be an https:// URL"),
    ({"GOVERNORD_CA_FILE": "/nonexistent/ca.pem"}, "cannot read GOVERNORD_CA_FILE=/nonexistent/ca.pem"),
    ({"GOVERNORD_ATTEMPTS": "many"}, "GOVERNORD_ATTEMPTS must be a whole number"),
    ({"GOVERNORD_APPLICATION": "shop\r\nX-Injected: 1"}, "GOVERNORD_APPLICATION must be"),
    ({"GOVERNORD_FAIL_OPEN": "maybe"}, "GOVERNORD_FAIL_OPEN must be 1 or 0"),
    ({"OPENSHIFT_DEPLOYMENT_NAMESPACE": None}, "one is missing"),
])
async def test_misconfiguration_fails_clearly_and_sends_nothing(
        governor: Governor, pki: Pki, tmp_path: Path, change: dict[str, str | None], message: str) -> None:
    env = base_env(tmp_path, governor, pki, **V4_ENV)
    for name, value in change.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    result = await run([HOOKS / "deploy"], env)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert governor.deliveries == []


async def test_outside_openshift_fails_clearly(governor: Governor, pki: Pki, tmp_path: Path) -> None:
    result = await run([HOOKS / "deploy"], base_env(tmp_path, governor, pki))
    assert result.returncode == 2
    assert "neither an OpenShift v2 gear (OPENSHIFT_APP_NAME) nor a v4 lifecycle-hook pod" in result.stderr


async def test_the_secret_is_never_traced_nor_on_a_command_line(
        governor: Governor, pki: Pki, tmp_path: Path) -> None:
    # shims that log every openssl and curl command line, then run the real program
    shims, log = tmp_path / "shims", tmp_path / "argv.log"
    shims.mkdir()
    for name in ("openssl", "curl"):
        real = shutil.which(name)
        assert real
        shim = shims / name
        shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >>"{log}"\nexec "{real}" "$@"\n')
        shim.chmod(0o755)
    env = base_env(tmp_path, governor, pki, **V4_ENV)
    del env["GOVERNORD_SECRET_FILE"]
    env["GOVERNORD_SECRET"] = SECRET
    env["PATH"] = f"{shims}:{env['PATH']}"
    result = await run(["sh", "-x", HOOKS / "deploy"], env)  # run() also asserts SECRET is not printed
    assert result.returncode == 0, result.stderr
    assert "+ governord_hook deploy" in result.stderr  # xtrace was on
    argv = log.read_text()
    assert "openssl dgst -sha256 -binary" in argv and "curl " in argv
    # and curl is told first not to read a ~/.curlrc
    assert all(line.startswith("curl -q ") for line in argv.splitlines() if line.startswith("curl"))
    assert SECRET not in argv and "-hmac" not in argv


# --- the library's pieces against governord's own code --------------------------------------


def lib_call(snippet: str, **env: str) -> str:
    return subprocess.run(
        ["sh", "-c", f'. "{HOOKS}/lib/governord-hook.sh" && {snippet}'],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        capture_output=True, text=True, check=True,
    ).stdout


@pytest.mark.parametrize("secret", [
    "k", "x" * 63, "x" * 64, "x" * 65, "y" * 200,
    "pässwörd with spaces, \"quotes\", 'apostrophes', $dollars, `backticks` and \\backslashes\\",
])
@pytest.mark.parametrize("body", [b"{}", b'{"app":"shop"}' * 500])
def test_shell_signature_equals_governord_sign(tmp_path: Path, secret: str, body: bytes) -> None:
    path = tmp_path / "body"
    path.write_bytes(body)
    got = lib_call(f'governord_sign 6f0c2c1e-0000-4000-8000-000000000001 1700000000 "{path}"',
                   governord_secret=secret)
    assert got == sign(secret.encode(), "6f0c2c1e-0000-4000-8000-000000000001", 1_700_000_000, body)


def test_json_strings_are_escaped() -> None:
    nasty = 'quote " backslash \\ newline \n tab \t bell \a unicode ü €'
    out = lib_call('governord_json a "$A" empty "" b "$B"', A=nasty, B="$(not run)")
    assert json.loads(out) == {"a": nasty, "b": "$(not run)"}


# --- the files themselves -------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_executable(name: str) -> None:
    path = HOOKS / name
    assert path.stat().st_mode & stat.S_IXUSR and path.stat().st_mode & stat.S_IXOTH, f"{name} is not executable"
    listed = subprocess.run(["git", "ls-files", "-s", "--", str(path.relative_to(ROOT))],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if listed:  # once committed, the index must say so too, or OpenShift gets a non-executable copy
        assert listed[0] == "100755", f"{name} is {listed[0]} in git: git update-index --chmod=+x"


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: apt-get install shellcheck (Debian/Ubuntu package 'shellcheck')"
    result = subprocess.run([shellcheck, "--external-sources", *SCRIPTS], cwd=HOOKS, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_script_starts_with_a_shebang() -> None:
    for name in SCRIPTS:
        assert (HOOKS / name).read_text().startswith("#!/bin/sh\n"), name


@pytest.fixture(autouse=True)
def _no_stray_temporary_files(tmp_path: Path) -> Iterator[None]:
    yield
    assert not list(tmp_path.glob("governord-hook.*")), "a hook left its temporary directory behind"
