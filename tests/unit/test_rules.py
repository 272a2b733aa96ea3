"""Per-application rules: placements in order of preference with per-provider caps, the
application's max and min, cooldown, approval (with expiry), deletion policy, plan and audit;
and the webhook rules' hosts per deployed component (keep N, teardown), under the same rules."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from governord import testing
from governord.config import WebhookRule
from governord.rules import RequestError
from governord.runtime import Runtime

from .conftest import BACKENDS, wait_states

#: every test here that makes a runtime runs on SQLite and on PostgreSQL (tests/unit/conftest.py)
STORE_BACKENDS = BACKENDS

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
        # planning it says the same, and names no host
        plan = await runtime.governor.plan("rules", "node", add=4, count=None)
        assert plan["decision"] == "declined" and plan["hosts"] == []
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


# --- webhook rules: hosts per deployed component ----------------------------------------------

KEEP_2 = WebhookRule(event="deploy", role="node", keep=2)
TEARDOWN = WebhookRule(event="teardown", role="node", keep=0)


async def by_rule(runtime: Runtime, rule: WebhookRule, component: str, key: str) -> dict[str, Any]:
    decision = await runtime.governor.scale_by_rule("rules", rule, component=component, actor="webhook:rules",
                                                    idempotency_key=f"webhook:{key}")
    return decision.request


async def hosts_of(runtime: Runtime, component: str | None = None) -> list[dict[str, Any]]:
    rows = await runtime.store.list_hosts(app="rules")
    # kept: neither asked to retire nor anywhere in the teardown (a busy machine may have taken a
    # released host past "retiring" by the time this reads)
    leaving = {"retiring", "deregistering", "deprovisioning", "cleaning", "gone"}
    return [r for r in rows if r["state"] not in leaving and not r["retire_requested"]
            and (component is None or r["component"] == component)]


async def test_keep_converges_each_component_on_its_own(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime: Runtime = await make_runtime(rules())
    try:
        first = await by_rule(runtime, KEEP_2, "shop/web", "d1")
        assert first["state"] == "accepted" and first["params"] == {"role": "node", "add": None, "count": 2,
                                                                      "component": "shop/web"}
        web = await wait_states(runtime, first["host_ids"], {"ready"})
        assert [h["component"] for h in web] == ["shop/web", "shop/web"]

        again = await by_rule(runtime, KEEP_2, "shop/web", "d2")  # a repeated deploy: nothing to do
        assert again["state"] == "accepted" and again["host_ids"] == []
        assert again["reason"] == "node of shop/web has 2 hosts already"

        other = await by_rule(runtime, KEEP_2, "shop/worker", "d3")  # counted on its own
        assert len(other["host_ids"]) == 2
        await wait_states(runtime, other["host_ids"], {"ready"})
        assert len(await hosts_of(runtime, "shop/web")) == 2 and len(await hosts_of(runtime, "shop/worker")) == 2

        # a host of web is lost (handed back): the next deploy makes it up, for web alone
        await runtime.governor.release("rules", hosts=[web[0]["name"]], actor="t")
        refill = await by_rule(runtime, KEEP_2, "shop/web", "d4")
        assert len(refill["host_ids"]) == 1
        [new] = await runtime.store.list_hosts(ids=refill["host_ids"])
        assert new["component"] == "shop/web"

        # teardown of web releases its hosts, and only those
        worker_ids = sorted(other["host_ids"])
        gone = await by_rule(runtime, TEARDOWN, "shop/web", "d5")
        assert gone["state"] == "accepted" and sorted(gone["host_ids"]) == sorted([web[1]["id"], new["id"]])
        await wait_states(runtime, gone["host_ids"] + [web[0]["id"]], {"gone"})
        assert sorted(h["id"] for h in await hosts_of(runtime)) == worker_ids
        left = {m.host_id for world in testing.MemoryProvider.worlds.values() for m in world.values()}
        assert sorted(left) == worker_ids  # the machines themselves are gone too
        again = await by_rule(runtime, TEARDOWN, "shop/web", "d6")  # tearing down twice does nothing
        assert again["state"] == "accepted" and again["host_ids"] == []
    finally:
        await runtime.stop()


async def test_keep_releases_in_the_deletion_policys_order_within_the_component(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime: Runtime = await make_runtime(rules('deletion_policy = "oldest"'))
    try:
        older = await by_rule(runtime, WebhookRule(role="node", keep=1), "shop/other", "d0")
        web = await by_rule(runtime, WebhookRule(role="node", keep=3), "shop/web", "d1")
        rows = await wait_states(runtime, older["host_ids"] + web["host_ids"], {"ready"})
        web_rows = sorted((r for r in rows if r["component"] == "shop/web"), key=lambda r: r["created_at"])
        down = await by_rule(runtime, WebhookRule(role="node", keep=1), "shop/web", "d2")  # N lowered
        assert down["state"] == "accepted" and down["reason"] == "releasing 2 (oldest first)"
        # the two oldest of web, not the application's oldest host (other's)
        assert sorted(down["host_ids"]) == sorted(r["id"] for r in web_rows[:2])
        assert [h["component"] for h in await hosts_of(runtime)] == ["shop/other", "shop/web"]
    finally:
        await runtime.stop()


async def test_keep_obeys_the_cap_and_the_minimum(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime: Runtime = await make_runtime(rules())  # max_hosts 6, min_hosts 1
    try:
        assert len((await by_rule(runtime, WebhookRule(role="node", keep=4), "a/big", "d1"))["host_ids"]) == 4
        declined = await by_rule(runtime, WebhookRule(role="node", keep=4), "a/other", "d2")
        assert declined["state"] == "declined" and declined["reason"].startswith("cap reached: application rules")
        assert await hosts_of(runtime, "a/other") == []
        # the application's last hosts stay, even on teardown
        teardown = await by_rule(runtime, TEARDOWN, "a/big", "d3")
        assert teardown["state"] == "declined" and teardown["reason"].startswith("minimum:")
    finally:
        await runtime.stop()


async def test_keep_obeys_cooldown_but_a_no_op_is_no_scale_up(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime: Runtime = await make_runtime(rules("cooldown = 60.0"))
    try:
        assert (await by_rule(runtime, WebhookRule(role="node", keep=1), "a/web", "d1"))["state"] == "accepted"
        other = await by_rule(runtime, WebhookRule(role="node", keep=1), "a/worker", "d2")
        assert other["state"] == "declined" and other["reason"].startswith("cooldown:")
        same = await by_rule(runtime, WebhookRule(role="node", keep=1), "a/web", "d3")
        assert same["state"] == "accepted" and same["host_ids"] == []
    finally:
        await runtime.stop()


async def test_keep_waits_for_approval_and_the_approved_hosts_belong_to_the_component(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime: Runtime = await make_runtime(rules('approval = "always"'))
    try:
        pending = await by_rule(runtime, KEEP_2, "a/web", "d1")
        assert pending["state"] == "pending" and await hosts_of(runtime) == []
        approved = await runtime.governor.decide_pending(pending["id"], approve=True, comment="ok", actor="op")
        rows = await wait_states(runtime, approved["host_ids"], {"ready"})
        assert [r["component"] for r in rows] == ["a/web", "a/web"]
    finally:
        await runtime.stop()


async def test_add_and_count_rules_keep_their_meaning(make_runtime) -> None:  # type: ignore[no-untyped-def]
    runtime: Runtime = await make_runtime(rules())
    try:
        # add: that many more on every event, made for the deployed component
        for key in ("d1", "d2"):
            added = await by_rule(runtime, WebhookRule(role="node", add=1), "a/legacy-db", key)
            assert len(added["host_ids"]) == 1
        assert len(await hosts_of(runtime, "a/legacy-db")) == 2
        # count: the role's hosts in all, whoever made them; what it makes belongs to no component
        counted = await by_rule(runtime, WebhookRule(role="node", count=3), "a/web", "d3")
        assert counted["params"] == {"role": "node", "add": None, "count": 3} and len(counted["host_ids"]) == 1
        [made] = await runtime.store.list_hosts(ids=counted["host_ids"])
        assert made["component"] is None
        again = await by_rule(runtime, WebhookRule(role="node", count=3), "a/web", "d4")
        assert again["host_ids"] == [] and again["reason"] == "node has 3 hosts already"
    finally:
        await runtime.stop()


async def test_a_release_decided_while_the_host_came_to_rest_still_retires_it(make_runtime) -> None:  # type: ignore[no-untyped-def]
    """A release reads the host in flight, the engine then brings it to ready: the release must
    still retire it (a flag on a resting host would never be acted on)."""
    runtime: Runtime = await make_runtime(rules())
    try:
        decision = await runtime.governor.scale("rules", "node", add=2, actor="t")
        [row, _] = await wait_states(runtime, decision.request["host_ids"], {"ready"})
        seen_in_flight = {**row, "state": "configuring"}  # what the release read, a moment earlier
        await runtime.store.decide(
            lambda tx: runtime.governor._retire(tx, [seen_in_flight], "t", None))  # noqa: SLF001
        runtime.engine.wake()
        [gone] = await wait_states(runtime, [row["id"]], {"gone"})
        assert not gone["retire_requested"]
    finally:
        await runtime.stop()
