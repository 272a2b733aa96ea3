"""Paging: every list endpoint of both APIs takes ``limit`` (with a maximum) and ``cursor`` and
answers ``next_cursor``; pages cover every row exactly once while rows are added between them;
governord-ctl follows the cursor over more than one page."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner
from sqlalchemy import insert, select

from governord import ctl
from governord.api import admin_api, app_api, paging
from governord.runtime import Runtime
from governord.store.schema import events, hosts, requests

from .conftest import BACKENDS

#: every test here that makes a runtime runs on SQLite and on PostgreSQL (tests/unit/conftest.py)
STORE_BACKENDS = BACKENDS

DOCS = {"app": app_api.endpoints.openapi(), "admin": admin_api.endpoints.openapi()}
#: every list of the admin API, with the key its rows are under
ADMIN_LISTS = {"/v1/hosts": "hosts", "/v1/requests": "requests", "/v1/audit": "events", "/v1/apps": "applications",
               "/v1/hosts/{host}/events": "events", "/v1/plugins": "plugins"}

MORE_APPS = "".join(f"""
[applications.{name}]
max_hosts = 5
[applications.{name}.roles.node]
tags = ["node"]
provider = "mem"
""" for name in ("alpha", "beta", "gamma", "omega"))


@pytest.fixture
async def rt(make_runtime: Callable[..., Any]) -> AsyncIterator[Runtime]:
    runtime = await make_runtime(MORE_APPS)
    # nothing moves but what a test does: rows are written straight into the store
    await runtime.engine.stop(5.0)
    await runtime.pruner.stop()
    yield runtime
    await runtime.stop()


@pytest.fixture
async def admin(rt: Runtime, aiohttp_client: Callable[..., Any]) -> Any:
    return await aiohttp_client(admin_api.create_admin_api(rt))


async def _add_hosts(rt: Runtime, count: int, *, state: str = "ready", app: str | None = "demo",
                     created_at: float | None = None) -> list[str]:
    now = time.time() if created_at is None else created_at
    rows = [{"id": str(uuid.uuid4()), "name": f"h-{uuid.uuid4().hex[:12]}", "fqdn": "x.lab.example", "app": app,
             "role": "node", "origin": "provisioned", "state": state, "tags": [], "addresses": [],
             "classification": {}, "registrations": {}, "profile": {}, "created_at": now, "updated_at": now}
            for _ in range(count)]
    async with rt.store.transaction() as conn:
        await conn.execute(insert(hosts), rows)
    return [r["id"] for r in rows]


async def _add_requests(rt: Runtime, count: int) -> list[str]:
    now = time.time()
    rows = [{"id": str(uuid.uuid4()), "app": "demo", "actor": "t", "idempotency_key": None, "kind": "scale",
             "params": {"role": "node", "add": 1, "count": None}, "state": "declined", "reason": "x",
             "host_ids": [], "created_at": now, "updated_at": now} for _ in range(count)]
    async with rt.store.transaction() as conn:
        await conn.execute(insert(requests), rows)
    return [r["id"] for r in rows]


async def _add_events(rt: Runtime, count: int, host_id: str | None = None) -> None:
    async with rt.store.transaction() as conn:
        await conn.execute(insert(events), [{"ts": time.time(), "host_id": host_id, "kind": "test-event",
                                             "actor": "t", "detail": {"n": i}} for i in range(count)])


async def _walk(client: Any, path: str, key: str, limit: int, params: dict[str, str] | None = None,
                between: Callable[[], Any] | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        query = {**(params or {}), "limit": str(limit), **({"cursor": cursor} if cursor else {})}
        resp = await client.get(path, params=query)
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        assert len(page[key]) <= limit
        rows += page[key]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return rows
        assert page[key], "a page before the last is never empty"
        if between is not None:
            await between()
        assert pages < 1000


def test_every_list_endpoint_documents_paging() -> None:
    """Every GET whose reply is a list takes limit (with its maximum) and cursor, and answers
    next_cursor; a new list endpoint without paging fails here."""
    lists = []
    for name, doc in DOCS.items():
        schemas = doc["components"]["schemas"]
        for path, operations in doc["paths"].items():
            op = operations.get("get")
            ref = (op or {}).get("responses", {}).get("200", {}).get("content", {}).get(
                "application/json", {}).get("schema", {}).get("$ref")
            if ref is None:
                continue
            model = ref.rsplit("/", 1)[1]
            if not model.endswith("List"):  # a list of rows (not one row that holds a list)
                continue
            reply = schemas[model]
            lists.append((name, path))
            params = {p["name"]: p for p in op["parameters"]}
            assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": paging.MAX_LIMIT,
                                                 "default": paging.DEFAULT_LIMIT}, (name, path)
            assert params["cursor"]["schema"] == {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,1024}$"}
            assert "next_cursor" in reply["required"], (name, path)
            assert "422" in op["responses"]
    assert sorted(lists) == sorted([("app", "/v1/hosts"), *(("admin", p) for p in ADMIN_LISTS)])


async def test_host_pages_cover_every_host_once_while_hosts_are_added(rt: Runtime, admin: Any) -> None:
    before = set(await _add_hosts(rt, 23))
    gone = set(await _add_hosts(rt, 4, state="gone"))
    added: set[str] = set()

    async def add_two() -> None:
        added.update(await _add_hosts(rt, 2))

    listed = [h["id"] for h in await _walk(admin, "/v1/hosts", "hosts", 5, between=add_two)]
    assert len(listed) == len(set(listed)), "a host was listed twice"
    # oldest first: every host there from the start, and every one added meanwhile, exactly once
    assert set(listed) == before | added and len(added) >= 8
    assert not gone & set(listed), "gone hosts are listed only when asked"
    everything = await _walk(admin, "/v1/hosts", "hosts", 7, {"all": "true"})
    ids = [h["id"] for h in everything]
    assert set(ids) == before | added | gone and len(ids) == len(set(ids))
    only_gone = await _walk(admin, "/v1/hosts", "hosts", 3, {"state": "gone"})
    assert {h["id"] for h in only_gone} == gone
    order = [(h["created_at"], h["id"]) for h in everything]
    assert order == sorted(order)


async def test_request_and_audit_pages_cover_every_row_once_while_rows_are_added(rt: Runtime, admin: Any) -> None:
    before = set(await _add_requests(rt, 17))

    async def more_requests() -> None:
        await _add_requests(rt, 3)

    listed = [r["id"] for r in await _walk(admin, "/v1/requests", "requests", 4, between=more_requests)]
    assert len(listed) == len(set(listed))
    # newest first: the rows there from the start, each once; those added meanwhile are newer
    # than the first page and are not reached
    assert set(listed) == before
    every = [(r["created_at"], r["id"]) for r in await _walk(admin, "/v1/requests", "requests", 1000)]
    assert every == sorted(every, reverse=True)

    await _add_events(rt, 30)
    async with rt.store.engine.connect() as conn:
        existing = set((await conn.execute(select(events.c.id))).scalars())

    async def more_events() -> None:
        await _add_events(rt, 5)

    audit = [e["id"] for e in await _walk(admin, "/v1/audit", "events", 6, between=more_events)]
    assert len(audit) == len(set(audit)) and set(audit) == existing
    assert audit == sorted(audit, reverse=True)
    kinds = await _walk(admin, "/v1/audit", "events", 7, {"kind": "test-"})
    assert {e["kind"] for e in kinds} == {"test-event"} and len(kinds) >= 30


async def test_a_host_trail_pages_oldest_first_and_sees_what_is_added(rt: Runtime, admin: Any) -> None:
    [host_id] = await _add_hosts(rt, 1)
    await _add_events(rt, 11, host_id)
    await _add_events(rt, 5)  # another's events are not in the trail

    async def more() -> None:
        await _add_events(rt, 1, host_id)

    trail = await _walk(admin, f"/v1/hosts/{host_id}/events", "events", 3, between=more)
    ids = [e["id"] for e in trail]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) and len(ids) >= 11 + 3
    assert {e["host_id"] for e in trail} == {host_id}


async def test_applications_page_by_name(admin: Any) -> None:
    apps = await _walk(admin, "/v1/apps", "applications", 2)
    assert [a["name"] for a in apps] == ["alpha", "beta", "demo", "gamma", "omega"]


@pytest.mark.parametrize("path", sorted(ADMIN_LISTS))
async def test_the_maximum_and_the_cursor_are_enforced_naming_the_field(rt: Runtime, admin: Any, path: str) -> None:
    [host_id] = await _add_hosts(rt, 1)
    url = path.format(host=host_id)
    for limit in ("0", "-1", str(paging.MAX_LIMIT + 1), "10" * 20, "ten"):
        resp = await admin.get(url, params={"limit": limit})
        assert resp.status == 422, (url, limit)
        body = await resp.json()
        assert body["field"] == "limit" and "limit" in body["error"]
    assert (await admin.get(url, params={"limit": str(paging.MAX_LIMIT)})).status == 200
    foreign = paging.encode(("elsewhere", (int,)), [5])
    for cursor in ("", "not a cursor!", "bm9wZQ", foreign, paging.encode(("hosts", (float, str)), ["x", 1]),
                   "A" * 2000):
        resp = await admin.get(url, params={"cursor": cursor})
        assert resp.status == 422, (url, cursor)
        assert (await resp.json())["field"] == "cursor"


async def test_an_unknown_state_is_refused_naming_it(admin: Any) -> None:
    resp = await admin.get("/v1/hosts", params={"state": "asleep"})
    assert resp.status == 422 and (await resp.json())["field"] == "state"


def test_ctl_asks_for_the_largest_page_the_api_gives() -> None:
    assert ctl.PAGE_SIZE == paging.MAX_LIMIT


@pytest.fixture
async def socket(rt: Runtime) -> AsyncIterator[tuple[str, list[str]]]:
    """The admin API on a real Unix socket, with a record of the requests it answered."""
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(request.path_qs)
        return await handler(request)

    app = admin_api.create_admin_api(rt)
    app.middlewares.insert(0, record)
    runner = web.AppRunner(app)
    await runner.setup()
    path = str(Path(tempfile.mkdtemp(prefix="gov-", dir="/tmp")) / "admin.sock")
    site = web.UnixSite(runner, path)
    await site.start()
    yield path, seen
    await runner.cleanup()


async def _ctl(path: str, *args: str) -> Any:
    result = await asyncio.to_thread(CliRunner().invoke, ctl.cli, ["--socket", path, *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


async def test_ctl_follows_the_cursor_over_many_pages(rt: Runtime, socket: tuple[str, list[str]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path, seen = socket
    monkeypatch.setattr(ctl, "PAGE_SIZE", 4)
    made = set(await _add_hosts(rt, 10))
    made_requests = await _add_requests(rt, 9)
    await _add_events(rt, 13)

    listed = await _ctl(path, "hosts", "list", "--json")
    assert {h["id"] for h in listed} == made and len(listed) == 10
    assert sum(p.startswith("/v1/hosts?") for p in seen) == 3  # 4 + 4 + 2
    assert len(await _ctl(path, "hosts", "list", "--json", "--limit", "6")) == 6

    every = await _ctl(path, "requests", "list", "--json")
    assert {r["id"] for r in every} == set(made_requests) and len(every) == 9
    assert await _ctl(path, "requests", "list", "--json", "--limit", "2") == every[:2]  # the newest

    audit = await _ctl(path, "audit", "--kind", "test-", "--json")
    assert [e["detail"]["n"] for e in audit] == list(range(13))  # oldest first, as it happened
    assert [e["detail"]["n"] for e in await _ctl(path, "audit", "--kind", "test-", "--json", "--limit", "5")] == [
        8, 9, 10, 11, 12]

    assert [a["name"] for a in await _ctl(path, "apps", "list", "--json")] == ["alpha", "beta", "demo", "gamma",
                                                                               "omega"]
    assert sum(p.startswith("/v1/apps?") for p in seen) == 2
