"""Retention: what is older than ``[retention]`` keeps is deleted, in batches and audited; what
is newer, and what live work still needs, stays; a pruned request's idempotency key is free."""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text, update

from governord import testing
from governord.config import build_config
from governord.dispatch.pluginmanager import PluginManager
from governord.errors import ConfigError
from governord.runtime import Runtime
from governord.store.schema import (
    callbacks,
    events,
    hosts,
    live_counts,
    requests,
    state_counts,
)

from .conftest import BACKENDS, BASE_CONFIG, wait_states

#: every test here that makes a runtime runs on SQLite and on PostgreSQL (tests/unit/conftest.py)
STORE_BACKENDS = BACKENDS

DAY = 86400.0
#: an application whose requests wait for an operator (for weeks: they must not expire here)
HELD = """
[applications.held]
max_hosts = 5
approval = "always"
approval_expiry = 99999999.0
[applications.held.roles.node]
tags = ["node"]
provider = "mem"
"""


@pytest.fixture
async def rt(make_runtime: Callable[..., Any]) -> AsyncIterator[Runtime]:
    runtime = await make_runtime(HELD)
    yield runtime
    await runtime.stop()


async def _pause(runtime: Runtime) -> None:
    """Stop the background work, so the rows hold still while a test ages them."""
    await runtime.engine.stop(5.0)
    await runtime.notifier.stop()
    await runtime.pruner.stop()


async def _sql(runtime: Runtime, statement: Any, params: Any = None) -> Any:
    async with runtime.store.transaction() as conn:
        return await conn.execute(statement, params) if params is not None else await conn.execute(statement)


async def _age_requests(runtime: Runtime, ids: list[str], days: float) -> None:
    await _sql(runtime, update(requests).where(requests.c.id.in_(ids)).values(
        created_at=requests.c.created_at - days * DAY, updated_at=requests.c.updated_at - days * DAY))


async def _ids(runtime: Runtime, table: Any) -> set[Any]:
    async with runtime.store.engine.connect() as conn:
        return set((await conn.execute(select(table.c[0]))).scalars())


