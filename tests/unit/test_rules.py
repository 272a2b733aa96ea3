"""Per-application rules: placements in order of preference with per-provider caps, the
application's max and min, cooldown, approval (with expiry), deletion policy, plan and audit."""

from __future__ import annotations

import asyncio

import pytest

from governord import testing
from governord.runtime import Runtime
from governord.service import RequestError

from .conftest import wait_states

RULES = """
[providers.mem2]
type = "memory"

[applications.rules]
max_hosts = 6
min_hosts = 1
{extra}

[applications.rules.roles.node]
tags = ["node"]
network = "lab"

[[applications.rules.roles.node.placements]]
provider = "mem"
cap = 2
profile = {{ size = "large" }}

[[applications.rules.roles.node.placements]]
provider = "mem2"
profile = {{ size = "small" }}
"""


def rules(extra: str = "") -> str:
    return RULES.format(extra=extra)


async def test_placements_fill_in_order_of_preference_under_caps(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime: Runtime = await make_runtime(rules())
    try:
        plan = await runtime.governor.plan("rules", "node", add=3, count=None)
        assert plan["decision"] == "accepted" and plan["rule"] == "placement"
        assert [h["provider"] for h in plan["hosts"]] == ["mem", "mem", "mem2"]
        assert "1 on mem2: mem full (2)" in plan["reason"]
        assert plan["hosts"][0]["classification"] == {"cmdb": {"group": "nodes", "classes": ["openshift::node"]}}
        assert await runtime.store.list_hosts(app="rules") == []  # planning changes nothing

        decision = await runtime.governor.scale("rules", "node", add=3, actor="t")
        rows = await wait_states(runtime, decision.request["host_ids"], {"ready"})
        assert sorted(r["provider"] for r in rows) == ["mem", "mem", "mem2"]
        assert {r["profile"]["size"] for r in rows if r["provider"] == "mem2"} == {"small"}
        assert len(testing.MemoryProvider.worlds["mem"]) == 2 and len(testing.MemoryProvider.worlds["mem2"]) == 1
    finally:
        await runtime.stop()


async def test_every_provider_full_is_declined_with_the_counts(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime: Runtime = await make_runtime(rules().replace('provider = "mem2"\n', 'provider = "mem2"\ncap = 1\n'))
    try:
        decision = await runtime.governor.scale("rules", "node", add=4, actor="t")
        assert decision.request["state"] == "declined"
        assert decision.request["reason"] == "cap reached on every allowed provider of rules/node: mem 2/2, mem2 1/1"
        assert await runtime.store.list_hosts(app="rules") == []
    finally:
        await runtime.stop()


async def test_cooldown_between_scale_ups(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime: Runtime = await make_runtime(rules("cooldown = 60.0"))
    try:
        first = await runtime.governor.scale("rules", "node", add=1, actor="t")
        assert first.request["state"] == "accepted"
        second = await runtime.governor.scale("rules", "node", add=1, actor="t")
        assert second.request["state"] == "declined"
        assert second.request["reason"].startswith("cooldown: application rules may scale up again in ")
    finally:
        await runtime.stop()


async def test_approval_above_n_holds_then_approve_or_deny(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime: Runtime = await make_runtime(rules("approval = 2"))
    try:
        small = await runtime.governor.scale("rules", "node", add=2, actor="t")
        assert small.request["state"] == "accepted"
        big = await runtime.governor.scale("rules", "node", add=2, actor="app:rules")
        assert big.request["state"] == "pending" and "approval for above 2 hosts" in big.request["reason"]
        status = await runtime.governor.request_status(big.request)
        assert status["status"] == "pending-approval" and status["hosts"] == []
        assert len(await runtime.store.list_hosts(app="rules")) == 2  # nothing reserved while pending

        approved = await runtime.governor.decide_pending(big.request["id"], approve=True, comment="peak", actor="op")
        assert approved["state"] == "accepted" and approved["reason"] == "approved by op: peak"
        await wait_states(runtime, approved["host_ids"], {"ready"})
        with pytest.raises(RequestError, match="is accepted, not pending"):
            await runtime.governor.decide_pending(big.request["id"], approve=False, comment="late", actor="op")

        third = await runtime.governor.scale("rules", "node", add=1, actor="t")
        denied = await runtime.governor.decide_pending(third.request["id"], approve=False, comment="no", actor="op")
        assert denied["state"] == "denied"
        assert (await runtime.governor.request_status(denied))["status"] == "denied"
        audit = [e["kind"] for e in await runtime.store.list_events(kind_prefix="request-")]
        assert audit == ["request-accepted", "request-pending", "request-approved", "request-accepted",
                         "request-pending", "request-denied"]
    finally:
        await runtime.stop()


async def test_pending_requests_expire(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime: Runtime = await make_runtime(rules('approval = "always"\napproval_expiry = 0.2'))
    try:
        pending = await runtime.governor.scale("rules", "node", add=1, actor="t")
        assert pending.request["state"] == "pending"
        await asyncio.sleep(0.3)
        with pytest.raises(RequestError, match="is expired, not pending"):
            await runtime.governor.decide_pending(pending.request["id"], approve=True, comment="x", actor="op")
        row = await runtime.store.get_request(pending.request["id"])
        assert row is not None and row["state"] == "expired"
    finally:
        await runtime.stop()


async def test_minimum_and_deletion_policy(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime: Runtime = await make_runtime(rules('deletion_policy = "oldest"'))
    try:
        decision = await runtime.governor.scale("rules", "node", add=3, actor="t")
        rows = await wait_states(runtime, decision.request["host_ids"], {"ready"})
        oldest = min(rows, key=lambda r: r["created_at"])
        down = await runtime.governor.scale("rules", "node", count=2, actor="t")
        assert down.request["state"] == "accepted" and down.request["host_ids"] == [oldest["id"]]
        below = await runtime.governor.scale("rules", "node", count=0, actor="t")
        assert below.request["state"] == "declined" and below.request["reason"].startswith("minimum:")
        kept = [r for r in rows if r["id"] != oldest["id"]]
        await runtime.governor.release("rules", hosts=[kept[0]["name"]], actor="t")
        with pytest.raises(RequestError, match="minimum: application rules keeps at least 1"):
            await runtime.governor.release("rules", hosts=[kept[1]["name"]], actor="t")
    finally:
        await runtime.stop()
