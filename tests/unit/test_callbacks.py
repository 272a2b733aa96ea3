"""Callbacks (governord.engine.callbacks): one stored callback_url no client can send to is given up on
its own, with the reason kept, audited and logged; the other requests' callbacks are still
delivered, signed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select

from governord import webhooks
from governord.engine import callbacks as callbacks_module
from governord.engine.callbacks import unsendable
from governord.runtime import Runtime
from governord.store.schema import callbacks

from .conftest import wait_states

SECRET = "callback-test-secret"
SIGNED = '\n[applications.demo.webhook]\nsecrets = [{ env = "GOVERNORD_TEST_CALLBACK_SECRET" }]\n'
#: the receivers here are plain http on loopback, which the application's rules must allow
LOOPBACK = '\n[applications.demo.callbacks]\nallow_http = true\nallow_networks = ["127.0.0.0/8", "::1/128"]\n'
WEBHOOK = SIGNED + LOOPBACK


class Receiver:
    """An application's callback endpoint on loopback: what arrived, signature verified."""

    def __init__(self) -> None:
        self.url = ""
        #: (delivery id, payload) of each signed callback received
        self.arrived: list[tuple[str, dict[str, Any]]] = []

    @property
    def deliveries(self) -> list[str]:
        return [delivery for delivery, _ in self.arrived]

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        delivery = webhooks.verify([SECRET.encode()], request.headers, body, now=time.time())
        self.arrived.append((delivery, await request.json()))
        return web.Response(status=204)


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Receiver]:
    monkeypatch.setenv("GOVERNORD_TEST_CALLBACK_SECRET", SECRET)
    endpoint = Receiver()
    app = web.Application()
    app.router.add_post("/cb", endpoint.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    endpoint.url = f"http://127.0.0.1:{runner.addresses[0][1]}/cb"
    yield endpoint
    await runner.cleanup()


@pytest.mark.parametrize("url", [
    "http://a..b/cb",                    # an empty label: the resolver's IDNA codec raised UnicodeError
    "http://" + "a" * 64 + ".example/cb",  # a label longer than 63
    "ftp://host/cb",                     # not http(s)
    "http://host:99999/cb",              # a port out of range
    "http:///cb",                        # no host
    "not a url",
])
async def test_a_callback_url_no_client_can_send_to_does_not_hold_up_the_others(
    make_runtime: Any, receiver: Receiver, caplog: pytest.LogCaptureFixture, url: str
) -> None:
    good = receiver.url
    arrived = receiver.arrived
    runtime: Runtime = await make_runtime(WEBHOOK)
    caplog.set_level(logging.WARNING, logger="governord.engine.callbacks")
    try:
        # the bad one first: the notifier's rounds meet it before the others
        bad = await runtime.governor.scale("demo", "node", add=1, actor="t", callback_url=url)
        ok = [await runtime.governor.scale("demo", "node", add=1, actor="t", callback_url=good) for _ in range(2)]
        ids = [bad.request["id"], *(d.request["id"] for d in ok)]
        host_ids = [h for d in (bad, *ok) for h in d.request["host_ids"]]
        await wait_states(runtime, host_ids, {"ready"})

        # the notifier records a delivery once the answer is back, a moment after it arrived here
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            async with runtime.store.engine.connect() as conn:
                rows = {r["request_id"]: dict(r) for r in (await conn.execute(select(callbacks))).mappings()}
            if len(arrived) >= 2 and all(rows[i]["delivered_at"] is not None for i in ids[1:]):
                break
            await asyncio.sleep(0.05)
        assert sorted(delivery for delivery, _ in arrived) == sorted(ids[1:])
        assert {payload["event"] for _, payload in arrived} == {"request-completed"}
        given_up = rows[ids[0]]
        assert given_up["gave_up_at"] is not None and given_up["delivered_at"] is None
        assert given_up["attempts"] == 1  # given up at once: no retry can make the URL sendable
        assert given_up["last_error"].startswith(f"callback_url {url!r} cannot be sent to: ")
        assert all(rows[i]["delivered_at"] is not None and rows[i]["last_error"] is None for i in ids[1:])

        events = await runtime.store.list_events(kind_prefix="callback-")
        assert [(e["kind"], e["request_id"]) for e in events] == [("callback-given-up", ids[0])]
        assert events[0]["detail"]["url"] == url and events[0]["detail"]["error"] == given_up["last_error"]
        logged = [r for r in caplog.records if r.name == "governord.engine.callbacks"]
        assert [(r.getMessage(), getattr(r, "request", None)) for r in logged] == [("callback given up", ids[0])]
    finally:
        await runtime.stop()


async def test_any_other_failure_of_one_callback_is_that_callback_alone(
    make_runtime: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the up-front check misses (here: it is switched off, and aiohttp's resolver raises
    UnicodeError, no ClientError) counts as a failed attempt of that callback, retried later;
    the round goes on with the others."""
    monkeypatch.setattr(callbacks_module, "unsendable", lambda url: None)
    runtime: Runtime = await make_runtime(WEBHOOK)
    try:
        bad = await runtime.governor.scale("demo", "node", add=1, actor="t", callback_url="http://a..b/cb")
        good = await runtime.governor.scale("demo", "node", add=1, actor="t", callback_url=receiver.url)
        await wait_states(runtime, [*bad.request["host_ids"], *good.request["host_ids"]], {"ready"})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            async with runtime.store.engine.connect() as conn:
                row = (await conn.execute(select(callbacks).where(
                    callbacks.c.request_id == bad.request["id"]))).mappings().one()
            if receiver.arrived and row["attempts"]:
                break
            await asyncio.sleep(0.05)
        assert receiver.deliveries == [good.request["id"]]
        # counted and scheduled again (not given up); when exactly depends on how long the wait above took
        assert row["attempts"] >= 1 and row["gave_up_at"] is None and row["delivered_at"] is None
        assert row["next_at"] > row["created_at"]
        assert row["last_error"].startswith("UnicodeError: ")
    finally:
        await runtime.stop()


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/cb", "https://app.example.com/hooks/governor?x=1", "http://[::1]:9/cb",
    "https://h\u00e9st.example/cb",  # IDNA-encodable: a client can send to it
])
def test_a_sendable_url_is_not_refused(url: str) -> None:
    assert unsendable(url) is None


async def test_requests_still_waiting_do_not_starve_the_finished_ones(make_runtime: Any, receiver: Receiver) -> None:
    """More callbacks of unfinished requests (held for approval) than a round looks at, then
    one of a finished (declined) request: it is delivered within a few rounds all the same."""
    url = receiver.url
    runtime: Runtime = await make_runtime(WEBHOOK, patch=lambda text: text.replace(
        "max_hosts = 5\n", 'max_hosts = 5\napproval = "always"\n', 1))
    try:
        waiting = [await runtime.governor.scale("demo", "node", add=1, actor="t", callback_url=url)
                   for _ in range(60)]  # a round looks at 50
        assert {d.request["state"] for d in waiting} == {"pending"}
        declined = await runtime.governor.scale("demo", "node", add=99, actor="t", callback_url=url)
        assert declined.request["state"] == "declined"
        deadline = time.monotonic() + 10
        while not receiver.arrived and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert receiver.deliveries == [declined.request["id"]]
    finally:
        await runtime.stop()
