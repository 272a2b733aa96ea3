"""Autoscaling on a Prometheus query's value, against a real Prometheus scraping an exporter the
test controls: the load goes up and hosts come, down and they go; between the thresholds nothing
happens; the cooldown spaces the requests; no data and failed queries never scale; a dry run
asks nothing; the application's rules decide what is asked. Every request is checked in the
store with its trigger (the query, its value, the threshold) and its audit event."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import tomllib
from collections.abc import Callable
from typing import Any

import pytest

from governord import testing
from governord.api import admin_api
from governord.autoscaler.thresholds import ACTOR
from governord.config import build_config
from governord.dispatch.pluginmanager import PluginManager
from governord.errors import ConfigError
from governord.runtime import Runtime
from lab.prometheus import Exporter, Prometheus, static_job

from .conftest import BASE_CONFIG, wait_states

QUERY = 'max(lab_load{app="demo"})'


def rule(**overrides: Any) -> str:
    settings: dict[str, Any] = {
        "query": QUERY, "scale_up_above": 0.8, "scale_down_below": 0.3, "scale_up_for": 1.5,
        "scale_down_for": 1.5, "cooldown": 4.0, "interval": 0.25, **overrides}
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    return f"[applications.demo.roles.node.autoscale]\n{lines}\n"


async def start(make_runtime: Callable[..., Any], prometheus: Prometheus, autoscale: str,
                app_settings: str = "") -> Runtime:
    def patch(text: str) -> str:
        return text.replace("[applications.demo]\nmax_hosts = 5\n", f"[applications.demo]\nmax_hosts = 5\n{app_settings}")
    runtime: Runtime = await make_runtime(f'[prometheus]\nurl = "{prometheus.url}"\n' + autoscale, patch)
    return runtime


async def scraped(prometheus: Prometheus, value: float) -> None:
    """Until the query answers ``value`` (the exporter was set to it)."""
    await asyncio.to_thread(prometheus.wait_for, f"{QUERY} == {value}")


async def autoscale_requests(runtime: Runtime) -> list[dict[str, Any]]:
    return sorted([r for r in await runtime.store.list_requests(app="demo") if r["actor"] == ACTOR],
                  key=lambda r: r["created_at"])


async def wait_requests(runtime: Runtime, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = await autoscale_requests(runtime)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"the autoscaler made {len(found)} requests, not {count}: {found}")
        await asyncio.sleep(0.1)


async def live(runtime: Runtime) -> list[dict[str, Any]]:
    return [h for h in await runtime.store.list_hosts() if h["state"] not in ("gone",) and not h["retire_requested"]
            and h["state"] not in ("retiring", "deregistering", "deprovisioning", "cleaning")]


async def test_load_up_brings_hosts_load_down_takes_them_and_the_band_between_holds(
        make_runtime: Callable[..., Any], prometheus_factory: Any, exporter: Exporter) -> None:
    exporter.set("lab_load", 0.5, app="demo")
    prometheus = prometheus_factory([static_job("lab", exporter.target)])
    await scraped(prometheus, 0.5)
    runtime = await start(make_runtime, prometheus, rule())
    try:
        await asyncio.sleep(2.5)  # within the band, longer than either hold: nothing is asked
        assert await autoscale_requests(runtime) == []
        assert runtime.thresholds.holds[("demo", "node")].outcome == "within"

        raised = time.time()
        exporter.set("lab_load", 0.95, app="demo")
        [up] = await wait_requests(runtime, 1)
        # asked only once the value had held above the threshold for scale_up_for
        assert up["created_at"] - raised >= 1.5
        assert up["state"] == "accepted" and up["params"]["add"] == 1
        trigger = up["params"]["trigger"]["autoscale"]
        assert trigger["query"] == QUERY and trigger["value"] == 0.95 and trigger["threshold"] == 0.8
        assert trigger["direction"] == "up" and trigger["held_for"] >= 1.5
        [host] = await wait_states(runtime, up["host_ids"], {"ready"})
        [audit] = [e for e in await runtime.store.list_events(kind_prefix="request-accepted")
                   if e["request_id"] == up["id"]]
        assert audit["actor"] == ACTOR and audit["detail"]["trigger"]["autoscale"]["value"] == 0.95

        # the load stays high: the next request waits for the rule's cooldown (4 s)
        _, second = await wait_requests(runtime, 2)
        assert second["created_at"] - up["created_at"] >= 4.0
        await wait_states(runtime, second["host_ids"], {"ready"})

        # back into the band: nothing more, either way, for longer than the holds and the cooldown
        exporter.set("lab_load", 0.5, app="demo")
        await scraped(prometheus, 0.5)
        settled = len(await autoscale_requests(runtime))
        await asyncio.sleep(5.0)
        assert len(await autoscale_requests(runtime)) == settled
        assert len(await live(runtime)) == settled

        lowered = time.time()
        exporter.set("lab_load", 0.1, app="demo")
        down = (await wait_requests(runtime, settled + 1))[-1]
        assert down["created_at"] - lowered >= 1.5
        assert down["params"]["add"] == -1 and down["state"] == "accepted"
        assert down["params"]["trigger"]["autoscale"]["direction"] == "down"
        # the newest host goes (the deletion policy), really gone from the provider
        [released] = down["host_ids"]
        assert released == second["host_ids"][0]
        await wait_states(runtime, [released], {"gone"})
        assert [m.host_id for m in testing.MemoryProvider.worlds["mem"].values()] == [host["id"]]
        assert [h["id"] for h in await live(runtime)] == [host["id"]]
    finally:
        await runtime.stop()


async def test_no_data_and_failed_queries_never_scale_down(
        make_runtime: Callable[..., Any], prometheus_factory: Any, exporter: Exporter,
        caplog: pytest.LogCaptureFixture) -> None:
    exporter.set("lab_other", 1.0)  # the target is up, the rule's series is not there
    prometheus = prometheus_factory([static_job("lab", exporter.target)])
    await asyncio.to_thread(prometheus.wait_for, "lab_other")
    runtime = await start(make_runtime, prometheus, rule(scale_down_for=0.5, cooldown=0), "min_hosts = 0\n")
    try:
        made = await runtime.governor.scale("demo", "node", add=2, actor="t")
        await wait_states(runtime, made.request["host_ids"], {"ready"})
        with caplog.at_level(logging.WARNING, logger="governord.autoscaler.thresholds"):
            await asyncio.sleep(2.0)
        assert runtime.thresholds.holds[("demo", "node")].outcome == "no_data"
        assert [r.message for r in caplog.records if "no data" in r.message][:1], "the gap was logged"
        assert len([r for r in caplog.records if "no data" in r.message]) == 1, "once while it lasts"

        # Prometheus itself goes away: an error, still nothing released
        prometheus.stop()
        await asyncio.sleep(1.5)
        assert runtime.thresholds.holds[("demo", "node")].outcome == "error"
        assert "cannot reach" in (runtime.thresholds.holds[("demo", "node")].error or "")
        assert await autoscale_requests(runtime) == []
        assert len(await live(runtime)) == 2
    finally:
        await runtime.stop()


async def test_a_gap_in_the_data_starts_the_hold_again(
        make_runtime: Callable[..., Any], prometheus_factory: Any, exporter: Exporter) -> None:
    exporter.set("lab_load", 0.1, app="demo")
    prometheus = prometheus_factory([static_job("lab", exporter.target)])
    await scraped(prometheus, 0.1)
    # evaluated by hand (the loop's first round aside): interval far away
    runtime = await start(make_runtime, prometheus, rule(scale_down_for=1.0, cooldown=0, interval=3600))
    try:
        made = await runtime.governor.scale("demo", "node", add=2, actor="t")
        await wait_states(runtime, made.request["host_ids"], {"ready"})
        scaler = runtime.thresholds
        section = runtime.config.applications["demo"].roles["node"].autoscale
        assert section is not None
        runtime.thresholds.holds.clear()
        assert await scaler.evaluate("demo", "node", section) == "holding"
        exporter.remove("lab_load", app="demo")
        await asyncio.to_thread(prometheus.wait_for, f"absent({QUERY})")
        assert await scaler.evaluate("demo", "node", section) == "no_data"
        exporter.set("lab_load", 0.1, app="demo")
        await scraped(prometheus, 0.1)
        await asyncio.sleep(1.0)  # longer than the hold since it first began; not since the gap
        assert await scaler.evaluate("demo", "node", section) == "holding"
        await asyncio.sleep(1.1)
        assert await scaler.evaluate("demo", "node", section) == "acted"
        [down] = await autoscale_requests(runtime)
        assert down["params"]["add"] == -1 and len(down["host_ids"]) == 1
    finally:
        await runtime.stop()


async def test_the_applications_rules_decide_and_a_declined_ask_waits_for_the_cooldown(
        make_runtime: Callable[..., Any], prometheus_factory: Any, exporter: Exporter) -> None:
    exporter.set("lab_load", 0.99, app="demo")
    prometheus = prometheus_factory([static_job("lab", exporter.target)])
    await scraped(prometheus, 0.99)
    runtime = await start(make_runtime, prometheus, rule(scale_up_for=0, scale_up_step=3, cooldown=3.0))
    try:
        first = await wait_requests(runtime, 1)
        await wait_states(runtime, first[0]["host_ids"], {"ready"})
        # 3 of max_hosts 5 now: the next ask (3 more) is declined by the cap, audited with its trigger
        _, declined = await wait_requests(runtime, 2)
        assert declined["state"] == "declined" and "cap reached" in declined["reason"]
        assert declined["created_at"] - first[0]["created_at"] >= 3.0
        [audit] = [e for e in await runtime.store.list_events(kind_prefix="request-declined")
                   if e["request_id"] == declined["id"]]
        assert audit["detail"]["rule"] == "max_hosts" and audit["detail"]["trigger"]["autoscale"]["value"] == 0.99
        await asyncio.sleep(2.0)  # not asked again at every evaluation
        assert len(await autoscale_requests(runtime)) == 2
    finally:
        await runtime.stop()


async def test_a_dry_run_asks_nothing_and_says_what_the_rules_would_decide(
        make_runtime: Callable[..., Any], prometheus_factory: Any, exporter: Exporter,
        caplog: pytest.LogCaptureFixture, aiohttp_client: Callable[..., Any]) -> None:
    exporter.set("lab_load", 0.9, app="demo")
    prometheus = prometheus_factory([static_job("lab", exporter.target)])
    await scraped(prometheus, 0.9)
    with caplog.at_level(logging.INFO, logger="governord.autoscaler.thresholds"):
        runtime = await start(make_runtime, prometheus, rule(dry_run=True, scale_up_for=0.5, scale_up_step=2))
        try:
            deadline = time.monotonic() + 10
            while not (dry := await runtime.store.list_events(kind_prefix="autoscale-dry-run")):
                assert time.monotonic() < deadline, "no dry-run event"
                await asyncio.sleep(0.1)
            detail = dry[0]["detail"]
            assert detail["decision"] == "accepted" and detail["query"] == QUERY and detail["value"] == 0.9
            assert detail["step"] == 2 and detail["hosts"] == ["demo-node-01", "demo-node-02"]
            assert await runtime.store.list_requests(app="demo") == []
            assert await runtime.store.list_hosts() == []
            # what an operator sees (governord-ctl autoscale)
            admin = await aiohttp_client(admin_api.create_admin_api(runtime))
            [seen] = (await (await admin.get("/v1/autoscale")).json())["rules"]
            assert seen["app"] == "demo" and seen["role"] == "node" and seen["value"] == 0.9
            assert seen["dry_run"] and seen["evaluating"] and seen["outcome"] in ("dry_run", "cooldown", "above")
            assert seen["last_action"] is not None
        finally:
            await runtime.stop()
    assert any("dry run" in r.message and "would ask +2" in r.message for r in caplog.records)


async def test_a_query_prometheus_refuses_is_an_error_that_asks_nothing(
        make_runtime: Callable[..., Any], prometheus_factory: Any) -> None:
    prometheus = prometheus_factory([])
    runtime = await start(make_runtime, prometheus, rule(query="sum(lab_load", scale_up_for=0))
    try:
        await asyncio.sleep(1.0)
        hold = runtime.thresholds.holds[("demo", "node")]
        assert hold.outcome == "error" and "bad_data" in (hold.error or "")
        assert await runtime.store.list_requests(app="demo") == []
    finally:
        await runtime.stop()


def _config(extra: str) -> Any:
    plugins = PluginManager()
    plugins.register(testing.plugin, "testing")
    plugins.collect_types()
    raw = tomllib.loads(BASE_CONFIG.format(state_dir="/tmp/governord-autoscale-config") + extra)
    return build_config("test.toml", raw, plugins.providers, plugins.registrars, unavailable={})


@pytest.mark.parametrize(("extra", "key", "message"), [
    (rule(), "applications.demo.roles.node.autoscale", "needs a [prometheus] section"),
    ('[prometheus]\nurl = "http://127.0.0.1:9090"\n' + rule(scale_down_below=0.8),
     "applications.demo.roles.node.autoscale.scale_down_below", "must be below scale_up_above"),
    ('[prometheus]\nurl = "http://127.0.0.1:9090"\n' + rule(scale_up_step=0),
     "applications.demo.roles.node.autoscale.scale_up_step", ""),
    ('[prometheus]\nurl = "http://127.0.0.1:9090"\n' + rule(query=""),
     "applications.demo.roles.node.autoscale.query", ""),
    ('[prometheus]\nurl = "ftp://prometheus"\n', "prometheus.url", "not an http(s) URL"),
    ('[prometheus]\nurl = "http://user:pw@prometheus"\n', "prometheus.url", "user name or password"),
])
def test_a_bad_rule_names_its_key(extra: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(extra)
    assert caught.value.key == key
    assert message in str(caught.value)


@pytest.mark.parametrize("store_backend", ["postgresql"], indirect=True)
async def test_in_a_fleet_the_leader_alone_asks_and_the_cooldown_survives_a_failover(
        make_runtime: Callable[..., Any], prometheus_factory: Any, exporter: Exporter) -> None:
    exporter.set("lab_load", 0.99, app="demo")
    prometheus = prometheus_factory([static_job("lab", exporter.target)])
    await scraped(prometheus, 0.99)
    settings = rule(scale_up_for=0, cooldown=5.0)
    fast = "heartbeat = 0.5\nleader_lease = 3\n"
    first = await make_runtime(f'[prometheus]\nurl = "{prometheus.url}"\n' + settings, instance="a",
                               fleet_options=fast)
    second = await make_runtime(f'[prometheus]\nurl = "{prometheus.url}"\n' + settings, instance="b",
                                fleet_options=fast)
    try:
        assert first.fleet.is_leader and not second.fleet.is_leader
        [asked] = await wait_requests(first, 1)
        await asyncio.sleep(2.0)  # both evaluate every 0.25 s; only the leader asks
        assert len(await autoscale_requests(first)) == 1
        assert second.thresholds.holds == {} and first.thresholds.holds[("demo", "node")].outcome == "cooldown"
        await first.stop()  # hands the leader lease back: the other instance leads from its next beat
        deadline = time.monotonic() + 10
        while not second.fleet.is_leader:
            assert time.monotonic() < deadline, "the second instance did not take the lead"
            await asyncio.sleep(0.1)
        _, again = await wait_requests(second, 2)
        # the new leader read the last ask from the store: it waited out the same cooldown
        assert again["created_at"] - asked["created_at"] >= 5.0
        assert again["actor"] == ACTOR and again["state"] == "accepted"
    finally:
        await second.stop()
