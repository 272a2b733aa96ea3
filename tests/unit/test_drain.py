"""Drain before retire ([applications.APP.drain]): a ready host a scale-down picks waits in
``draining`` until the application confirms, a ``governord_drain_host`` plugin (or the built-in
``[drain.command]``, a real script here) says it drained, or the timeout passes; the application
is sent a signed ``draining`` event at a real aiohttp server on loopback, verified with
governord.webhooks; the machine and the registrations really go (the in-memory provider and
registrar are asked). On SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select

from governord import hookimpl, testing, webhooks
from governord.api import admin_api
from governord.models import HostView
from governord.rules import RequestError
from governord.runtime import Runtime
from governord.store.schema import callbacks

from .conftest import BACKENDS, wait_states

STORE_BACKENDS = BACKENDS

SECRET = "drain-test-secret"
SIGNED = ('\n[applications.demo.webhook]\nsecrets = [{ env = "GOVERNORD_TEST_DRAIN_SECRET" }]\n'
          '[applications.demo.callbacks]\nallow_http = true\nallow_networks = ["127.0.0.0/8"]\n')
OTHER_APP = """
[applications.other]
max_hosts = 2
[applications.other.roles.node]
tags = ["node"]
provider = "mem"
profile = { size = "small" }
"""


def drain(url: str | None = None, *, timeout: float = 600, on_timeout: str = "proceed") -> str:
    section = f'\n[applications.demo.drain]\ntimeout = {timeout}\non_timeout = "{on_timeout}"\n'
    return SIGNED + section + (f'callback_url = "{url}"\n' if url else "")


class Receiver:
    """The application's drain endpoint: each delivery verified with governord.webhooks."""

    def __init__(self) -> None:
        self.url = ""
        self.arrived: list[tuple[str, dict[str, Any]]] = []

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        delivery = webhooks.verify([SECRET.encode()], request.headers, body, now=time.time())
        self.arrived.append((delivery, await request.json()))
        return web.Response(status=204)

    async def wait(self, count: int, timeout: float = 15) -> list[tuple[str, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while len(self.arrived) < count:
            assert time.monotonic() < deadline, f"{len(self.arrived)} of {count} callbacks arrived"
            await asyncio.sleep(0.05)
        return self.arrived


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Receiver]:
    monkeypatch.setenv("GOVERNORD_TEST_DRAIN_SECRET", SECRET)
    endpoint = Receiver()
    app = web.Application()
    app.router.add_post("/drain", endpoint.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    endpoint.url = f"http://127.0.0.1:{runner.addresses[0][1]}/drain"
    yield endpoint
    await runner.cleanup()


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOVERNORD_TEST_DRAIN_SECRET", SECRET)


async def ready_hosts(runtime: Runtime, count: int) -> list[dict[str, Any]]:
    decision = await runtime.governor.scale("demo", "node", add=count, actor="t")
    rows = await wait_states(runtime, decision.request["host_ids"], {"ready"})
    return sorted(rows, key=lambda r: r["name"])


async def kinds(runtime: Runtime, host_id: str) -> list[str]:
    return [e["kind"] for e in await runtime.store.list_events(host_id=host_id)]


async def event(runtime: Runtime, host_id: str, kind: str) -> dict[str, Any]:
    [found] = [e for e in await runtime.store.list_events(host_id=host_id) if e["kind"] == kind]
    return found


def machines() -> set[str | None]:
    return {m.host_id for m in testing.MemoryProvider.worlds["mem"].values()}


class Events:
    """Records governord_host_event, as a site plugin gets it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    def governord_host_event(self, host: HostView, event: str, detail: dict[str, Any]) -> None:
        self.seen.append((host.name, event))


async def test_a_scale_down_drains_notifies_signed_and_retires_once_confirmed(
        make_runtime: Callable[..., Any], receiver: Receiver) -> None:
    runtime: Runtime = await make_runtime(drain(receiver.url))
    seen = Events()
    runtime.plugins.register(seen, "events")
    try:
        one, two = await ready_hosts(runtime, 2)
        down = await runtime.governor.scale("demo", "node", count=1, actor="t")
        assert down.request["state"] == "accepted"
        [row] = await wait_states(runtime, [two["id"]], {"draining"})
        assert (await runtime.governor.request_status(down.request))["status"] == "in-progress"
        requested = await event(runtime, two["id"], "drain-requested")
        assert requested["detail"]["deadline"] == pytest.approx(row["state_since"] + 600)
        # the application is told, signed with its webhook secret (verified by the receiver)
        [(delivery, body)] = await receiver.wait(1)
        assert body["event"] == "draining" and body["delivery"] == delivery == requested["detail"]["delivery"]
        assert body["host"]["name"] == two["name"] and body["host"]["fqdn"] == two["fqdn"]
        assert (body["host"]["app"], body["host"]["role"]) == ("demo", "node")
        assert body["deadline"] == requested["detail"]["deadline"]
        assert (two["name"], "draining") in seen.seen
        # it waits: the machine and its registration are still there, the other host untouched
        await asyncio.sleep(0.5)
        assert (await runtime.store.get_host(two["id"]))["state"] == "draining"  # type: ignore[index]
        assert machines() == {one["id"], two["id"]}
        assert two["fqdn"] in testing.MemoryRegistrar.worlds["cmdb"]

        confirmed, moved = await runtime.governor.confirm_drained("demo", two["name"], by="application", actor="app:demo")
        assert moved and confirmed["retire_requested"]
        await wait_states(runtime, [two["id"]], {"gone"})
        assert machines() == {one["id"]}
        assert two["fqdn"] not in testing.MemoryRegistrar.worlds["cmdb"]
        trail = await kinds(runtime, two["id"])
        assert trail.index("drain-requested") < trail.index("drained") < trail.index("retiring") < trail.index("gone")
        assert (await event(runtime, two["id"], "drained"))["detail"]["by"] == "application"
        assert (await runtime.governor.request_status(down.request))["status"] == "completed"
        # a repeat after it moved on is no error; nothing more happens
        again, moved = await runtime.governor.confirm_drained("demo", two["name"], by="application", actor="app:demo")
        assert not moved and again["state"] == "gone"
        async with runtime.store.engine.connect() as conn:
            [outbox] = (await conn.execute(select(callbacks))).mappings().all()
        assert outbox["delivered_at"] is not None and outbox["host_id"] == two["id"]
    finally:
        await runtime.stop()


async def test_a_second_scale_down_does_not_pick_a_draining_host(make_runtime: Callable[..., Any], secret: None) -> None:
    runtime: Runtime = await make_runtime(drain())
    try:
        hosts = await ready_hosts(runtime, 3)
        first = await runtime.governor.scale("demo", "node", count=2, actor="t")
        second = await runtime.governor.scale("demo", "node", count=1, actor="t")
        [picked_first] = [h["name"] for h in first.hosts or []]
        [picked_second] = [h["name"] for h in second.hosts or []]
        assert (picked_first, picked_second) == (hosts[2]["name"], hosts[1]["name"])
        await wait_states(runtime, [hosts[1]["id"], hosts[2]["id"]], {"draining"})
        # counted as gone by min_hosts, but live against the cap (its machine still exists)
        assert await runtime.store.live_count("demo") == 3
        # the same scale-down again is nothing to do: the draining hosts are on their way out
        third = await runtime.governor.scale("demo", "node", count=1, actor="t")
        assert third.request["params"]["count"] == 1 and third.hosts == []
        # a release by name does not take a draining host either
        with pytest.raises(RequestError) as refused:
            await runtime.governor.release("demo", hosts=[hosts[2]["name"]], actor="t")
        assert refused.value.status == 404
    finally:
        await runtime.stop()


async def test_release_by_count_and_by_name_drain(make_runtime: Callable[..., Any], secret: None) -> None:
    runtime: Runtime = await make_runtime(drain())
    try:
        one, two, three = await ready_hosts(runtime, 3)
        by_count = await runtime.governor.release("demo", role="node", count=1, actor="app:demo")
        by_name = await runtime.governor.release("demo", hosts=[one["name"]], actor="app:demo")
        assert [h["state"] for h in by_count.hosts or []] == ["draining"]
        assert [h["state"] for h in by_name.hosts or []] == ["draining"]
        assert machines() == {one["id"], two["id"], three["id"]}
    finally:
        await runtime.stop()


async def test_without_a_drain_section_a_scale_down_retires_at_once(runtime: Runtime) -> None:
    _one, two = await ready_hosts(runtime, 2)
    await runtime.governor.scale("demo", "node", count=1, actor="t")
    await wait_states(runtime, [two["id"]], {"gone"})
    assert "drain-requested" not in await kinds(runtime, two["id"])


async def test_confirmations_refused_404_and_409(make_runtime: Callable[..., Any], secret: None) -> None:
    runtime: Runtime = await make_runtime(drain() + OTHER_APP)
    try:
        [ready] = await ready_hosts(runtime, 1)
        decision = await runtime.governor.scale("other", "node", add=1, actor="t")
        [theirs] = await wait_states(runtime, decision.request["host_ids"], {"ready"})
        for app, key in (("demo", "no-such-host"), ("demo", theirs["name"]), ("other", ready["name"])):
            with pytest.raises(RequestError) as refused:
                await runtime.governor.confirm_drained(app, key, by="application", actor=f"app:{app}")
            assert (refused.value.status, refused.value.field) == (404, "host")
        with pytest.raises(RequestError) as refused:
            await runtime.governor.confirm_drained("demo", ready["name"], by="application", actor="app:demo")
        assert refused.value.status == 409 and "is ready, not draining" in str(refused.value)
        # retired at once by an operator, it moved on without a drain: a confirmation is still 409
        await runtime.governor.retire(ready["name"], actor="op", now=True)
        await wait_states(runtime, [ready["id"]], {"gone"})
        with pytest.raises(RequestError) as refused:
            await runtime.governor.confirm_drained("demo", ready["id"], by="application", actor="app:demo")
        assert refused.value.status == 409 and "is gone, not draining" in str(refused.value)
    finally:
        await runtime.stop()


async def test_the_timeout_proceeds(make_runtime: Callable[..., Any], secret: None) -> None:
    runtime: Runtime = await make_runtime(drain(timeout=0.5))
    try:
        _one, two = await ready_hosts(runtime, 2)
        started = time.monotonic()
        await runtime.governor.scale("demo", "node", count=1, actor="t")
        await wait_states(runtime, [two["id"]], {"gone"})
        assert time.monotonic() - started >= 0.5
        drained = await event(runtime, two["id"], "drained")
        assert drained["detail"]["by"] == "timeout"
        assert two["id"] not in machines()
    finally:
        await runtime.stop()


async def test_the_timeout_keeps_the_host_and_tells_the_application(
        make_runtime: Callable[..., Any], receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    runtime: Runtime = await make_runtime(drain(receiver.url, timeout=0.5, on_timeout="keep"))
    try:
        _one, two = await ready_hosts(runtime, 2)
        down = await runtime.governor.scale("demo", "node", count=1, actor="t")
        await wait_states(runtime, [two["id"]], {"draining"})
        arrived = await receiver.wait(2)
        assert [body["event"] for _, body in arrived] == ["draining", "drain-cancelled"]
        assert arrived[1][1]["host"]["name"] == two["name"] and "kept" in arrived[1][1]["reason"]
        assert arrived[0][0] != arrived[1][0]  # each event its own delivery
        [row] = await wait_states(runtime, [two["id"]], {"ready"})
        assert not row["retire_requested"] and row["lease_owner"] is None
        assert two["id"] in machines()
        trail = await kinds(runtime, two["id"])
        assert trail[-2:] == ["drain-requested", "drain-timed-out"]
        assert any("not drained within" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
        assert (await runtime.governor.request_status(down.request))["status"] == "completed"
        await asyncio.sleep(0.5)  # and it stays
        assert (await runtime.store.get_host(two["id"]))["state"] == "ready"  # type: ignore[index]
    finally:
        await runtime.stop()


async def test_retire_now_skips_the_drain_and_cuts_one_short(make_runtime: Callable[..., Any], secret: None) -> None:
    runtime: Runtime = await make_runtime(drain())
    try:
        one, two = await ready_hosts(runtime, 2)
        # an operator's plain retire drains too; --now cuts it short
        assert (await runtime.governor.retire(one["name"], actor="op"))["state"] == "draining"
        cut = await runtime.governor.retire(one["name"], actor="op", now=True)
        assert cut["state"] == "draining" and cut["retire_requested"]
        # --now on a ready host skips draining
        skipped = await runtime.governor.retire(two["name"], actor="op", now=True)
        assert skipped["state"] == "retiring"
        await wait_states(runtime, [one["id"], two["id"]], {"gone"})
        assert "drain-requested" not in await kinds(runtime, two["id"])
        trail = await kinds(runtime, one["id"])
        assert trail.index("drain-requested") < trail.index("retiring") and "drained" not in trail
        assert machines() == set()
        # a confirmation of a drain an operator cut short: 409, it did not drain
        with pytest.raises(RequestError) as refused:
            await runtime.governor.confirm_drained("demo", one["id"], by="application", actor="app:demo")
        assert refused.value.status == 409
    finally:
        await runtime.stop()


async def test_a_host_still_coming_up_retires_without_draining(make_runtime: Callable[..., Any], secret: None) -> None:
    runtime: Runtime = await make_runtime(drain())
    try:
        testing.MemoryRegistrar.readiness["cmdb"] = {"demo-node-01.lab.example": False}  # held in configuring
        decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
        [row] = await wait_states(runtime, decision.request["host_ids"], {"configuring"})
        released = await runtime.governor.release("demo", hosts=[row["name"]], actor="app:demo")
        assert released.hosts and released.hosts[0]["state"] != "draining"
        await wait_states(runtime, [row["id"]], {"gone"})
        assert "drain-requested" not in await kinds(runtime, row["id"])
    finally:
        await runtime.stop()


class DrainPlugin:
    """A site's drain: not yet on the first question, drained on the second."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    @hookimpl
    def governord_drain_host(self, host: HostView) -> bool | None:
        if host.app != "demo":
            return None
        self.asked.append(host.name)
        return len(self.asked) >= 2


async def test_a_drain_plugin_says_when_the_host_drained(make_runtime: Callable[..., Any], secret: None) -> None:
    runtime: Runtime = await make_runtime(
        drain(), patch=lambda text: text.replace("[engine]\n", "[engine]\nready_poll_interval = 0.2\n", 1))
    plugin = DrainPlugin()
    runtime.plugins.register(plugin, "site-drain")
    try:
        _one, two = await ready_hosts(runtime, 2)
        await runtime.governor.scale("demo", "node", count=1, actor="t")
        await wait_states(runtime, [two["id"]], {"gone"})
        assert plugin.asked == [two["name"], two["name"]]
        assert (await event(runtime, two["id"], "drained"))["detail"]["by"] == "hook:site-drain"
    finally:
        await runtime.stop()


async def test_the_drain_command_runs_a_real_script(make_runtime: Callable[..., Any], secret: None,
                                                    tmp_path: Path) -> None:
    """[drain.command]: the script is run with the host in its environment; it says "not yet"
    (exit 1) until a file appears, then drained (exit 0)."""
    log = tmp_path / "drain.log"
    go = tmp_path / "go"
    script = tmp_path / "drain.sh"
    script.write_text(f'#!/bin/sh\necho "$GOVERNORD_HOST $GOVERNORD_FQDN $GOVERNORD_APP $GOVERNORD_ROLE $1" >> {log}\n'
                      f'[ -e {go} ] && exit 0\necho "pods still running on $GOVERNORD_HOST"\nexit 1\n')
    script.chmod(0o755)
    command = f'\n[drain.command]\nargv = ["{script}", "--force"]\ntimeout = 10\napplications = ["demo"]\n'
    runtime: Runtime = await make_runtime(
        drain() + command, patch=lambda text: text.replace("[engine]\n", "[engine]\nready_poll_interval = 0.2\n", 1))
    try:
        _one, two = await ready_hosts(runtime, 2)
        await runtime.governor.scale("demo", "node", count=1, actor="t")
        deadline = time.monotonic() + 10
        while len(log.read_text().splitlines() if log.exists() else []) < 2:
            assert time.monotonic() < deadline, "the drain command was not asked again"
            await asyncio.sleep(0.05)
        assert (await runtime.store.get_host(two["id"]))["state"] == "draining"  # type: ignore[index]
        go.touch()
        await wait_states(runtime, [two["id"]], {"gone"})
        lines = set(log.read_text().splitlines())
        assert lines == {f"{two['name']} {two['fqdn']} demo node --force"}
        assert (await event(runtime, two["id"], "drained"))["detail"]["by"] == "hook:builtin:drain-command"
    finally:
        await runtime.stop()


async def test_a_drain_command_past_its_timeout_is_killed_and_not_yet(make_runtime: Callable[..., Any],
                                                                      secret: None, tmp_path: Path) -> None:
    script = tmp_path / "slow.sh"
    script.write_text("#!/bin/sh\nsleep 30\n")
    script.chmod(0o755)
    command = f'\n[drain.command]\nargv = ["{script}"]\ntimeout = 0.3\n'
    runtime: Runtime = await make_runtime(drain(timeout=1.5) + command)
    try:
        _one, two = await ready_hosts(runtime, 2)
        await runtime.governor.scale("demo", "node", count=1, actor="t")
        await wait_states(runtime, [two["id"]], {"gone"}, timeout=20)
        assert (await event(runtime, two["id"], "drained"))["detail"]["by"] == "timeout"
    finally:
        await runtime.stop()


async def test_the_admin_api_retires_now_only_when_asked(make_runtime: Callable[..., Any], secret: None,
                                                         aiohttp_client: Callable[..., Any]) -> None:
    """POST /v1/hosts/{host}/retire (governord-ctl retire): drains; ?now=true does not, and cuts a
    drain short; any other value of now is a 422 naming it, and changes nothing."""
    runtime: Runtime = await make_runtime(drain())
    try:
        admin = await aiohttp_client(admin_api.create_admin_api(runtime))
        one, two = await ready_hosts(runtime, 2)
        refused = await admin.post(f"/v1/hosts/{one['name']}/retire", params={"now": "yes"})
        assert refused.status == 422 and (await refused.json())["field"] == "now"
        assert (await runtime.store.get_host(one["id"]))["state"] == "ready"  # type: ignore[index]
        plain = await admin.post(f"/v1/hosts/{one['name']}/retire")
        assert plain.status == 200 and (await plain.json())["state"] == "draining"
        cut = await admin.post(f"/v1/hosts/{one['name']}/retire", params={"now": "true"})
        assert cut.status == 200 and (await cut.json())["retire_requested"] is True
        now = await admin.post(f"/v1/hosts/{two['name']}/retire", params={"now": "true"})
        assert now.status == 200 and (await now.json())["state"] == "retiring"
        await wait_states(runtime, [one["id"], two["id"]], {"gone"})
        assert machines() == set()
    finally:
        await runtime.stop()