async def test_old_rows_go_new_and_live_ones_stay(rt: Runtime) -> None:
    gov = rt.governor
    old = await gov.scale("demo", "node", add=2, actor="t", idempotency_key="k-old")
    kept_host, released_host = await wait_states(rt, old.request["host_ids"], {"ready"})
    release = await gov.release("demo", hosts=[released_host["name"]], actor="t")
    await wait_states(rt, [released_host["id"]], {"gone"})
    busy = await gov.scale("demo", "node", add=1, actor="t", idempotency_key="k-busy")
    owed = await gov.scale("demo", "node", add=1, actor="t")
    await wait_states(rt, busy.request["host_ids"] + owed.request["host_ids"], {"ready"})
    pending = await gov.scale("held", "node", add=1, actor="t")
    assert pending.request["state"] == "pending"
    marker = time.time()
    await asyncio.sleep(0.01)
    new = await gov.scale("demo", "node", add=1, actor="t", idempotency_key="k-new")
    await wait_states(rt, new.request["host_ids"], {"ready"})
    await _pause(rt)

    # 40 days pass for all but the newest request: its hosts are ready (at rest) or gone
    aged = [old.request["id"], release.request["id"], busy.request["id"], owed.request["id"], pending.request["id"]]
    await _age_requests(rt, aged, 40)
    await _sql(rt, update(hosts).where(hosts.c.id == released_host["id"]).values(
        created_at=hosts.c.created_at - 40 * DAY, updated_at=hosts.c.updated_at - 40 * DAY))
    await _sql(rt, update(events).where(events.c.ts < marker).values(ts=events.c.ts - 400 * DAY))
    # ... but one request's host is being worked on again, and another still owes a callback
    await _sql(rt, update(hosts).where(hosts.c.id == busy.request["host_ids"][0]).values(state="provisioning"))
    await _sql(rt, insert(callbacks).values(request_id=owed.request["id"], app="demo", url="https://app.example/cb",
                                            next_at=0.0, created_at=0.0))
    async with rt.store.engine.connect() as conn:
        trail_of_gone = set((await conn.execute(
            select(events.c.id).where(events.c.host_id == released_host["id"]))).scalars())
        live_trails = set((await conn.execute(select(events.c.id).where(
            events.c.host_id.in_([kept_host["id"], busy.request["host_ids"][0]])))).scalars())
        old_unowned = set((await conn.execute(select(events.c.id).where(
            events.c.host_id.is_(None), events.c.ts < marker - DAY))).scalars())
        newer = set((await conn.execute(select(events.c.id).where(events.c.ts >= marker))).scalars())
    assert trail_of_gone and live_trails and old_unowned and newer

    report = await rt.pruner.prune()

    assert (report.requests, report.hosts, report.callbacks) == (2, 1, 0)
    remaining = await _ids(rt, requests)
    assert remaining == {busy.request["id"], owed.request["id"], pending.request["id"], new.request["id"]}
    host_ids = await _ids(rt, hosts)
    assert released_host["id"] not in host_ids and kept_host["id"] in host_ids
    assert await _ids(rt, callbacks) == {owed.request["id"]}
    left = await _ids(rt, events)
    assert not (trail_of_gone | old_unowned) & left
    assert live_trails <= left and newer <= left
    assert report.events == len(trail_of_gone | old_unowned)
    # one audit event for the round, with the counts
    [audit] = await rt.store.list_events(kind_prefix="retention-")
    assert audit["kind"] == "retention-pruned" and audit["actor"] == "governord"
    assert {k: audit["detail"][k] for k in ("hosts", "requests", "callbacks", "events")} == {
        "hosts": 1, "requests": 2, "callbacks": 0, "events": report.events}
    # the counts the triggers keep still agree with the hosts
    async with rt.store.engine.connect() as conn:
        real = dict((await conn.execute(text("SELECT state, count(*) FROM hosts GROUP BY state"))).all())
        kept = dict((await conn.execute(select(state_counts.c.state, func.sum(state_counts.c.hosts))
                                        .group_by(state_counts.c.state)
                                        .having(func.sum(state_counts.c.hosts) != 0))).all())
        live = (await conn.execute(select(func.sum(live_counts.c.hosts)).where(live_counts.c.app == "demo"))).scalar()
    assert kept == real and live == 4

    # a second round finds nothing, and says nothing
    again = await rt.pruner.prune()
    assert again.total == 0
    assert len(await rt.store.list_events(kind_prefix="retention-")) == 1


async def test_nothing_is_pruned_before_its_time(rt: Runtime) -> None:
    done = await rt.governor.scale("demo", "node", add=1, actor="t", idempotency_key="k")
    [host] = await wait_states(rt, done.request["host_ids"], {"ready"})
    await rt.governor.retire(host["id"], actor="t")
    await wait_states(rt, [host["id"]], {"gone"})
    await _pause(rt)
    await _age_requests(rt, [done.request["id"]], 29)  # kept 30 days by default
    report = await rt.pruner.prune()
    assert report.total == 0
    assert done.request["id"] in await _ids(rt, requests) and host["id"] in await _ids(rt, hosts)
    # 30 days on, the request goes, and then its gone host (its request no longer shows it)
    report = await rt.pruner.prune(now=time.time() + 31 * DAY)
    assert (report.requests, report.hosts) == (1, 1)


async def test_a_replay_of_a_pruned_key_is_a_new_request(rt: Runtime) -> None:
    """A key is honoured while its request is kept; once pruned, a request under it is new."""
    first = await rt.governor.scale("demo", "node", add=1, actor="app:demo", idempotency_key="deploy-7")
    await wait_states(rt, first.request["host_ids"], {"ready"})
    replay = await rt.governor.scale("demo", "node", add=1, actor="app:demo", idempotency_key="deploy-7")
    assert replay.replayed and replay.request["id"] == first.request["id"]
    await _age_requests(rt, [first.request["id"]], 31)
    await rt.pruner.stop()
    assert (await rt.pruner.prune()).requests == 1
    after = await rt.governor.scale("demo", "node", add=1, actor="app:demo", idempotency_key="deploy-7")
    assert not after.replayed and after.request["id"] != first.request["id"]
    assert after.request["state"] == "accepted" and len(after.request["host_ids"]) == 1
    # and that new request is honoured in turn
    again = await rt.governor.scale("demo", "node", add=1, actor="app:demo", idempotency_key="deploy-7")
    assert again.replayed and again.request["id"] == after.request["id"]


