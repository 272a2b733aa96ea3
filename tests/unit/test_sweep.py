"""The sweep on the in-memory provider and registrar: what it finds, that a dry run changes
nothing, that a real run acts as the policy says (checked in the memory worlds, the store and
the audit log), and that hosts in flight, recent hosts and failed listings are never judged."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import update

from governord import hookimpl, testing
from governord.engine.sweep import SweepReport
from governord.errors import RetryableError
from governord.models import Machine, PowerState
from governord.runtime import Runtime
from governord.store.schema import hosts

from .conftest import wait_states

NO_GRACE = """
[sweep]
interval = 0
grace = 0
"""

CLEAN = NO_GRACE + """
[sweep.policy]
leaked = "clean"
vanished = "retire"
orphaned = "clean"
"""


def machines() -> dict[str, Machine]:
    return testing.MemoryProvider.worlds.setdefault("mem", {})


def cmdb() -> dict[str, dict[str, Any]]:
    return testing.MemoryRegistrar.worlds.setdefault("cmdb", {})


def stray(host_id: str, name: str = "stray") -> Machine:
    """A marked machine as a crash would leave it: in the provider, not in governord's records."""
    machine = Machine(provider="mem", machine_id=f"m-{uuid.uuid4().hex[:6]}", name=name, host_id=host_id,
                      power=PowerState.ON)
    machines()[machine.machine_id] = machine
    return machine


def found(report: SweepReport) -> set[tuple[str, str, str, str]]:
    return {(f.kind, f.where, f.host_id, f.record) for f in report.findings}


async def sweep_events(runtime: Runtime) -> list[dict[str, Any]]:
    return await runtime.store.list_events(kind_prefix="sweep")


async def ready_hosts(runtime: Runtime, count: int) -> list[dict[str, Any]]:
    decision = await runtime.governor.scale("demo", "node", add=count, actor="t")
    return await wait_states(runtime, decision.request["host_ids"], {"ready"})


async def retired(runtime: Runtime, row: dict[str, Any]) -> dict[str, Any]:
    await runtime.governor.retire(row["name"], actor="t")
    [gone] = await wait_states(runtime, [row["id"]], {"gone"})
    return gone


async def scene(runtime: Runtime) -> dict[str, Any]:
    """Three hosts made ready, one retired; then, behind governord's back: a machine for an
    unknown host and one for the gone host, the machine of a ready host deleted, and registrar
    entries for the gone host and for an unknown one."""
    a, b, c = await ready_hosts(runtime, 3)
    gone = await retired(runtime, a)
    unknown = str(uuid.uuid4())
    leaked_unknown = stray(unknown, "crashed-clone")
    leaked_gone = stray(gone["id"], gone["name"])
    [vanished_machine] = [k for k, m in machines().items() if m.host_id == b["id"]]
    del machines()[vanished_machine]
    cmdb()[gone["fqdn"]] = {"host_id": gone["id"], "group": "nodes"}
    cmdb()["never.lab.example"] = {"host_id": unknown, "group": "nodes"}
    return {"gone": gone, "vanished": b, "kept": c, "unknown": unknown, "leaked": [leaked_unknown, leaked_gone]}


