"""``governord-autosign`` (the real executable) against the autosign socket's application, served
by an in-process runtime: it exits 0 only on an explicit "sign"; a usage error, no daemon, an
HTTP error or a malformed CSR refuse. The socket answers nothing but the decision, and the admin
API no longer serves it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from governord import testing
from governord.api.admin_api import create_admin_api
from governord.api.autosign_api import create_autosign_api
from governord.autosign_cli import certname_of
from governord.runtime import Runtime

from .conftest import wait_states
from .test_autosign import csr

AUTOSIGN = Path(sys.executable).parent / "governord-autosign"


def run_autosign(args: list[str], socket_path: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GOVERNORD_AUTOSIGN_SOCKET": str(socket_path)}
    return subprocess.run([str(AUTOSIGN), *args], input=stdin, env=env, capture_output=True, text=True, timeout=60)


def test_certname_as_puppet_passes_it_or_after_a_double_dash() -> None:
    assert certname_of(["n1.lab.example"]) == "n1.lab.example"
    assert certname_of(["--", "n1.lab.example"]) == "n1.lab.example"
    assert certname_of(["--", "-h"]) == "-h"  # after --, a name, whatever it looks like
    for usage in ([], ["-h"], ["--help"], ["--"], [""], ["a", "b"], ["--", "a", "b"], ["--socket=x", "a"]):
        assert certname_of(usage) is None, usage


@pytest.mark.parametrize("args", [["-h"], ["--help"], ["--", "-h"], ["--", "--help"], ["n1.lab.example"],
                                  ["--", "n1.lab.example"], [], ["a.lab.example", "b.lab.example"]])
def test_without_a_daemon_nothing_is_signed(args: list[str], tmp_path: Path) -> None:
    """Before, ``governord-autosign -h`` (or ``--help``) printed the help and exited 0: a CSR for
    the certname "-h" was signed whether the daemon was up or not."""
    done = run_autosign(args, tmp_path / "nobody-listens.sock", stdin=csr("n1.lab.example", "t"))
    assert done.returncode != 0, (args, done)
    if not args or args[0] in ("-h", "--help") or len(args) > 1 and args[0] != "--":
        assert done.returncode == 2 and "usage: governord-autosign" in done.stderr
    else:
        assert done.returncode == 3 and "cannot ask governord" in done.stderr


@pytest.fixture
async def served(make_runtime, tmp_path: Path) -> AsyncIterator[tuple[Runtime, dict, Path]]:  # type: ignore[no-untyped-def,type-arg]
    """A host being brought up with a token, and the autosign application on a Unix socket."""
    testing.MemoryRegistrar.preauthorise["cmdb"] = True
    testing.MemoryRegistrar.readiness["cmdb"] = {"demo-node-01.lab.example": False}
    runtime: Runtime = await make_runtime()
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
    [row] = await wait_states(runtime, decision.request["host_ids"], {"configuring"})
    runner = web.AppRunner(create_autosign_api(runtime))
    await runner.setup()
    path = tmp_path / "autosign.sock"
    await web.UnixSite(runner, str(path)).start()
    try:
        yield runtime, row, path
    finally:
        await runner.cleanup()
        await runtime.stop()


async def test_it_signs_only_on_an_explicit_sign(served: tuple[Runtime, dict, Path]) -> None:  # type: ignore[type-arg]
    runtime, row, path = served
    fqdn, token = row["fqdn"], row["registrations"]["cmdb"]["autosign_token"]

    async def autosign(args: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(run_autosign, args, path, stdin)

    refused = await autosign([fqdn], csr(fqdn, "guessed"))
    assert refused.returncode == 1 and "not the token issued for this host" in refused.stderr
    # an HTTP error: the daemon takes no empty CSR (422), nor a certname it could not be
    not_a_csr = await autosign([fqdn], "")
    assert not_a_csr.returncode == 1 and "csr" in not_a_csr.stderr
    bad_name = await autosign(["--", "-h"], csr("-h", token))
    assert bad_name.returncode == 1 and "certname" in bad_name.stderr
    # a malformed CSR (PEM armour, no request inside)
    garbage = "-----BEGIN CERTIFICATE REQUEST-----\n" + "QUJD" * 40 + "\n-----END CERTIFICATE REQUEST-----\n"
    malformed = await autosign([fqdn], garbage)
    assert malformed.returncode == 1 and "not a PEM certificate request" in malformed.stderr

    signed = await autosign(["--", fqdn], csr(fqdn, token))
    assert signed.returncode == 0 and signed.stderr == "", signed.stderr
    again = await autosign([fqdn], csr(fqdn, token))
    assert again.returncode == 1 and "the token was used already" in again.stderr
    kinds = [e["kind"] for e in await runtime.store.list_events(host_id=row["id"], kind_prefix="autosign-")]
    assert kinds == ["autosign-refused", "autosign-refused", "autosign-signed", "autosign-refused"]
    assert all(e["actor"] == "puppet-autosign"
               for e in await runtime.store.list_events(host_id=row["id"], kind_prefix="autosign-"))


async def test_the_socket_answers_nothing_but_the_decision(served: tuple[Runtime, dict, Path]) -> None:  # type: ignore[type-arg]
    runtime, row, path = served
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session:
        for method, where in (("GET", "/v1/hosts"), ("GET", f"/v1/hosts/{row['name']}"), ("GET", "/v1/status"),
                              ("GET", "/openapi.json"), ("GET", "/metrics"), ("GET", "/healthz"),
                              ("POST", f"/v1/hosts/{row['name']}/retire"), ("POST", "/v1/apps/demo/certificate"),
                              ("GET", "/v1/autosign"), ("GET", "/v1/audit")):
            async with session.request(method, f"http://governord{where}") as resp:
                assert resp.status in (404, 405), (method, where, resp.status)
                assert row["registrations"]["cmdb"]["autosign_token"] not in await resp.text()
    [host] = await runtime.store.list_hosts(ids=[row["id"]])
    assert host["state"] == "configuring" and not host["retire_requested"]


async def test_the_admin_api_no_longer_decides_autosign(served: tuple[Runtime, dict, Path], tmp_path: Path) -> None:  # type: ignore[type-arg]
    runtime, row, _ = served
    runner = web.AppRunner(create_admin_api(runtime))
    await runner.setup()
    path = tmp_path / "admin.sock"
    await web.UnixSite(runner, str(path)).start()
    try:
        fqdn, token = row["fqdn"], row["registrations"]["cmdb"]["autosign_token"]
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session:
            async with session.post("http://governord/v1/autosign", json={"certname": fqdn,
                                                                          "csr": csr(fqdn, token)}) as resp:
                assert resp.status == 404
        # nor does governord-autosign pointed at the admin socket sign
        done = await asyncio.to_thread(run_autosign, [fqdn], path, csr(fqdn, token))
        assert done.returncode == 1 and "HTTP 404" in done.stderr
        assert await runtime.store.list_events(host_id=row["id"], kind_prefix="autosign-") == []
    finally:
        await runner.cleanup()
