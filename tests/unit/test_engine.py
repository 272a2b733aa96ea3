"""The lifecycle engine on the in-memory provider and registrar: transitions, retries,
failures, retry, tags, retirement, and resumption after an interrupted step."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from governord import hookimpl, testing
from governord.errors import PermanentError, RetryableError
from governord.runtime import Runtime

from .conftest import BACKENDS, wait_states

#: every test here that makes a runtime runs on SQLite and on PostgreSQL (tests/unit/conftest.py)
STORE_BACKENDS = BACKENDS


def keep_failed(text: str) -> str:
    """Config patch: a host that fails for good stays failed (not rolled back), to be retried."""
    return text.replace("[engine]\n", '[engine]\non_permanent_failure = "keep"\n', 1)


@pytest.fixture
async def keeping(make_runtime: Callable[..., Any]) -> AsyncIterator[Runtime]:
    rt = await make_runtime(patch=keep_failed)
    yield rt
    await rt.stop()


async def test_scale_provisions_registers_and_hands_back(runtime: Runtime) -> None:
    decision = await runtime.governor.scale("demo", "node", add=3, actor="t")
    ids = decision.request["host_ids"]
    rows = await wait_states(runtime, ids, {"ready"})
    assert sorted(r["name"] for r in rows) == ["demo-node-01", "demo-node-02", "demo-node-03"]
    machines = testing.MemoryProvider.worlds["mem"]
    assert sorted(m.host_id for m in machines.values()) == sorted(ids)
    cmdb = testing.MemoryRegistrar.worlds["cmdb"]
    assert cmdb["demo-node-01.lab.example"]["group"] == "nodes"
    assert cmdb["demo-node-01.lab.example"]["classes"] == ["openshift::node"]
    # static addresses come from the network's range, the gateway is never handed out
    assert sorted(r["addresses"][0] for r in rows) == ["198.51.100.10", "198.51.100.11", "198.51.100.12"]
    status = await runtime.governor.request_status(decision.request)
    assert status["status"] == "completed"


async def test_every_external_call_is_bracketed_by_committed_events(runtime: Runtime) -> None:
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
    host_id = decision.request["host_ids"][0]
    await wait_states(runtime, [host_id], {"ready"})
    kinds = [e["kind"] for e in await runtime.store.list_events(host_id=host_id)]
    assert kinds == [
        "requested",
        "step-started", "classified",
        "step-started", "provisioned",
        "step-started", "registered",
        "ready",
    ]


async def test_cap_counts_hosts_in_flight(runtime: Runtime) -> None:
    first = await runtime.governor.scale("demo", "node", add=4, actor="t")
    assert first.request["state"] == "accepted"
    second = await runtime.governor.scale("demo", "node", add=2, actor="t")
    assert second.request["state"] == "declined"
    assert "cap reached" in second.request["reason"]
    assert len(await runtime.store.list_hosts(app="demo")) == 4


async def test_idempotency_key_returns_the_first_request(runtime: Runtime) -> None:
    a = await runtime.governor.scale("demo", "node", add=2, actor="t", idempotency_key="k1")
    b = await runtime.governor.scale("demo", "node", add=2, actor="t", idempotency_key="k1")
    assert b.replayed and b.request["id"] == a.request["id"]
    assert len(await runtime.store.list_hosts(app="demo")) == 2


async def test_retryable_failure_is_retried_then_succeeds(runtime: Runtime) -> None:
    testing.MemoryProvider.faults.setdefault("mem", testing.Faults()).fail(
        "create_or_find", RetryableError("vCenter busy"), count=2)
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
    host_id = decision.request["host_ids"][0]
    await wait_states(runtime, [host_id], {"ready"})
    kinds = [e["kind"] for e in await runtime.store.list_events(host_id=host_id)]
    assert kinds.count("step-retry") == 2


async def test_permanent_failure_fails_with_step_and_retry_resumes(keeping: Runtime) -> None:
    runtime = keeping
    testing.MemoryRegistrar.faults.setdefault("cmdb", testing.Faults()).fail(
        "register", PermanentError("hostgroup missing"))
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
    host_id = decision.request["host_ids"][0]
    [row] = await wait_states(runtime, [host_id], {"failed"})
    assert row["failed_step"] == "register"
    assert "registrar:cmdb" in row["error"] and "hostgroup missing" in row["error"]
    # the machine exists; only registration is missing
    assert len(testing.MemoryProvider.worlds["mem"]) == 1
    await runtime.governor.retry(row["name"], actor="t")
    await wait_states(runtime, [host_id], {"ready"})
    assert len(testing.MemoryProvider.worlds["mem"]) == 1
    assert "demo-node-01.lab.example" in testing.MemoryRegistrar.worlds["cmdb"]


async def test_retryable_failures_beyond_the_limit_fail_the_host(keeping: Runtime) -> None:
    runtime = keeping
    testing.MemoryProvider.faults.setdefault("mem", testing.Faults()).fail(
        "create_or_find", RetryableError("timeout"), count=10)
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
    [row] = await wait_states(runtime, decision.request["host_ids"], {"failed"})
    assert row["failed_step"] == "provision"


async def test_tag_change_reclassifies_and_reregisters(runtime: Runtime) -> None:
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
    [row] = await wait_states(runtime, decision.request["host_ids"], {"ready"})
    await runtime.governor.set_tags(row["name"], add=["broker"], remove=[], actor="t")
    await wait_states(runtime, [row["id"]], {"ready"})
    entry = testing.MemoryRegistrar.worlds["cmdb"][row["fqdn"]]
    assert entry["group"] == "nodes"  # the first tag in config order wins a single value
    assert entry["classes"] == ["openshift::node", "openshift::broker"]
    await runtime.governor.set_tags(row["name"], add=[], remove=["node"], actor="t")
    await wait_states(runtime, [row["id"]], {"ready"})
    assert testing.MemoryRegistrar.worlds["cmdb"][row["fqdn"]]["group"] == "brokers"


async def test_retire_deregisters_then_destroys(runtime: Runtime) -> None:
    decision = await runtime.governor.scale("demo", "node", add=2, actor="t")
    rows = await wait_states(runtime, decision.request["host_ids"], {"ready"})
    await runtime.governor.retire(rows[0]["name"], actor="t")
    await wait_states(runtime, [rows[0]["id"]], {"gone"})
    assert rows[0]["fqdn"] not in testing.MemoryRegistrar.worlds["cmdb"]
    assert all(m.host_id != rows[0]["id"] for m in testing.MemoryProvider.worlds["mem"].values())
    kinds = [e["kind"] for e in await runtime.store.list_events(host_id=rows[0]["id"])]
    assert kinds[kinds.index("retire-requested"):] == [
        "retire-requested",
        "step-started", "deregistering",
        "step-started", "deregistered",
        "step-started", "deprovisioned",
        "step-started", "gone",
    ]
    # its address is free again
    again = await runtime.governor.scale("demo", "node", add=1, actor="t")
    [new] = await wait_states(runtime, again.request["host_ids"], {"ready"})
    assert new["name"] == rows[0]["name"] and new["addresses"] == rows[0]["addresses"]


async def test_adopting_a_host_registers_it_and_retiring_never_destroys(runtime: Runtime) -> None:
    row = await runtime.governor.set_tags("legacy1.lab.example", add=["broker"], remove=[], actor="t", adopt=True,
                                          address="198.51.100.99")
    [row] = await wait_states(runtime, [row["id"]], {"ready"})
    assert row["origin"] == "adopted"
    assert testing.MemoryRegistrar.worlds["cmdb"]["legacy1.lab.example"]["group"] == "brokers"
    await runtime.governor.retire("legacy1", actor="t")
    await wait_states(runtime, [row["id"]], {"gone"})
    assert "legacy1.lab.example" not in testing.MemoryRegistrar.worlds["cmdb"]
    kinds = [e["kind"] for e in await runtime.store.list_events(host_id=row["id"])]
    assert "provisioned" not in kinds and "deprovisioning" not in kinds


async def test_scale_to_count_releases_newest_first(runtime: Runtime) -> None:
    decision = await runtime.governor.scale("demo", "node", add=3, actor="t")
    await wait_states(runtime, decision.request["host_ids"], {"ready"})
    down = await runtime.governor.scale("demo", "node", count=1, actor="t")
    gone = await wait_states(runtime, down.request["host_ids"], {"gone"})
    assert sorted(r["name"] for r in gone) == ["demo-node-02", "demo-node-03"]
    assert len(testing.MemoryProvider.worlds["mem"]) == 1


async def test_interrupted_step_resumes_without_duplicates(make_runtime) -> None:  # type: ignore[no-untyped-def]
    """A crash between "the provider made the machine" and "we recorded it" leaves a host in
    provisioning, leased by a dead process of this node; the next start frees the lease and the
    step finds the machine by its ownership marker instead of making a second one."""
    from sqlalchemy import update

    from governord.models import MachineSpec
    from governord.store.schema import hosts

    first = await make_runtime()
    testing.MemoryProvider.faults.setdefault("mem", testing.Faults()).delay = 0.3
    decision = await first.governor.scale("demo", "node", add=2, actor="t")
    ids = decision.request["host_ids"]
    await wait_states(first, ids, {"provisioning"})
    await first.engine.stop(grace=0)
    await first.fleet.stop()
    # the residue of a kill -9: leases held by a dead process, one machine already made
    async with first.store.transaction() as conn:
        await conn.execute(update(hosts).where(hosts.c.id.in_(ids)).values(
            lease_owner=f"{first.engine.node}/dead", lease_expires=time.time() + 3600))
    provider = first.providers["mem"]
    testing.MemoryProvider.faults["mem"].delay = 0
    await provider.create_or_find(MachineSpec(host_id=ids[0], hostname="demo-node-01", fqdn="demo-node-01.lab.example",
                                              profile={"size": "large"}))
    await first.store.close()

    second = await make_runtime()
    try:
        await wait_states(second, ids, {"ready"})
        owners = [m.host_id for m in testing.MemoryProvider.worlds["mem"].values()]
        assert sorted(owners) == sorted(ids)
    finally:
        await second.stop()


async def test_a_provider_instance_has_its_own_retry_policy(make_runtime) -> None:  # type: ignore[no-untyped-def]
    """[providers.mem] retry_limit = 0 fails provisioning at the first passing error, while the
    engine's own limit (2) still governs registration."""
    runtime = await make_runtime(patch=lambda text: keep_failed(text).replace(
        '[providers.mem]\ntype = "memory"', '[providers.mem]\ntype = "memory"\nretry_limit = 0'))
    try:
        testing.MemoryProvider.faults.setdefault("mem", testing.Faults()).fail(
            "create_or_find", RetryableError("busy"), count=1)
        first = await runtime.governor.scale("demo", "node", add=1, actor="t")
        [row] = await wait_states(runtime, first.request["host_ids"], {"failed"})
        assert row["failed_step"] == "provision" and row["attempts"] == 1
        testing.MemoryRegistrar.faults.setdefault("cmdb", testing.Faults()).fail(
            "register", RetryableError("busy"), count=2)
        await runtime.governor.retry(row["name"], actor="t")
        await wait_states(runtime, [row["id"]], {"ready"})  # two passing register failures: within 2
        assert runtime.engine.retry_policy(row, "register") == (2, 0.05, 0.2)
        assert runtime.engine.retry_policy(row, "provision") == (0, 0.05, 0.2)
    finally:
        await runtime.stop()


