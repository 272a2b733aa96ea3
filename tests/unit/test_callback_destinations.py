"""Where callbacks may go (governord.outbound, governord.engine.callbacks): https unless the
application's rules allow http; no redirect followed; loopback only where ``allow_networks``
holds it; governord's own listener never; the address a host name resolves to checked at each
delivery, and the address of every socket the notifier opens checked again. Real sockets: the
receivers are aiohttp servers on loopback, and what each of them received is checked."""

from __future__ import annotations

import asyncio
import ipaddress
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import select

from governord import webhooks
from governord.config import build_config
from governord.errors import ConfigError
from governord.outbound import AddressRefused, Guard, Policy
from governord.rules import RequestError
from governord.runtime import Runtime
from governord.store.schema import callbacks

from .conftest import BASE_CONFIG

SECRET = "callback-test-secret"
SIGNED = '\n[applications.demo.webhook]\nsecrets = [{ env = "GOVERNORD_TEST_CALLBACK_SECRET" }]\n'
HTTP = "\n[applications.demo.callbacks]\nallow_http = true\n"
LOOPBACK = HTTP + 'allow_networks = ["127.0.0.0/8", "::1/128"]\n'


class Endpoint:
    """A server on loopback that records every request it is sent."""

    def __init__(self, answer: Callable[[web.Request], Awaitable[web.Response]] | None = None) -> None:
        self.seen: list[tuple[str, str, bytes]] = []
        self.answer = answer
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append((request.method, request.path, body))
        if self.answer is not None:
            return await self.answer(request)
        webhooks.verify([SECRET.encode()], request.headers, body, now=time.time())
        return web.Response(status=204)

    async def start(self) -> Endpoint:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def endpoints(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Awaitable[Endpoint]]]:
    monkeypatch.setenv("GOVERNORD_TEST_CALLBACK_SECRET", SECRET)
    started: list[Endpoint] = []

    async def start(answer: Callable[[web.Request], Awaitable[web.Response]] | None = None) -> Endpoint:
        started.append(await Endpoint(answer).start())
        return started[-1]

    yield start
    for endpoint in started:
        await endpoint.stop()


async def row_when(runtime: Runtime, request_id: str, ready: Callable[[dict[str, Any]], bool],
                   timeout: float = 20) -> dict[str, Any]:
    """The request's callback row once ``ready`` holds for it."""
    deadline = time.monotonic() + timeout
    while True:
        async with runtime.store.engine.connect() as conn:
            row = dict((await conn.execute(select(callbacks).where(callbacks.c.request_id == request_id)))
                       .mappings().one())
        if ready(row):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"callback of {request_id} never got there: {row}")
        await asyncio.sleep(0.05)


def config_for(runtime: Runtime, extra: str) -> Any:
    raw = tomllib.loads(BASE_CONFIG.format(state_dir=runtime.state_dir) + extra)
    return build_config("test.toml", raw, runtime.plugins.providers, runtime.plugins.registrars, unavailable={})


async def scale(runtime: Runtime, url: str) -> str:
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t", callback_url=url)
    return str(decision.request["id"])


async def test_a_redirect_is_a_failed_attempt_and_never_followed(make_runtime: Any, endpoints: Any) -> None:
    """The application's endpoint (allowed) answers 307 to another loopback port: the attempt
    fails with the status kept, and the other server receives nothing, on any attempt."""
    second = await endpoints()

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": f"http://127.0.0.1:{second.port}/inside"})

    first = await endpoints(redirect)
    runtime: Runtime = await make_runtime(SIGNED + LOOPBACK)
    try:
        request_id = await scale(runtime, f"http://127.0.0.1:{first.port}/cb")
        row = await row_when(runtime, request_id, lambda r: r["attempts"] >= 2)
        assert row["delivered_at"] is None and row["gave_up_at"] is None
        assert row["last_error"].startswith("HTTP 307 (a redirect, not followed; Location: ")
        assert len(first.seen) >= 2 and {path for _, path, _ in first.seen} == {"/cb"}
        assert second.seen == []
    finally:
        await runtime.stop()


