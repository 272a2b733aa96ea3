"""engine.on_permanent_failure = "rollback" (the default) on the in-memory provider and registrar:
a host that cannot be brought up is taken down again, everything it had undone, and ends gone
with the failed step and the error kept as the reason; a host the application had is never
rolled back. The same against the real peers: tests/system/test_faults.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from governord import testing
from governord.errors import PermanentError, RetryableError
from governord.runtime import Runtime
from governord.store.schema import address_leases

from .conftest import wait_states


def _fail(instance: str, method: str, error: Exception, count: int = 1, *, registrar: bool = True) -> None:
    table = testing.MemoryRegistrar.faults if registrar else testing.MemoryProvider.faults
    table.setdefault(instance, testing.Faults()).fail(method, error, count=count)


async def _leases(runtime: Runtime) -> list[str]:
    async with runtime.store.engine.connect() as conn:
        return [row.host_id for row in await conn.execute(select(address_leases))]


async def test_a_permanent_register_failure_is_rolled_back_and_reported(runtime: Runtime) -> None:
    _fail("cmdb", "register", PermanentError("hostgroup missing"))
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
    host_id = decision.request["host_ids"][0]
    [row] = await wait_states(runtime, [host_id], {"gone"})
    # the reason stays on the gone host
    assert row["failed_step"] == "register"
    assert "registrar:cmdb" in row["error"] and "hostgroup missing" in row["error"]
    # what the failed bring-up made is gone: the machine and the address it was given
    assert testing.MemoryProvider.worlds["mem"] == {}
    assert testing.MemoryRegistrar.worlds.get("cmdb", {}) == {}
    assert host_id not in await _leases(runtime)
    kinds = [e["kind"] for e in await runtime.store.list_events(host_id=host_id)]
    assert kinds == [
        "requested",
        "step-started", "classified",
        "step-started", "provisioned",
        "step-started", "step-failed",  # -> retiring
        "step-started", "deregistering",
        "step-started", "deregistered",
        "step-started", "deprovisioned",
        "step-started", "gone",
    ]
    events = await runtime.store.list_events(host_id=host_id)
    assert events[6]["detail"] == {"from": "registering", "to": "retiring", "step": "register", "rollback": True,
                                   "error": row["error"]}
    assert events[-1]["detail"]["rolled_back"] == "register"
    status = await runtime.governor.request_status(decision.request)
    assert status["status"] == "failed"
    assert status["hosts"][0]["failed_step"] == "register"


async def test_retries_running_out_roll_back_too(runtime: Runtime) -> None:
    _fail("mem", "create_or_find", RetryableError("vCenter busy"), count=10, registrar=False)
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
    [row] = await wait_states(runtime, decision.request["host_ids"], {"gone"})
    assert row["failed_step"] == "provision" and "vCenter busy" in row["error"]
    # three tries (retry_limit = 2) before giving up
    kinds = [e["kind"] for e in await runtime.store.list_events(host_id=row["id"])]
    assert kinds.count("step-retry") == 2
    assert testing.MemoryProvider.worlds.get("mem", {}) == {}


async def test_the_reason_survives_retries_of_the_rollback(runtime: Runtime) -> None:
    _fail("cmdb", "register", PermanentError("hostgroup missing"))
    _fail("cmdb", "deregister", RetryableError("Foreman busy"))
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
    [row] = await wait_states(runtime, decision.request["host_ids"], {"gone"})
    assert row["failed_step"] == "register" and "hostgroup missing" in row["error"]
    retries = [e for e in await runtime.store.list_events(host_id=row["id"]) if e["kind"] == "step-retry"]
    assert [e["detail"]["step"] for e in retries] == ["deregister"]
    assert testing.MemoryProvider.worlds["mem"] == {}


async def test_a_rollback_that_cannot_finish_leaves_the_host_failed(runtime: Runtime) -> None:
    _fail("cmdb", "register", PermanentError("hostgroup missing"))
    _fail("mem", "destroy", PermanentError("machine locked"), registrar=False)
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
    [row] = await wait_states(runtime, decision.request["host_ids"], {"failed"})
    # tearing down is never rolled back: it stops, says where, and keeps the machine's record
    assert row["failed_step"] == "deprovision" and "machine locked" in row["error"]
    assert len(testing.MemoryProvider.worlds["mem"]) == 1
    await runtime.governor.retry(row["name"], actor="t")
    await wait_states(runtime, [row["id"]], {"gone"})
    assert testing.MemoryProvider.worlds["mem"] == {}


async def test_a_host_that_was_ready_is_kept_failed_not_rolled_back(runtime: Runtime) -> None:
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
    [row] = await wait_states(runtime, decision.request["host_ids"], {"ready"})
    # the application has the host: a failed re-registration must not take it away
    _fail("cmdb", "register", PermanentError("hostgroup missing"))
    await runtime.governor.set_tags(row["name"], add=["broker"], remove=[], actor="t")
    [row] = await wait_states(runtime, [row["id"]], {"failed"})
    assert row["failed_step"] == "register"
    assert len(testing.MemoryProvider.worlds["mem"]) == 1
    assert row["fqdn"] in testing.MemoryRegistrar.worlds["cmdb"]


async def test_a_failed_preparation_undoes_what_the_other_registrars_prepared(make_runtime: Callable[..., Any]) -> None:
    """One registrar prepared the host (a token it keeps: what a CA or a DNS server would hold),
    another's prepare failed for good: the host is not dropped as if nothing were outside, it goes
    through the teardown and the first registrar's token is taken back."""
    runtime: Runtime = await make_runtime('[registrars.ca]\ntype = "memory"\n')
    testing.MemoryRegistrar.preauthorise.update({"cmdb": True, "ca": True})
    _fail("ca", "prepare", PermanentError("the CA refuses"))
    try:
        decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
        host_id = decision.request["host_ids"][0]
        [row] = await wait_states(runtime, [host_id], {"gone"})
        assert row["failed_step"] == "classify" and "the CA refuses" in row["error"]
        assert testing.MemoryRegistrar.tokens["cmdb"] == {}  # taken back by the teardown's deregister
        kinds = [e["kind"] for e in await runtime.store.list_events(host_id=host_id)]
        assert kinds[:3] == ["requested", "step-started", "step-failed"] and kinds[-1] == "gone"
        assert "deregistered" in kinds and testing.MemoryProvider.worlds.get("mem", {}) == {}
        assert host_id not in await _leases(runtime)
    finally:
        await runtime.stop()


async def test_a_failed_preparation_with_nothing_prepared_is_gone_at_once(make_runtime: Callable[..., Any]) -> None:
    """No registrar answered with a record (the one that failed could not even be reached): nothing
    is outside, so no teardown is run, which would only fail again on the same registrar."""
    runtime: Runtime = await make_runtime('[registrars.ca]\ntype = "memory"\n')
    testing.MemoryRegistrar.preauthorise.update({"ca": True})  # cmdb prepares nothing
    _fail("ca", "prepare", PermanentError("the CA refuses"))
    try:
        decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
        host_id = decision.request["host_ids"][0]
        [row] = await wait_states(runtime, [host_id], {"gone"})
        assert row["failed_step"] == "classify"
        kinds = [e["kind"] for e in await runtime.store.list_events(host_id=host_id)]
        assert kinds == ["requested", "step-started", "step-failed"]
        assert host_id not in await _leases(runtime)
    finally:
        await runtime.stop()