LATE = """
[registrars.pdb]
type = "memory-late"
"""


async def test_prepare_runs_before_the_machine_and_feeds_its_user_data(make_runtime) -> None:  # type: ignore[no-untyped-def]
    testing.MemoryRegistrar.preauthorise["cmdb"] = True
    runtime = await make_runtime()
    try:
        decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
        [row] = await wait_states(runtime, decision.request["host_ids"], {"ready"})
        token = row["registrations"]["cmdb"]["autosign_token"]
        assert token == f"token-{row['id'][:8]}"
        assert runtime.engine.machine_spec(row).user_data == (
            '#cloud-config\n{"cmdb": {"token": "' + token + '"}}')
        assert [j[0] for j in testing.journal] == ["prepare", "register"]
        # register's own record is laid over what prepare made
        assert row["registrations"]["cmdb"] == {"autosign_token": token, "cloud_config": {"cmdb": {"token": token}},
                                                "name": row["fqdn"]}
    finally:
        await runtime.stop()


async def test_ready_waits_for_every_registrar_then_hands_back(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime = await make_runtime(patch=lambda t: t.replace("retry_limit = 2", "retry_limit = 2\nready_poll_interval = 0.05"))
    try:
        testing.MemoryRegistrar.readiness["cmdb"] = {"demo-node-01.lab.example": False}
        decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
        [row] = await wait_states(runtime, decision.request["host_ids"], {"configuring"})
        await asyncio.sleep(0.3)
        [row] = await runtime.store.list_hosts(ids=[row["id"]])
        assert row["state"] == "configuring" and row["attempts"] == 0
        status = await runtime.governor.request_status(decision.request)
        assert status["status"] == "in-progress"
        testing.MemoryRegistrar.readiness["cmdb"]["demo-node-01.lab.example"] = True
        await wait_states(runtime, [row["id"]], {"ready"})
        kinds = [e["kind"] for e in await runtime.store.list_events(host_id=row["id"])]
        assert kinds.count("ready") == 1 and kinds.count("step-started") == 3  # polls leave no events
    finally:
        await runtime.stop()


async def test_after_machine_records_go_after_the_machine(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime = await make_runtime(LATE)
    try:
        decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
        [row] = await wait_states(runtime, decision.request["host_ids"], {"ready"})
        testing.journal.clear()
        await runtime.governor.retire(row["name"], actor="t")
        await wait_states(runtime, [row["id"]], {"gone"})
        assert testing.journal == [
            ("deregister", "cmdb", "demo-node-01"),
            ("destroy", "mem", "demo-node-01"),
            ("deregister", "pdb", "demo-node-01"),
        ]
    finally:
        await runtime.stop()


class _ReadyGate:
    """A readiness check that answers only when the test lets it (``go``), having said when
    it was asked (``asked``)."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.go = asyncio.Event()

    @hookimpl
    async def governord_check_host_ready(self, host: Any, waited: float) -> dict[str, bool]:
        self.asked.set()
        await self.go.wait()
        return {"gate": True}


async def test_a_retirement_asked_for_during_the_last_readiness_check_goes_on(runtime: Runtime) -> None:
    """Retiring a host whose readiness check is running flags it; the check then says ready,
    and the commit that makes the host ready releases its lease. The retirement must still
    begin at once: before, its commit was refused for want of the lease, and the host stayed
    ready and flagged, with nothing left to retire it."""
    gate = _ReadyGate()
    runtime.plugins.register(gate, "ready-gate")
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
    host_id = decision.request["host_ids"][0]
    await asyncio.wait_for(gate.asked.wait(), 10)
    await runtime.governor.retire(host_id, actor="t")
    gate.go.set()
    [row] = await wait_states(runtime, [host_id], {"gone"})
    assert row["lease_owner"] is None and not row["retire_requested"]
    kinds = [e["kind"] for e in await runtime.store.list_events(host_id=host_id)]
    assert kinds.index("ready") < kinds.index("retiring") < kinds.index("gone")
    assert runtime.engine.fenced_out == 0
    assert testing.MemoryProvider.worlds["mem"] == {}
