"""``/metrics`` serves host counts the database keeps (the state_counts triggers): a scrape runs
no query over ``hosts``, however many there are, and the numbers are a real count's."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, text

from governord.api import admin_api, app_api
from governord.models import HostState
from governord.runtime import Runtime

from .conftest import BACKENDS, wait_states

#: every test here that makes a runtime runs on SQLite and on PostgreSQL (tests/unit/conftest.py)
STORE_BACKENDS = BACKENDS

#: a statement that reads or writes the hosts table (not state_counts' "hosts" column)
TOUCHES_HOSTS = re.compile(r"\b(FROM|JOIN|UPDATE|INTO)\s+\"?hosts\"?(\s|$|,|\))", re.IGNORECASE)


def _gauges(body: str) -> dict[str, float]:
    return {sample.labels["state"]: sample.value for family in text_string_to_metric_families(body)
            if family.name == "governord_hosts" for sample in family.samples}


async def _real_counts(runtime: Runtime) -> dict[str, int]:
    async with runtime.store.engine.connect() as conn:
        rows = await conn.execute(text("SELECT state, count(*) FROM hosts GROUP BY state"))
        return {state: n for state, n in rows}


async def test_a_scrape_reads_no_hosts_and_counts_right(runtime: Runtime, aiohttp_client: Callable[..., Any]) -> None:
    first = await runtime.governor.scale("demo", "node", add=3, actor="t")
    ready = await wait_states(runtime, first.request["host_ids"], {"ready"})
    await runtime.governor.retire(ready[0]["id"], actor="t")
    await wait_states(runtime, [ready[0]["id"]], {"gone"})
    await runtime.governor.scale("demo", "node", add=1, actor="t")  # one in flight, perhaps
    # the background work stops (the engine leaves the new host where it is), so every
    # statement seen below is the scrapes' own
    await runtime.engine.stop(0.0)
    await runtime.notifier.stop()
    await runtime.sweeper.stop()
    await runtime.pruner.stop()

    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(runtime.store.engine.sync_engine, "before_cursor_execute", record)
    try:
        admin = await aiohttp_client(admin_api.create_admin_api(runtime))
        app = await aiohttp_client(app_api.create_app_api(runtime))
        bodies = [await (await client.get("/metrics")).text() for client in (admin, app)]
        status = await (await admin.get("/v1/status")).json()
    finally:
        event.remove(runtime.store.engine.sync_engine, "before_cursor_execute", record)
    assert statements, "the scrape read the counts from the store"
    assert [s for s in statements if TOUCHES_HOSTS.search(s)] == []
    real = await _real_counts(runtime)
    assert real.get("gone") == 1 and real.get("ready", 0) >= 2
    for body in bodies:
        gauges = _gauges(body)
        assert gauges == {state.value: float(real.get(state.value, 0)) for state in HostState}
    assert status["hosts"] == real


def test_the_pattern_sees_a_scan_of_hosts() -> None:
    """The check above would catch the old GROUP BY (and not the counts' own table)."""
    assert TOUCHES_HOSTS.search("SELECT hosts.state, count(*) AS count_1 \nFROM hosts GROUP BY hosts.state")
    assert TOUCHES_HOSTS.search('SELECT * FROM "hosts"')
    assert not TOUCHES_HOSTS.search("SELECT state_counts.state, state_counts.hosts \nFROM state_counts "
                                    "\nWHERE state_counts.hosts != ?")