async def test_loopback_is_refused_until_the_rules_allow_it(make_runtime: Any, endpoints: Any) -> None:
    """Without allow_networks: a loopback literal is refused when asked (422 naming
    callback_url); a name that resolves to loopback (``localhost``) is taken, then refused at
    each delivery (audited, never sent). Once the rules allow loopback (a reload), the same
    callback is delivered."""
    receiver = await endpoints()
    runtime: Runtime = await make_runtime(SIGNED + HTTP)
    try:
        with pytest.raises(RequestError) as refused:
            await scale(runtime, f"http://127.0.0.1:{receiver.port}/cb")
        assert refused.value.status == 422 and refused.value.field == "callback_url"
        assert "127.0.0.1 is a loopback address" in str(refused.value)

        request_id = await scale(runtime, f"http://localhost:{receiver.port}/cb")
        row = await row_when(runtime, request_id, lambda r: r["attempts"] >= 1)
        assert row["delivered_at"] is None
        assert row["last_error"].startswith("refused to connect: localhost resolves to ")
        assert "is a loopback address" in row["last_error"]
        events = await runtime.store.list_events(kind_prefix="callback-")
        assert events and {e["kind"] for e in events} == {"callback-refused"}
        assert events[0]["request_id"] == request_id and events[0]["detail"]["error"] == row["last_error"]
        assert receiver.seen == []

        await runtime.reload(config_for(runtime, SIGNED + LOOPBACK))
        row = await row_when(runtime, request_id, lambda r: r["delivered_at"] is not None)
        assert row["last_error"] is None
        assert [path for _, path, _ in receiver.seen] == ["/cb"]
    finally:
        await runtime.stop()


async def test_governords_own_listener_is_refused_even_with_loopback_allowed(
    make_runtime: Any, endpoints: Any
) -> None:
    """Loopback is allowed, but the port governord listens on is not: refused when asked for
    a literal address, and at delivery for a name that resolves to it; the listener receives
    nothing. (tests/system/test_webhook.py checks that the daemon registers its real port.)"""
    own = await endpoints()
    runtime: Runtime = await make_runtime(SIGNED + LOOPBACK)
    runtime.listeners.add(own.port)  # what the daemon does once its API listens
    try:
        with pytest.raises(RequestError) as refused:
            await scale(runtime, f"http://127.0.0.1:{own.port}/v1/scale")
        assert refused.value.field == "callback_url" and "governord's own listener" in str(refused.value)

        request_id = await scale(runtime, f"http://localhost:{own.port}/v1/scale")
        row = await row_when(runtime, request_id, lambda r: r["attempts"] >= 1)
        assert "governord's own listener" in row["last_error"] and row["delivered_at"] is None
        assert own.seen == []
    finally:
        await runtime.stop()


async def test_http_is_refused_unless_the_rules_allow_it(make_runtime: Any, endpoints: Any) -> None:
    """https by default; http where allow_http says so. A callback taken while http was
    allowed is refused at delivery once it no longer is (never sent)."""
    receiver = await endpoints()
    loopback_only = '\n[applications.demo.callbacks]\nallow_networks = ["127.0.0.0/8", "::1/128"]\n'
    runtime: Runtime = await make_runtime(SIGNED + loopback_only)
    try:
        with pytest.raises(RequestError) as refused:
            await scale(runtime, f"http://127.0.0.1:{receiver.port}/cb")
        assert refused.value.field == "callback_url" and "plain http is not allowed" in str(refused.value)
        # https to the same place is taken (and fails in the handshake: it serves plain http)
        await scale(runtime, f"https://127.0.0.1:{receiver.port}/cb")

        await runtime.reload(config_for(runtime, SIGNED + LOOPBACK))
        request_id = await scale(runtime, f"http://127.0.0.1:{receiver.port}/cb")
        await runtime.reload(config_for(runtime, SIGNED + loopback_only))
        seen_before = len(receiver.seen)
        row = await row_when(runtime, request_id, lambda r: r["attempts"] >= 1)
        assert "plain http is not allowed" in row["last_error"] and row["delivered_at"] is None
        assert len(receiver.seen) == seen_before
    finally:
        await runtime.stop()


async def test_the_socket_is_checked_where_no_lookup_is_made(endpoints: Any) -> None:
    """aiohttp connects to an address literal without asking the resolver: the connector's
    socket factory refuses it all the same, before the connection is made."""
    receiver = await endpoints(lambda request: asyncio.sleep(0, web.Response(status=204)))
    url = f"http://127.0.0.1:{receiver.port}/cb"
    guard = Guard(Policy("demo", allow_http=True))
    async with aiohttp.ClientSession(connector=guard.connector()) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as failed:
            await session.post(url, data=b"{}")
    assert isinstance(failed.value.os_error, AddressRefused)
    assert guard.refused is not None and guard.refused.startswith(f"refused to connect to 127.0.0.1 port {receiver.port}")
    assert receiver.seen == []

    allowed = Guard(Policy("demo", allow_http=True, allow_networks=(ipaddress.ip_network("127.0.0.0/8"),)))
    async with aiohttp.ClientSession(connector=allowed.connector()) as session, \
            session.post(url, data=b"{}") as resp:
        assert resp.status == 204
    assert allowed.refused is None and len(receiver.seen) == 1