async def test_nothing_to_find_when_records_and_world_agree(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime(NO_GRACE)
    try:
        rows = await ready_hosts(runtime, 2)
        await retired(runtime, rows[0])
        report = await runtime.sweeper.run(dry_run=True, actor="t")
        assert report.findings == [] and report.errors == []
        assert report.checked == {"providers": {"mem": 1}, "registrars": {"cmdb": 1}}
    finally:
        await runtime.stop()


async def test_dry_run_lists_every_kind_and_changes_nothing(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime(CLEAN)
    try:
        s = await scene(runtime)
        world_before, cmdb_before = dict(machines()), {k: dict(v) for k, v in cmdb().items()}
        hosts_before = {r["id"]: (r["state"], r["updated_at"]) for r in await runtime.store.list_hosts()}

        report = await runtime.sweeper.run(dry_run=True, actor="t")
        assert found(report) == {
            ("leaked", "mem", s["unknown"], "none"),
            ("leaked", "mem", s["gone"]["id"], "gone"),
            ("vanished", "mem", s["vanished"]["id"], "ready"),
            ("orphaned", "cmdb", s["gone"]["id"], "gone"),
            ("orphaned", "cmdb", s["unknown"], "none"),
        }
        actions = {(f.kind, f.host_id): f.action for f in report.findings}
        assert actions[("leaked", s["unknown"])] == "would destroy"
        assert actions[("vanished", s["vanished"]["id"])] == "would retire"
        assert actions[("orphaned", s["unknown"])] == "would deregister"
        assert report.dry_run and report.errors == []

        # nothing changed: not the provider, not the registrar, not the records, not the audit log
        assert machines() == world_before and cmdb() == cmdb_before
        assert {r["id"]: (r["state"], r["updated_at"]) for r in await runtime.store.list_hosts()} == hosts_before
        assert await sweep_events(runtime) == []
        assert ("destroy", "mem", "crashed-clone") not in testing.journal
    finally:
        await runtime.stop()


async def test_real_run_cleans_as_the_policy_says_and_audits_each_action(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime(CLEAN)
    try:
        s = await scene(runtime)
        report = await runtime.sweeper.run(dry_run=False, actor="operator")
        assert report.errors == []
        actions = {(f.kind, f.host_id): f.action for f in report.findings}
        assert actions == {
            ("leaked", s["unknown"]): "destroyed", ("leaked", s["gone"]["id"]): "destroyed",
            ("vanished", s["vanished"]["id"]): "retiring",
            ("orphaned", s["gone"]["id"]): "deregistered", ("orphaned", s["unknown"]): "deregistered",
        }
        # the other side: both leaked machines destroyed, only the kept host's machine is left
        await wait_states(runtime, [s["vanished"]["id"]], {"gone"})
        assert sorted(m.host_id or "" for m in machines().values()) == [s["kept"]["id"]]
        # the orphans are gone and the vanished host was deregistered by its retirement
        assert sorted(cmdb()) == [s["kept"]["fqdn"]]
        assert await runtime.store.get_host(s["kept"]["id"]) is not None
        assert (await runtime.store.get_host(s["kept"]["id"]))["state"] == "ready"  # type: ignore[index]

        events = await sweep_events(runtime)
        kinds = sorted(e["kind"] for e in events)
        assert kinds == ["sweep", "sweep-deregistered", "sweep-deregistered", "sweep-destroyed", "sweep-destroyed",
                         "sweep-retired"]
        assert all(e["actor"] == "operator" for e in events)
        [retire_event] = [e for e in events if e["kind"] == "sweep-retired"]
        assert retire_event["host_id"] == s["vanished"]["id"] and "no machine" in retire_event["detail"]["reason"]
        [summary] = [e for e in events if e["kind"] == "sweep"]
        assert len(summary["detail"]["findings"]) == 5
        # the vanished host's trail says why it was retired
        trail = [e["kind"] for e in await runtime.store.list_events(host_id=s["vanished"]["id"])]
        assert trail[-1] == "gone" and "sweep-retired" in trail

        again = await runtime.sweeper.run(dry_run=False, actor="operator")
        assert again.findings == [] and again.errors == []
    finally:
        await runtime.stop()


async def test_vanished_fail_policy_fails_the_host_and_retry_makes_a_new_machine(
    make_runtime: Callable[..., Any],
) -> None:
    runtime = await make_runtime(NO_GRACE + '[sweep.policy]\nvanished = "fail"\n')
    try:
        [row] = await ready_hosts(runtime, 1)
        machines().clear()
        report = await runtime.sweeper.run(dry_run=False, actor="t")
        assert [(f.kind, f.action) for f in report.findings] == [("vanished", "failed (retry makes a new machine)")]
        failed = await runtime.store.get_host(row["id"])
        assert failed is not None and failed["state"] == "failed" and failed["failed_step"] == "provision"
        assert "machine vanished" in failed["error"]
        # a failed host is the operator's now: the next sweep does not judge it again
        assert (await runtime.sweeper.run(dry_run=False, actor="t")).findings == []
        await runtime.governor.retry(row["name"], actor="t")
        await wait_states(runtime, [row["id"]], {"ready"})
        assert [m.host_id for m in machines().values()] == [row["id"]]
        assert (await runtime.sweeper.run(dry_run=True, actor="t")).findings == []
    finally:
        await runtime.stop()


async def test_report_policy_records_findings_and_changes_nothing(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime(NO_GRACE)
    try:
        s = await scene(runtime)
        world_before = dict(machines())
        report = await runtime.sweeper.run(dry_run=False, actor="t")
        assert len(report.findings) == 5 and {f.action for f in report.findings} == {"reported"}
        assert machines() == world_before
        assert (await runtime.store.get_host(s["vanished"]["id"]))["state"] == "ready"  # type: ignore[index]
        assert [e["kind"] for e in await sweep_events(runtime)] == ["sweep"]
    finally:
        await runtime.stop()


async def test_recent_hosts_are_not_judged(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime("[sweep]\ninterval = 0\ngrace = 3600\n")
    try:
        s = await scene(runtime)
        report = await runtime.sweeper.run(dry_run=True, actor="t")
        # within the grace period only what has no record at all is judged
        assert found(report) == {("leaked", "mem", s["unknown"], "none"), ("orphaned", "cmdb", s["unknown"], "none")}
    finally:
        await runtime.stop()


async def test_leased_hosts_are_not_judged(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime(NO_GRACE)
    try:
        [row] = await ready_hosts(runtime, 1)
        machines().clear()
        async with runtime.store.transaction() as conn:  # as if an engine held it
            await conn.execute(update(hosts).where(hosts.c.id == row["id"]).values(lease_owner="elsewhere/1",
                                                                                   lease_expires=0))
        assert (await runtime.sweeper.run(dry_run=True, actor="t")).findings == []
    finally:
        await runtime.stop()


async def test_a_failed_listing_is_never_read_as_vanished(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime(CLEAN)
    try:
        [row] = await ready_hosts(runtime, 1)
        machines().clear()
        testing.MemoryProvider.faults.setdefault("mem", testing.Faults()).fail("list_owned", RetryableError("vCenter busy"))
        testing.MemoryRegistrar.faults.setdefault("cmdb", testing.Faults()).fail("list_owned", RetryableError("down"))
        report = await runtime.sweeper.run(dry_run=False, actor="t")
        assert report.findings == []
        assert sorted(e["where"] for e in report.errors) == ["provider mem", "registrar cmdb"]
        assert "vCenter busy" in report.errors[0]["error"] + report.errors[1]["error"]
        assert (await runtime.store.get_host(row["id"]))["state"] == "ready"  # type: ignore[index]
        # once the provider answers, the host is found vanished
        report = await runtime.sweeper.run(dry_run=True, actor="t")
        assert found(report) == {("vanished", "mem", row["id"], "ready")} and report.errors == []
    finally:
        await runtime.stop()


class _Flicker:
    """A plugin that hides the machines of one host from the first listing only, as a flaky
    platform API might (a page missing once)."""

    def __init__(self, host_id: str) -> None:
        self.host_id = host_id
        self.hidden: dict[str, Machine] = {}
        self.calls = 0

    @hookimpl
    def governord_list_machines(self, provider: str) -> None:
        self.calls += 1
        if self.calls == 1:
            self.hidden = {k: m for k, m in machines().items() if m.host_id == self.host_id}
            for key in self.hidden:
                del machines()[key]
        else:
            machines().update(self.hidden)


async def test_vanished_is_confirmed_by_a_second_listing_before_acting(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime(CLEAN)
    try:
        [row] = await ready_hosts(runtime, 1)
        flicker = _Flicker(row["id"])
        runtime.plugins.register(flicker, "flicker")
        report = await runtime.sweeper.run(dry_run=False, actor="t")
        assert [(f.kind, f.action) for f in report.findings] == [("vanished", "skipped: the machine is there after all")]
        assert flicker.calls == 2
        assert (await runtime.store.get_host(row["id"]))["state"] == "ready"  # type: ignore[index]
        assert [e["kind"] for e in await sweep_events(runtime)] == ["sweep"]
    finally:
        runtime.plugins.unregister("flicker")
        await runtime.stop()


async def test_an_adopted_hosts_machine_is_never_destroyed(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime(CLEAN)
    try:
        adopted = await runtime.governor.set_tags("legacy.lab.example", add=["node"], remove=[], actor="t", adopt=True,
                                                  address="198.51.100.99")
        await wait_states(runtime, [adopted["id"]], {"ready"})
        gone = await retired(runtime, adopted)
        assert gone["origin"] == "adopted"
        stray(adopted["id"], "legacy")  # a machine carrying its id (made by someone else's hand)
        report = await runtime.sweeper.run(dry_run=False, actor="t")
        assert [f for f in report.findings if f.kind == "leaked"] == []
        assert [m.host_id for m in machines().values()] == [adopted["id"]]
    finally:
        await runtime.stop()


async def test_a_failing_action_is_reported_and_the_next_sweep_finishes_it(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime(CLEAN)
    try:
        unknown = str(uuid.uuid4())
        stray(unknown)
        testing.MemoryProvider.faults.setdefault("mem", testing.Faults()).fail("destroy", RetryableError("locked"))
        report = await runtime.sweeper.run(dry_run=False, actor="t")
        [finding] = report.findings
        assert finding.action.startswith("failed:") and "locked" in finding.action
        assert report.errors and "locked" in report.errors[0]["error"]
        assert [e["kind"] for e in await sweep_events(runtime)] == ["sweep-action-failed", "sweep"]
        assert [m.host_id for m in machines().values()] == [unknown]
        report = await runtime.sweeper.run(dry_run=False, actor="t")
        assert [f.action for f in report.findings] == ["destroyed"] and machines() == {}
    finally:
        await runtime.stop()


async def test_periodic_sweeps_run_and_stop_with_the_daemon(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime(CLEAN.replace("interval = 0", "interval = 0.2"))
    try:
        stray(str(uuid.uuid4()))
        events: list[dict[str, Any]] = []
        for _ in range(500):  # the periodic sweep records its summary last
            events = await sweep_events(runtime)
            if any(e["kind"] == "sweep" for e in events):
                break
            await asyncio.sleep(0.02)
        assert machines() == {}
        assert {e["actor"] for e in events} == {"governord"} and "sweep-destroyed" in {e["kind"] for e in events}
        metrics = (await runtime.metrics.render()).decode()
        assert 'governord_sweep_actions_total{kind="leaked",outcome="done"} 1.0' in metrics
    finally:
        task = runtime.sweeper._task
        await runtime.stop()
    assert task is not None and task.done()


async def test_findings_are_metrics(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime(NO_GRACE)
    try:
        await scene(runtime)
        await runtime.sweeper.run(dry_run=True, actor="t")
        metrics = (await runtime.metrics.render()).decode()
        assert 'governord_sweep_findings{kind="leaked"} 2.0' in metrics
        assert 'governord_sweep_findings{kind="vanished"} 1.0' in metrics
        assert 'governord_sweep_findings{kind="orphaned"} 2.0' in metrics
        assert "governord_sweep_errors 0.0" in metrics
    finally:
        await runtime.stop()


async def test_a_draining_hosts_vanished_machine_is_found_and_the_host_retired(
    make_runtime: Callable[..., Any],
) -> None:
    """A host being drained whose machine is gone: found like a ready one; even under the "fail"
    policy it is retired (it was leaving), not failed for a new machine."""
    runtime = await make_runtime(NO_GRACE + '[sweep.policy]\nvanished = "fail"\n'
                                 '[applications.demo.drain]\ntimeout = 600\n')
    try:
        one, two = await ready_hosts(runtime, 2)
        await runtime.governor.scale("demo", "node", count=1, actor="t")
        [draining] = await wait_states(runtime, [two["id"]], {"draining"})
        [machine] = [k for k, m in machines().items() if m.host_id == draining["id"]]
        del machines()[machine]
        dry = await runtime.sweeper.run(dry_run=True, actor="t")
        assert found(dry) == {("vanished", "mem", draining["id"], "draining")}
        report = await runtime.sweeper.run(dry_run=False, actor="t")
        assert [(f.kind, f.action) for f in report.findings] == [("vanished", "retiring")]
        [gone] = await wait_states(runtime, [draining["id"]], {"gone"})
        assert gone["failed_step"] is None
        assert (await runtime.store.get_host(one["id"]))["state"] == "ready"  # type: ignore[index]
    finally:
        await runtime.stop()
