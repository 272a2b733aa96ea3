"""What keeping the revoked certificates fresh costs on PostgreSQL (``[store] revocation_refresh``).

    .venv/bin/python -m bench.revocations [--sizes 0,100,1000,10000] [--rounds 300]

For each size N, a database (on a private cluster, lab/postgres.py) holds N revoked certificates
governord issued and N revoked site-CA certificates (and as many certificates not revoked).
Measured, in milliseconds per call, median and 95th percentile over ``--rounds`` calls on the
async engine the daemon reads through:

- ``reread``: what a refresh does, reading the revoked pairs afresh (two queries);
- ``version``: the alternative, a query for a "version" of the set (the counts and the newest
  ``revoked_at`` of both tables), which would let an unchanged set go unread;
- ``check``: ``CertificateStore.revoked`` while its copy is fresh, the path of every request
  but one a refresh (microseconds: no database involved).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, insert, select

from governord.store import CertificateStore, Store
from governord.store.schema import app_certificates, site_revocations
from lab.postgres import start_cluster

ISSUER = "CN=governord CA"
SITE = "CN=Site CA,O=Example"


def _stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]


async def measure(url: str, size: int, rounds: int) -> dict[str, tuple[float, float]]:
    store = await Store.open(url, pool_size=2)
    try:
        now = time.time()
        async with store.transaction() as conn:
            if size:
                await conn.execute(insert(app_certificates), [
                    {"serial": format(i, "x"), "app": "bench", "common_name": "bench", "issued_at": now,
                     "not_after": now + 86400, "issuer": ISSUER,
                     "revoked_at": now if i % 2 else None, "revoked_by": "bench" if i % 2 else None}
                    for i in range(2 * size)])
                await conn.execute(insert(site_revocations), [
                    {"issuer": SITE, "serial": format(i, "x"), "app": "bench", "revoked_at": now, "revoked_by": "bench"}
                    for i in range(size)])
        certificates = CertificateStore(store, refresh=3600.0)
        revoked = app_certificates.c.revoked_at.is_not(None)
        version = select(
            select(func.count()).select_from(app_certificates).where(revoked).scalar_subquery(),
            select(func.max(app_certificates.c.revoked_at)).scalar_subquery(),
            select(func.count()).select_from(site_revocations).scalar_subquery(),
            select(func.max(site_revocations.c.revoked_at)).scalar_subquery())
        timings: dict[str, list[float]] = {"reread": [], "version": [], "check": []}
        for _ in range(rounds):
            began = time.perf_counter()
            await certificates._read(time.monotonic() + 7200.0)  # too late for the copy: always reads
            timings["reread"].append(time.perf_counter() - began)
            began = time.perf_counter()
            async with store.engine.connect() as conn:
                (await conn.execute(version)).one()
            timings["version"].append(time.perf_counter() - began)
        assert await certificates.revoked(SITE, "1") == (size > 1)
        for _ in range(rounds):
            began = time.perf_counter()
            await certificates.revoked(ISSUER, "1")
            timings["check"].append(time.perf_counter() - began)
        return {name: _stats([t * 1000 for t in samples]) for name, samples in timings.items()}
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0,100,1000,10000", help="revoked certificates of each kind, comma-separated")
    parser.add_argument("--rounds", type=int, default=300, help="calls measured of each kind, per size")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="governord-bench-pg-"))
    directory.chmod(0o711)
    cluster = start_cluster(directory / "cluster")
    try:
        print("| revoked (each kind) | reread ms (median / p95) | version ms (median / p95) | check µs (median / p95) |")
        print("|---|---|---|---|")
        for n, size in enumerate(int(s) for s in args.sizes.split(",")):
            url = cluster.create_database(f"bench_{n}", owner="bench", password="bench-only")
            result = asyncio.run(measure(url, size, args.rounds))
            reread, version, check = result["reread"], result["version"], result["check"]
            print(f"| {size:,} | {reread[0]:.2f} / {reread[1]:.2f} | {version[0]:.2f} / {version[1]:.2f} "
                  f"| {check[0] * 1000:.1f} / {check[1] * 1000:.1f} |")
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
