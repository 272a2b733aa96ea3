"""Several instances on one PostgreSQL database (governord.fleet): fenced host leases, the
leader lease, the job leases, membership. Each instance is a runtime with a store of its own
(its own connection pools), as separate processes have; kill -9 and SIGSTOP of real processes
are in tests/system/test_fleet.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select, update

from governord import testing
from governord.api import admin_api
from governord.fleet import SWEEP, Busy, DuplicateInstance
from governord.runtime import Runtime
from governord.store.schema import events, hosts

from .conftest import wait_states

STORE_BACKENDS = ("postgresql",)

#: quick leases: a heartbeat every 0.2 s, the leader's lease 1.5 s
QUICK = "heartbeat = 0.2\nleader_lease = 1.5"


async def _fleet(make_runtime: Callable[..., Any], count: int, **kwargs: Any) -> list[Runtime]:
    return [await make_runtime(instance=f"i{n}", fleet_options=QUICK, **kwargs) for n in range(count)]


async def _until(check: Callable[[], Any], timeout: float, what: str) -> float:
    """Wait until ``check()`` is true; returns the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_a_write_from_a_stale_claim_is_refused(store_backend: str, make_runtime: Callable[..., Any]) -> None:
    """Every claim increments the host's fencing token; a write names the token it claimed
    with. An instance whose lease ran out and was claimed by another can write nothing, and
    neither can a step of its own earlier claim once it has claimed the host again."""
    a, b = await _fleet(make_runtime, 2)
    for runtime in (a, b):
        await runtime.engine.stop(0)  # the claims below are the test's own
    decision = await a.governor.scale("demo", "node", add=1, actor="t")
    [host_id] = decision.request["host_ids"]

    [first] = await a.store.claim_due(a.engine.owner, 1, lease_seconds=0.05)
    await asyncio.sleep(0.1)  # a is "paused" past its lease
    [second] = await b.store.claim_due(b.engine.owner, 1, lease_seconds=60)
    assert second["lease_token"] == first["lease_token"] + 1
    # a comes back: its write is refused, the row is b's and unchanged
    assert await a.store.fenced_update(host_id, a.engine.owner, {"error": "late"}, token=first["lease_token"]) is None
    row = await a.store.get_host(host_id)
    assert row is not None and row["lease_owner"] == b.engine.owner and row["error"] is None
    # b works and rests; a claims the host anew: only the new claim's token writes
    assert await b.store.fenced_update(host_id, b.engine.owner, {"attempts": 1}, token=second["lease_token"],
                                       release=True) is not None
    [third] = await a.store.claim_due(a.engine.owner, 1, lease_seconds=60)
    assert third["lease_token"] == second["lease_token"] + 1
    assert await a.store.fenced_update(host_id, a.engine.owner, {"error": "stale"}, token=first["lease_token"]) is None
    assert await b.store.fenced_update(host_id, b.engine.owner, {"error": "b"}, token=second["lease_token"]) is None
    done = await a.store.fenced_update(host_id, a.engine.owner, {"error": "current"}, token=third["lease_token"])
    assert done is not None and done["error"] == "current"
    for runtime in (a, b):
        await runtime.stop()


async def test_a_step_another_instance_took_over_is_stopped_and_runs_once(
        store_backend: str, make_runtime: Callable[..., Any]) -> None:
    """Instance a runs a slow provisioning step; its lease renewal stops (as when a process is
    paused), the lease runs out and b claims the host. When a's renewal runs again it learns
    that b holds the host and stops its own step; b finishes it: one machine, one transition."""
    testing.MemoryProvider.faults.setdefault("mem", testing.Faults()).delay = 1.0
    one_worker = "workers = 1\nlease_seconds = 1.5"  # a's one worker busy: a claims nothing more
    a = await make_runtime(instance="a", fleet_options=QUICK, patch=lambda t: t.replace("workers = 4", one_worker))
    decision = await a.governor.scale("demo", "node", add=1, actor="t")
    [host_id] = decision.request["host_ids"]
    await wait_states(a, [host_id], {"provisioning"})
    assert a.engine.in_flight == 1
    # a's renewal "paused"; its lease runs out; b starts and claims the host
    assert a.engine._renewer is not None  # noqa: SLF001
    a.engine._renewer.cancel()  # noqa: SLF001
    async with a.store.transaction() as conn:
        await conn.execute(update(hosts).where(hosts.c.id == host_id).values(lease_expires=time.time() - 1))
    b = await make_runtime(instance="b", fleet_options=QUICK)

    async def held_by_b() -> bool:
        row = await b.store.get_host(host_id)
        return row is not None and row["lease_owner"] == b.engine.owner

    deadline = time.monotonic() + 5
    while not await held_by_b():
        assert time.monotonic() < deadline, "b did not take the host over"
        await asyncio.sleep(0.05)
    # a comes back: its renewal finds the host held by b and stops a's step
    a.engine._renewer = asyncio.create_task(a.engine._renew_leases())  # noqa: SLF001
    await _until(lambda: a.engine.taken_over == 1 and a.engine.in_flight == 0, 5, "a stops its step")
    testing.MemoryProvider.faults["mem"].delay = 0
    await wait_states(b, [host_id], {"ready"}, timeout=15)
    machines = [m for m in testing.MemoryProvider.worlds["mem"].values() if m.host_id == host_id]
    assert len(machines) == 1
    async with b.store.engine.connect() as conn:
        moves = (await conn.execute(select(events.c.detail).where(
            events.c.host_id == host_id, events.c.kind == "provisioned"))).scalars().all()
    assert len(moves) == 1, moves
    for runtime in (a, b):
        await runtime.stop()


