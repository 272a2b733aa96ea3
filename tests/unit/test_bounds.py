"""Bounds on what a client can make the API do (issue 11, points 4 and 6): JSON nesting depth
checked without recursion before anything parses a body, a request body that trickles in cut
with a 408, and rate-limited log lines. The connection-level bounds (caps, handshake and idle
timeouts, running out of descriptors) are tested against the real daemon in
tests/system/test_connections.py."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from governord import webhooks
from governord.api import admin_api, app_api
from governord.api.common import MAX_JSON_DEPTH, load_json, nests_deeper_than
from governord.api.connections import ConnectionLimits, RateLimitedLog
from governord.rules import RequestError
from governord.runtime import Runtime


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _nested(depth: int, inner: str = "1") -> str:
    text = inner
    for level in range(depth):
        text = f'{{"k{level}": {text}}}' if level % 2 else f"[{text}]"
    return text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(alphabet=st.characters()),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=40,
)


@given(json_values, st.integers(min_value=0, max_value=8))
def test_the_scan_agrees_with_the_parsed_depth(value: Any, limit: int) -> None:
    """Brackets and quotes inside strings (st.characters() has them, and escapes) do not count."""
    text = json.dumps(value, ensure_ascii=False)
    assert nests_deeper_than(text, limit) == (_depth(value) > limit)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 30_000])
def test_the_limit_is_exact(depth: int) -> None:
    assert nests_deeper_than(_nested(depth), MAX_JSON_DEPTH) == (depth > MAX_JSON_DEPTH)


def test_brackets_in_strings_do_not_count() -> None:
    text = json.dumps({"a": "[" * 1000, "b": "\\\"{" * 1000, "c": ["]" * 10]})
    assert not nests_deeper_than(text, 2)
    assert nests_deeper_than(text, 1)


def test_thirty_thousand_levels_are_refused_before_parsing_naming_the_limit() -> None:
    for raw in (b"[" * 30_000 + b"]" * 30_000, _nested(30_000).encode(), json.dumps([[[]]]).encode("utf-16")[:0]
                + _nested(100).encode("utf-16")):
        with pytest.raises(RequestError) as refused:
            load_json(raw)
        assert refused.value.status == 400 and f"deeper than {MAX_JSON_DEPTH} levels" in str(refused.value)


@pytest.mark.parametrize(("raw", "words"), [
    (b'{"count": ' + b"9" * 5000 + b"}", "not valid JSON"),  # int() refuses more than 4300 digits
    (b'{"a": "\xff"}', "not valid JSON"),
    (b'{"a": [}', "not valid JSON"),
])
def test_what_the_parser_refuses_is_400(raw: bytes, words: str) -> None:
    with pytest.raises(RequestError) as refused:
        load_json(raw)
    assert refused.value.status == 400 and words in str(refused.value)


@pytest.fixture
async def admin(runtime: Runtime, aiohttp_client: Callable[..., Any]) -> Any:
    return await aiohttp_client(admin_api.create_admin_api(runtime))


@pytest.mark.parametrize("body", [
    b'{"role": "node", "add": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    b"[" * 30_000 + b"]" * 30_000,
])
async def test_the_admin_api_refuses_deep_nesting_with_400(admin: Any, runtime: Runtime, body: bytes) -> None:
    resp = await admin.post("/v1/apps/demo/scale", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert f"deeper than {MAX_JSON_DEPTH} levels" in (await resp.json())["error"]
    assert await runtime.store.list_hosts() == []


@pytest.fixture
async def webhook(make_runtime: Callable[..., Any], aiohttp_client: Callable[..., Any],
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Any, Runtime]]:
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", "s3cret")
    runtime = await make_runtime("""
[applications.demo.webhook]
secrets = [{ env = "TEST_WEBHOOK_SECRET" }]
[[applications.demo.webhook.rules]]
event = "deploy"
role = "node"
add = 1
""")
    limits = ConnectionLimits(handshake_timeout=5, request_timeout=0.5, keepalive_timeout=5, max_connections=10,
                              max_connections_per_peer=10)
    client = await aiohttp_client(app_api.create_app_api(runtime, limits=limits))
    yield client, runtime
    await runtime.stop()


def _signed(body: bytes) -> dict[str, str]:
    return {"Content-Type": "application/json", webhooks.APPLICATION_HEADER: "demo",
            **webhooks.signature_headers(b"s3cret", body)}


@pytest.mark.parametrize(("body", "words"), [
    # within the webhook's 8 KiB, and deep enough for RecursionError
    (b'{"event": "deploy", "app": ' + b"[" * 4000 + b"]" * 4000 + b"}", f"deeper than {MAX_JSON_DEPTH} levels"),
    (b'{"event": "deploy", "openshift_version": "v4", "app": "web", "namespace": "ns", "component": "\\ud800"}',
     "not valid JSON"),
])
async def test_a_signed_webhook_that_cannot_be_read_is_400(webhook: tuple[Any, Runtime], body: bytes,
                                                           words: str) -> None:
    client, runtime = webhook
    resp = await client.post("/v1/webhooks/openshift", data=body, headers=_signed(body))
    assert resp.status == 400, await resp.text()
    assert words in (await resp.json())["error"]
    assert await runtime.store.list_hosts() == []


async def test_a_trickled_body_is_cut_with_408(webhook: tuple[Any, Runtime]) -> None:
    client, runtime = webhook
    body = b'{"event": "deploy"}'

    async def trickle() -> AsyncIterator[bytes]:
        for byte in body:
            yield bytes([byte])
            await asyncio.sleep(0.2)

    start = time.monotonic()
    resp = await client.post("/v1/webhooks/openshift", data=trickle(), headers=_signed(body))
    assert resp.status == 408
    assert (await resp.json())["error"] == "request body not received within 0.5 s"
    assert resp.headers.get("Connection", "").lower() == "close"
    assert time.monotonic() - start < 2.0
    assert await runtime.store.list_hosts() == []


async def test_a_body_that_arrived_is_not_cut_however_long_the_handler_takes(webhook: tuple[Any, Runtime]) -> None:
    """The deadline is for the client's bytes, not for the work: a delivery whose handling
    outlasts the request timeout is answered normally."""
    client, runtime = webhook
    body = json.dumps({"event": "deploy", "openshift_version": "v4", "app": "web", "namespace": "ns"}).encode()
    slow = runtime.governor.scale_by_rule

    async def scale_slowly(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(1.0)
        return await slow(*args, **kwargs)

    runtime.governor.scale_by_rule = scale_slowly  # type: ignore[method-assign]
    resp = await client.post("/v1/webhooks/openshift", data=body, headers=_signed(body))
    assert resp.status == 202, await resp.text()


async def test_a_rate_limited_log_says_how_many_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.bounds")
    limited = RateLimitedLog(logger, interval=0.3)
    with caplog.at_level(logging.INFO, logger="test.bounds"):
        for n in range(1000):
            limited.log(logging.WARNING, "out of descriptors", n=n)
        assert len(caplog.records) == 1 and caplog.records[0].suppressed == 0  # type: ignore[attr-defined]
        await asyncio.sleep(0.45)
        assert len(caplog.records) == 2
        assert caplog.records[1].suppressed == 999 and caplog.records[1].n == 999  # type: ignore[attr-defined]
        await asyncio.sleep(0.4)  # nothing left out since: no third line
        assert len(caplog.records) == 2
        assert limited.log(logging.WARNING, "out of descriptors", n=1000)