async def test_a_round_takes_the_writer_in_small_batches(make_runtime: Callable[..., Any]) -> None:
    rt = await make_runtime("[retention]\nbatch = 3\n")
    try:
        await _pause(rt)
        now = time.time()
        await _sql(rt, insert(requests), [
            {"id": f"r{i}", "app": "demo", "actor": "t", "idempotency_key": f"k{i}", "kind": "scale", "params": {},
             "state": "declined", "reason": "x", "host_ids": [], "created_at": now - 50 * DAY + i,
             "updated_at": now - 50 * DAY + i} for i in range(10)])
        await _sql(rt, insert(events), [
            {"ts": now - 500 * DAY + i, "kind": "old", "actor": "t", "detail": {}} for i in range(10)])
        jobs: list[int] = []
        run = rt.store.writer.run

        async def counted(job: Any, **options: Any) -> Any:
            jobs.append(1)
            return await run(job, **options)

        rt.store.writer.run = counted  # type: ignore[method-assign]
        report = await rt.pruner.prune()
        rt.store.writer.run = run  # type: ignore[method-assign]
        assert (report.requests, report.events) == (10, 10)
        # 10 rows of each kind, 3 looked at per transaction: at least 4 transactions each
        assert len(jobs) >= 8
    finally:
        await rt.stop()


async def test_the_background_task_prunes_on_its_own(make_runtime: Callable[..., Any]) -> None:
    rt = await make_runtime("[retention]\ninterval = 0.2\n")
    try:
        await _sql(rt, insert(events), [{"ts": time.time() - 400 * DAY, "kind": "ancient", "actor": "t", "detail": {}}])
        deadline = time.monotonic() + 10
        while not await rt.store.list_events(kind_prefix="retention-"):
            assert time.monotonic() < deadline, "no pruning round ran"
            await asyncio.sleep(0.05)
        assert await rt.store.list_events(kind_prefix="ancient") == []
    finally:
        await rt.stop()


async def test_a_callback_given_up_or_delivered_goes_with_its_request(rt: Runtime) -> None:
    done = await rt.governor.scale("demo", "node", add=1, actor="t")
    await wait_states(rt, done.request["host_ids"], {"ready"})
    await _pause(rt)
    await _sql(rt, insert(callbacks).values(request_id=done.request["id"], app="demo", url="https://app.example/cb",
                                            next_at=0.0, created_at=0.0, delivered_at=time.time()))
    await _age_requests(rt, [done.request["id"]], 31)
    report = await rt.pruner.prune()
    assert (report.requests, report.callbacks) == (1, 1)
    assert await _ids(rt, callbacks) == set()


async def test_a_host_events_callback_goes_once_done_and_old(rt: Runtime) -> None:
    """A drain notification (a host event in the outbox) has no request: it goes requests_days
    after it was delivered or given up, not before, and never while it is still owed."""
    await _pause(rt)
    now = time.time()
    rows = {"old-delivered": {"delivered_at": now - 31 * DAY}, "old-given-up": {"gave_up_at": now - 31 * DAY},
            "new-delivered": {"delivered_at": now - DAY}, "owed": {}}
    for key, done in rows.items():
        await _sql(rt, insert(callbacks).values(request_id=key, app="demo", url="https://app.example/drain",
                                                next_at=now, created_at=now - 40 * DAY, host_id="h",
                                                payload={"event": "draining"}, **done))
    report = await rt.pruner.prune()
    assert report.callbacks == 2
    assert await _ids(rt, callbacks) == {"new-delivered", "owed"}


@pytest.mark.parametrize(("key", "value"), [("requests_days", "-1"), ("events_days", '"long"'),
                                            ("interval", "-5"), ("batch", "0"), ("keep", "1")])
def test_a_bad_retention_key_is_named(tmp_path: Any, key: str, value: str) -> None:
    plugins = PluginManager()
    plugins.register(testing.plugin, "testing")
    plugins.collect_types()
    raw = tomllib.loads(BASE_CONFIG.format(state_dir=tmp_path) + f"[retention]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as caught:
        build_config("test.toml", raw, plugins.providers, plugins.registrars, unavailable={})
    assert caught.value.key == f"retention.{key}"