async def test_one_leader_at_a_time_and_another_takes_over(
        store_backend: str, make_runtime: Callable[..., Any]) -> None:
    runtimes = await _fleet(make_runtime, 3)
    await _until(lambda: sum(r.fleet.is_leader for r in runtimes) == 1, 3, "one leader")
    members = await runtimes[1].fleet.members()
    assert [m["name"] for m in members] == ["i0", "i1", "i2"]
    assert [m["status"] for m in members] == ["up"] * 3 and sum(m["leader"] for m in members) == 1
    # a clean stop hands the lease back: another instance leads at its next heartbeat
    first = next(r for r in runtimes if r.fleet.is_leader)
    await first.stop()
    rest = [r for r in runtimes if r is not first]
    took = await _until(lambda: sum(r.fleet.is_leader for r in rest) == 1, 2, "a new leader after a clean stop")
    assert took < 1.0
    # the new leader dies (its heartbeat stops, nothing is handed back): its lease runs out and
    # a third instance leads within the lease's length and one heartbeat
    second = next(r for r in rest if r.fleet.is_leader)
    assert second.fleet._task is not None  # noqa: SLF001
    second.fleet._task.cancel()  # noqa: SLF001
    died = time.monotonic()
    third = next(r for r in rest if r is not second)
    await _until(lambda: third.fleet.is_leader, 1.5 + 0.2 + 1.0, "the third takes over")
    # the dead one stopped trusting its lease before the third could take it
    assert not second.fleet.is_leader
    assert time.monotonic() - died >= 1.5 * 0.9
    members = {m["name"]: m for m in await third.fleet.members()}
    assert members[first.fleet.name]["status"] == "stopped"
    assert members[third.fleet.name]["leader"] and not members[second.fleet.name]["leader"]
    for runtime in rest:
        await runtime.stop()


async def test_one_sweep_at_a_time_in_the_fleet(store_backend: str, make_runtime: Callable[..., Any],
                                                aiohttp_client: Callable[..., Any]) -> None:
    a, b = await _fleet(make_runtime, 2)
    async with a.fleet.exclusive(SWEEP):
        with pytest.raises(Busy) as busy:
            await b.sweeper.run(dry_run=True, actor="t")
        assert a.fleet.owner in str(busy.value)
        client = await aiohttp_client(admin_api.create_admin_api(b))
        answer = await client.post("/v1/sweep", json={"dry_run": True})
        assert answer.status == 409 and "sweep is running on" in (await answer.json())["error"]
    report = await b.sweeper.run(dry_run=True, actor="t")  # a is done: b may
    assert report.dry_run
    for runtime in (a, b):
        await runtime.stop()


async def test_an_instance_name_runs_once(store_backend: str, make_runtime: Callable[..., Any]) -> None:
    """Two live processes under one name would free each other's leases: the second is refused.
    A restart under the name (after a stop or a crash) frees at once what the earlier run of
    that name held, and nothing of another instance's."""
    first = await make_runtime(instance="x", fleet_options=QUICK)
    with pytest.raises(DuplicateInstance, match="instance name 'x' is in use"):
        await make_runtime(instance="x", fleet_options=QUICK)
    await first.engine.stop(0)
    decision = await first.governor.scale("demo", "node", add=2, actor="t")
    ours, theirs = decision.request["host_ids"]
    # the residue of a crashed earlier run of x, and a live lease of instance "xy"
    async with first.store.transaction() as conn:
        for host_id, owner in ((ours, "x/earlier"), (theirs, "xy/other")):
            await conn.execute(update(hosts).where(hosts.c.id == host_id).values(
                lease_owner=owner, lease_expires=time.time() + 3600))
    await first.stop()
    again = await make_runtime(instance="x", fleet_options=QUICK)
    await wait_states(again, [ours], {"ready"})
    row = await again.store.get_host(theirs)
    assert row is not None and row["lease_owner"] == "xy/other" and row["state"] == "requested"
    await again.stop()


async def test_fleet_wide_figures_come_from_the_leader_alone(
        store_backend: str, make_runtime: Callable[..., Any], aiohttp_client: Callable[..., Any]) -> None:
    runtimes = await _fleet(make_runtime, 3)
    await _until(lambda: sum(r.fleet.is_leader for r in runtimes) == 1, 3, "one leader")
    decision = await runtimes[0].governor.scale("demo", "node", add=2, actor="t")
    await wait_states(runtimes[0], decision.request["host_ids"], {"ready"})
    bodies = [(await r.metrics.render()).decode() for r in runtimes]
    ready = 'governord_hosts{app="demo",provider="mem",role="node",state="ready"}'
    reporting = [body for body in bodies if ready in body]
    assert len(reporting) == 1 and f"{ready} 2.0" in reporting[0]
    assert 'governord_fleet_instances{status="up"} 3.0' in reporting[0]
    assert sum("governord_leader 1.0" in body for body in bodies) == 1
    assert all("governord_steps_in_flight" in body for body in bodies)  # each instance's own
    client = await aiohttp_client(admin_api.create_admin_api(runtimes[2]))
    status = await (await client.get("/v1/status")).json()
    assert [(i["name"], i["status"], i["this"]) for i in status["instances"]] == [
        ("i0", "up", False), ("i1", "up", False), ("i2", "up", True)]
    assert sum(i["leader"] for i in status["instances"]) == 1
    assert status["leader"] == runtimes[2].fleet.is_leader
    for runtime in runtimes:
        await runtime.stop()
