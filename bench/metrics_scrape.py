"""What the leader's ``/metrics`` reads cost: the live hosts grouped by application, role,
provider and state (``Store.count_live_hosts``) and the pending requests by application
(``Store.pending_by_app``), on SQLite and on PostgreSQL.

    .venv/bin/python -m bench.metrics_scrape [--live 1000,10000] [--gone 10000] [--rounds 100]

For each size N, a fresh store (a SQLite file; a database of a private PostgreSQL cluster,
lab/postgres.py) holds N live hosts (20 applications, 3 providers, mostly ready) beside ``--gone``
gone ones and 1,000 requests (10 pending). Printed: milliseconds per read, median and 95th
percentile over ``--rounds`` reads, through the async engine the daemon reads with, and the
query plan of the hosts' read (it should walk the partial index of live hosts, never the gone).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import insert, text

from governord.store import Store
from governord.store.schema import hosts, requests
from lab.postgres import start_cluster

STATES = ["ready"] * 8 + ["provisioning", "failed"]


def _stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]


async def _fill(store: Store, live: int, gone: int) -> None:
    rng = random.Random(1)
    rows = [{"id": str(uuid.uuid4()), "name": f"h{i}", "fqdn": f"h{i}", "app": f"app{i % 20}", "role": "node",
             "origin": "provisioned", "state": "gone" if i < gone else rng.choice(STATES), "provider": f"p{i % 3}",
             "tags": [], "addresses": [], "classification": {}, "registrations": {}, "profile": {},
             "created_at": 0.0, "updated_at": 0.0} for i in range(gone + live)]
    asks = [{"id": str(uuid.uuid4()), "app": f"app{i % 20}", "actor": "bench", "kind": "scale", "params": {},
             "state": "pending" if i < 10 else "accepted", "host_ids": [], "created_at": float(i),
             "updated_at": float(i)} for i in range(1000)]
    async with store.engine.begin() as conn:
        await conn.execute(insert(hosts), rows)
        await conn.execute(insert(requests), asks)
    if store.engine.dialect.name == "postgresql":
        async with store.engine.begin() as conn:
            await conn.execute(text("ANALYZE"))


async def _measure(store: Store, rounds: int) -> tuple[tuple[float, float], tuple[float, float], str]:
    async with store.engine.connect() as conn:
        explain = "EXPLAIN QUERY PLAN" if store.engine.dialect.name == "sqlite" else "EXPLAIN"
        plan = await conn.execute(text(f"{explain} SELECT app, role, provider, state, count(*) FROM hosts "
                                       "WHERE state != 'gone' GROUP BY app, role, provider, state"))
        shown = "; ".join(str(row[-1]).strip() for row in plan)
    counts, pending = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        await store.count_live_hosts()
        counts.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        await store.pending_by_app()
        pending.append((time.perf_counter() - started) * 1000)
    return _stats(counts), _stats(pending), shown


async def _run(url: str, live: int, gone: int, rounds: int) -> None:
    store = await Store.open(url)
    try:
        await _fill(store, live, gone)
        (c50, c95), (p50, p95), plan = await _measure(store, rounds)
    finally:
        await store.close()
    print(f"{store.engine.dialect.name:10} live={live:6} gone={gone:6}  hosts {c50:6.2f} / {c95:6.2f} ms"
          f"  pending {p50:5.2f} / {p95:5.2f} ms  plan: {plan}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", default="1000,10000")
    parser.add_argument("--gone", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    sizes = [int(n) for n in args.live.split(",")]
    work = Path(tempfile.mkdtemp(prefix="governord-bench-metrics-"))
    work.chmod(0o711)  # the cluster may run as user postgres
    cluster = start_cluster(work / "pg")
    try:
        for n, live in enumerate(sizes):
            asyncio.run(_run(f"sqlite:///{work}/store-{n}.db", live, args.gone, args.rounds))
            url = cluster.create_database(f"bench{n}", owner="bench", password="bench-password")
            asyncio.run(_run(url, live, args.gone, args.rounds))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