@pytest.mark.parametrize(("address", "port", "reason"), [
    ("169.254.169.254", 80, "a cloud metadata address"),
    ("fd00:ec2::254", 80, "a cloud metadata address"),
    ("100.100.100.200", 80, "a cloud metadata address"),
    ("169.254.1.1", 80, "a link-local address"),
    ("fe80::1", 80, "a link-local address"),
    ("0.0.0.0", 80, "the unspecified address"),  # connecting to it reaches this machine
    ("::", 80, "the unspecified address"),
    ("224.0.0.1", 80, "a multicast address"),
    ("240.0.0.1", 80, "a reserved address"),
    ("::ffff:169.254.169.254", 80, "a cloud metadata address"),
])
def test_what_no_rule_allows(address: str, port: int, reason: str) -> None:
    everything = Policy("demo", allow_http=True, allow_private=True,
                        allow_networks=(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")))
    refusal = everything.address_refusal(address, port)
    assert refusal is not None and refusal.endswith(f"is {reason}")


@pytest.mark.parametrize(("address", "allowed_by"), [
    ("127.0.0.1", "allow_networks"),
    ("::1", "allow_networks"),
    ("::ffff:127.0.0.1", "allow_networks"),
    ("10.1.2.3", "allow_private"),
    ("192.168.0.1", "allow_private"),
    ("172.16.5.4", "allow_private"),
    ("100.64.0.1", "allow_private"),   # CGNAT
    ("fd12:3456::1", "allow_private"),  # unique local
])
def test_what_the_rules_may_allow(address: str, allowed_by: str) -> None:
    assert Policy("demo").address_refusal(address, 443) is not None
    ip = ipaddress.ip_address(address)
    network = ipaddress.ip_network(getattr(ip, "ipv4_mapped", None) or ip)  # a mapped address counts as IPv4
    assert Policy("demo", allow_networks=(network,)).address_refusal(address, 443) is None
    assert (Policy("demo", allow_private=True).address_refusal(address, 443) is None) == (allowed_by == "allow_private")
    assert Policy("demo").address_refusal("192.0.2.1" if ":" not in address else "2001:db8::1", 443) is not None
    assert Policy("demo").address_refusal("93.184.215.14", 443) is None  # a global address


@pytest.mark.parametrize("url", ["https://127.1/cb", "https://2130706433/cb", "https://0x7f.0.0.1/cb"])
def test_a_numeric_host_in_a_legacy_form_is_refused(url: str) -> None:
    """What the C library would read as 127.0.0.1 is refused up front, whatever the rules."""
    refusal = Policy("demo", allow_networks=(ipaddress.ip_network("127.0.0.0/8"),)).url_refusal(url)
    assert refusal is not None and "not a canonical IPv4 address" in refusal


@pytest.mark.parametrize(("networks", "message"), [
    ('["169.254.169.254/32"]', "holds only addresses callbacks never go to (a cloud metadata address)"),
    ('["169.254.0.0/16"]', "holds only addresses callbacks never go to (a link-local address)"),
    ('["224.0.0.0/4"]', "(a multicast address)"),
    ('["10.0.0.1/8"]', "network"),  # host bits set: not a network
    ('["loopback"]', "network"),
])
async def test_an_allow_networks_entry_that_cannot_work_stops_the_config(
    make_runtime: Any, networks: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        await make_runtime(f"\n[applications.demo.callbacks]\nallow_networks = {networks}\n")
    assert caught.value.key.startswith("applications.demo.callbacks.allow_networks"), caught.value
    assert message in caught.value.message


@pytest.mark.parametrize(("url", "words"), [
    ("http://app.example/cb", "plain http is not allowed for application demo"),
    ("https://10.0.0.7/cb", "10.0.0.7 is a private address"),
    ("https://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
    ("https://127.0.0.1:9443/cb", "127.0.0.1 is a loopback address"),
    ("https://127.0.0.1:8443/cb", "governord's own listener (port 8443"),  # the configured API port
])
async def test_the_admin_api_refuses_the_same_callback_urls(
    make_runtime: Any, aiohttp_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, url: str, words: str
) -> None:
    """An operator's scale request for an application is held to the application's rules."""
    from governord.api import admin_api

    monkeypatch.setenv("GOVERNORD_TEST_CALLBACK_SECRET", SECRET)
    runtime: Runtime = await make_runtime(SIGNED)
    try:
        admin = await aiohttp_client(admin_api.create_admin_api(runtime))
        resp = await admin.post("/v1/apps/demo/scale", json={"role": "node", "add": 1, "callback_url": url})
        body = await resp.json()
        assert resp.status == 422 and body["field"] == "callback_url" and words in body["error"], body
        assert await runtime.store.list_hosts(app="demo") == []
    finally:
        await runtime.stop()
