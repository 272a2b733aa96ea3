"""PostgreSQL stopped under a running daemon's parts (in-process, the memory provider; the real
daemon under load is tests/system/test_postgres_outage.py), on a cluster of the test's own: the
engine, the notifier, the sweep and the retention go on failing quietly, ``/healthz`` and
``governord_store_up`` say the store is down, requests are answered 503, nothing is half-written,
and once the server is back everything resumes with no one's help: hosts interrupted mid-step
finish, each with one machine."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from governord import store, testing
from governord.api import admin_api, app_api
from governord.config import build_config
from governord.dispatch.pluginmanager import PluginManager
from governord.runtime import Runtime
from governord.store.schema import requests
from lab.postgres import PostgresCluster

from .conftest import BASE_CONFIG, PASSWORD_ENV, wait_states
from .test_callbacks import WEBHOOK, Receiver, receiver  # noqa: F401 - receiver is a fixture

#: loops that would otherwise wait an hour run during the outage
LOOPS = "\n[sweep]\ninterval = 0.5\n[retention]\ninterval = 0.5\n"


async def _runtime_on(cluster: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    url = make_url(cluster.create_database("outage", owner="governord", password="outage-only"))
    monkeypatch.setenv(PASSWORD_ENV, url.password or "")
    bare = url._replace(username=None, password=None).render_as_string(hide_password=False)
    section = f'[store]\nurl = "{bare}"\nusername = "{url.username}"\npassword = {{ env = "{PASSWORD_ENV}" }}\n'
    plugins = PluginManager()
    plugins.register(testing.plugin, "testing")
    plugins.collect_types()
    raw = tomllib.loads(section + BASE_CONFIG.format(state_dir=tmp_path / "state") + WEBHOOK + LOOPS)
    runtime = await Runtime.open(build_config("test.toml", raw, plugins.providers, plugins.registrars,
                                              unavailable={}), plugins)
    await runtime.start()
    return runtime


async def _until(predicate: Callable[[], Any], timeout: float, what: str) -> float:
    """Seconds until ``predicate`` (awaited) is true."""
    began = time.monotonic()
    while not await predicate():
        assert time.monotonic() - began < timeout, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.1)
    return time.monotonic() - began


def _tasks(runtime: Runtime) -> dict[str, asyncio.Task[None] | None]:
    return {"engine": runtime.engine._runner, "leases": runtime.engine._renewer, "callbacks": runtime.notifier._task,
            "sweep": runtime.sweeper._task, "retention": runtime.pruner._task, "heartbeat": runtime.fleet._task}


async def test_the_daemon_survives_postgresql_stopping_and_resumes_when_it_is_back(
        private_postgres_cluster: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        aiohttp_client: Callable[..., Any], receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.INFO)
    cluster = private_postgres_cluster
    runtime = await _runtime_on(cluster, tmp_path, monkeypatch)
    admin = await aiohttp_client(admin_api.create_admin_api(runtime))
    app = await aiohttp_client(app_api.create_app_api(runtime))
    try:
        resp = await admin.get("/healthz")
        assert resp.status == 200 and await resp.json() == {"status": "ok", "store": "ok"}
        # every provider call takes a second: the hosts are mid-step when the server stops
        testing.MemoryProvider.faults.setdefault("mem", testing.Faults()).delay = 1.0
        decision = await runtime.governor.scale("demo", "node", add=3, actor="app:demo", idempotency_key="before",
                                                callback_url=receiver.url)
        ids = decision.request["host_ids"]
        await wait_states(runtime, ids, {"provisioning"})
        runtime.certificates.refresh = 0.1

        await asyncio.to_thread(cluster.stop)
        stopped = time.monotonic()

        async def unhealthy() -> bool:
            return (await admin.get("/healthz")).status == 503

        await _until(unhealthy, 5, "/healthz says unhealthy")
        body = await (await admin.get("/healthz")).json()
        assert body["status"] == "unhealthy" and "OperationalError" in body["store"]
        resp = await app.get("/healthz")  # anyone may ask there: the kind of failure, not the address
        assert resp.status == 503
        assert await resp.json() == {"status": "unhealthy", "store": "unreachable (OperationalError)"}
        resp = await app.get("/metrics")
        assert resp.status == 200 and "governord_store_up 0.0" in await resp.text()

        resp = await admin.post("/v1/apps/demo/scale", json={"role": "node", "add": 1, "idempotency_key": "during"})
        assert resp.status == 503 and resp.headers["Retry-After"] == "2"
        assert "cannot reach its database" in (await resp.json())["error"]
        assert (await admin.get("/v1/hosts")).status == 503
        # a certificate that cannot be checked is not let through (checks at once share the failure)
        refused = await asyncio.gather(*(runtime.certificates.revoked("CN=governord CA", "1") for _ in range(20)),
                                       return_exceptions=True)
        assert all(isinstance(exc, Exception) and store.unavailable(exc) is not None for exc in refused), refused

        # the provider calls in flight end, their outcomes cannot be committed; the loops keep failing
        await asyncio.sleep(max(0.0, stopped + 3.0 - time.monotonic()))
        assert {name: task is not None and not task.done() for name, task in _tasks(runtime).items()} == dict.fromkeys(
            _tasks(runtime), True)
        failed = {r.getMessage().split(" failed")[0] for r in caplog.records if "store is unreachable" in r.getMessage()}
        assert {"claiming work", "delivering callbacks", "sweep", "pruning"} <= failed, failed

        await asyncio.to_thread(cluster.start)
        back = time.time()

        async def healthy() -> bool:
            return (await admin.get("/healthz")).status == 200

        await _until(healthy, 10, "/healthz says ok again")
        assert "governord_store_up 1.0" in await (await app.get("/metrics")).text()
        # the hosts interrupted mid-step finish, each with one machine
        rows = await wait_states(runtime, ids, {"ready"}, timeout=30)
        machines = [m for m in testing.MemoryProvider.worlds["mem"].values() if m.host_id]
        assert sorted(m.host_id for m in machines) == sorted(ids)
        assert sorted(r["machine_id"] for r in rows) == sorted(m.machine_id for m in machines)
        assert await runtime.store.live_count("demo") == 3
        assert await runtime.store.count_by_state() == {"ready": 3}
        # the request refused while the store was away left nothing; the one before completed
        async with runtime.store.engine.connect() as conn:
            keys = (await conn.execute(select(requests.c.idempotency_key))).scalars().all()
        assert keys == ["before"]
        # the notifier, the sweep and the retention run again
        await _until(lambda: asyncio.sleep(0, bool(receiver.deliveries)), 15, "the callback delivered")
        assert set(receiver.deliveries) == {decision.request["id"]}
        last_sweep = "governord_sweep_last_run_timestamp_seconds"
        await _until(lambda: asyncio.sleep(0, (runtime.metrics.registry.get_sample_value(last_sweep) or 0) > back),
                     10, "a sweep after the outage")
        # and the engine takes new work
        testing.MemoryProvider.faults["mem"].delay = 0.0
        after = await runtime.governor.scale("demo", "node", add=1, actor="app:demo")
        await wait_states(runtime, after.request["host_ids"], {"ready"})
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert all(task is not None and not task.done() for task in _tasks(runtime).values())
    finally:
        await runtime.stop()
        for fault_table in (testing.MemoryProvider.faults, testing.MemoryRegistrar.faults):
            fault_table.clear()
        testing.MemoryProvider.worlds.clear()
        testing.MemoryRegistrar.worlds.clear()
        testing.journal.clear()


async def test_revocation_refresh_comes_from_the_config_and_a_reload(make_runtime: Callable[..., Any]) -> None:
    runtime: Runtime = await make_runtime("\n[store]\nrevocation_refresh = 0.25\n")
    assert runtime.certificates.refresh == 0.25
    core = runtime.config.core
    store_section = core.store.model_copy(update={"revocation_refresh": 7.0})
    await runtime.reload(dataclasses.replace(runtime.config, core=core.model_copy(update={"store": store_section})))
    assert runtime.certificates.refresh == 7.0
    await runtime.stop()
