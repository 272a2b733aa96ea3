"""``python -m bench.daemon --config FILE``: governord's daemon as ``python -m governord`` runs
it, with what the benchmarks need and nothing in the product changed:

- ``--memory-plugin``: also register :mod:`governord.testing` (the in-process ``memory``
  provider and registrar types), for benchmarks that measure governord itself, not a peer;
- ``--trace-store FILE``: time every call of the store's methods (wall time, as the engine
  sees it) and write count, mean, p50, p99 and max per method to FILE (JSON) at exit;
- ``--one-hop-writes``: an experiment: the engine's fenced update and claim each run as one
  transaction on a synchronous connection in one writer thread (see :func:`one_hop_writes`);
- ``--slow-callback S``: asyncio's debug mode, logging every callback that holds the event
  loop longer than S seconds (and naming it);
- ``--switch-interval S``: the interpreter's GIL switch interval (an experiment knob);
- ``--serialize-writes``: an experiment: the engine's writes (claim, fenced update, lease
  renewal) queue behind one asyncio lock, so no two of them wait on each other inside SQLite
  (whose busy handler sleeps 1 to 100 ms between tries).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from governord import testing
from governord.config import load_config
from governord.daemon import EXIT_CONFIG, Daemon, _disabled_plugins
from governord.errors import ConfigError
from governord.logs import setup_logging
from governord.pluginmanager import PluginLoadError, PluginManager
from governord.store import Store

TIMINGS: dict[str, list[float]] = {}


def trace_store() -> None:
    """Wrap every public coroutine method of Store to record how long each call takes."""
    for name, method in list(vars(Store).items()):
        if name.startswith("_") or not inspect.iscoroutinefunction(method):
            continue

        def wrap(func: Any, label: str) -> Any:
            @functools.wraps(func)
            async def timed(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await func(*args, **kwargs)
                finally:
                    TIMINGS.setdefault(label, []).append(time.perf_counter() - started)
            return timed

        setattr(Store, name, wrap(method, name))


def serialize_writes() -> None:
    """Queue the engine's writes behind one in-process lock (see the module's doc)."""
    lock = asyncio.Lock()
    for name in ("_fenced_update", "claim_due", "renew_leases", "release_leases_of"):
        func = getattr(Store, name)

        def wrap(func: Any) -> Any:
            @functools.wraps(func)
            async def queued(*args: Any, **kwargs: Any) -> Any:
                async with lock:
                    return await func(*args, **kwargs)
            return queued

        setattr(Store, name, wrap(func))


LAGS: list[float] = []


async def watch_loop(interval: float = 0.01) -> None:
    """How late a 10 ms sleep wakes up: the event loop's lag, sampled all the time."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval)
        LAGS.append(loop.time() - started - interval)


def one_hop_writes() -> None:
    """An experiment: the engine's fenced update and claim each run as one whole transaction on
    a plain (synchronous) SQLAlchemy connection in one dedicated writer thread: one hop from the
    event loop per transaction instead of one per statement, cursor, commit and reset, and
    writes queued in-process instead of in SQLite's busy handler. Same statements, same
    transaction boundaries, same durability."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import and_, create_engine, event, insert, or_, select, update

    from governord.schema import events, hosts
    from governord.store import _ACTIVE, _sqlite_pragmas

    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
    engines: dict[int, Any] = {}

    def sync_engine(store: Store) -> Any:
        if id(store) not in engines:
            url = store.engine.url.set(drivername="sqlite")
            engine = create_engine(url)
            event.listen(engine, "connect", _sqlite_pragmas)
            engines[id(store)] = engine
        return engines[id(store)]

    class SyncConn:
        """What an ``after`` callback is given: ``await conn.execute(...)`` runs at once."""

        def __init__(self, conn: Any) -> None:
            self.conn = conn

        async def execute(self, statement: Any) -> Any:
            return self.conn.execute(statement)

    def finish(coro: Any) -> None:
        try:
            coro.send(None)
        except StopIteration:
            return
        raise RuntimeError("an after-callback really awaited something")

    def fenced_sync(store: Store, host_id: str, owner: str, values: dict[str, Any], event_kind: str | None,
                    detail: dict[str, Any] | None, release: bool, extra_where: Any) -> dict[str, Any] | None:
        now = time.time()
        values = {**values, "updated_at": now}
        if "state" in values:
            values["state_since"] = now
        if release:
            values.update(lease_owner=None, lease_expires=None)
        where = and_(hosts.c.id == host_id, hosts.c.lease_owner == owner)
        with sync_engine(store).begin() as conn:
            row = conn.execute(update(hosts).where(where).values(**values).returning(*hosts.c)).mappings().first()
            if row is None:
                return None
            if event_kind:
                conn.execute(insert(events).values(ts=now, host_id=host_id, request_id=row["request_id"],
                                                   kind=event_kind, actor="engine", detail=detail or {}))
            if extra_where is not None:
                finish(extra_where(SyncConn(conn), row))
            return dict(row)

    async def _fenced_update(self: Store, host_id: str, owner: str, values: dict[str, Any], *,
                             event_kind: str | None, detail: dict[str, Any] | None, release: bool,
                             extra_where: Any) -> dict[str, Any] | None:
        return await asyncio.get_running_loop().run_in_executor(
            writer, fenced_sync, self, host_id, owner, values, event_kind, detail, release, extra_where)

    def claim_sync(store: Store, owner: str, limit: int, lease_seconds: float) -> list[dict[str, Any]]:
        now = time.time()
        due = (select(hosts.c.id)
               .where(hosts.c.state.in_(_ACTIVE), hosts.c.next_attempt_at <= now,
                      or_(hosts.c.lease_owner.is_(None), hosts.c.lease_expires < now))
               .order_by(hosts.c.next_attempt_at, hosts.c.updated_at).limit(limit).scalar_subquery())
        stmt = (update(hosts).where(hosts.c.id.in_(due))
                .values(lease_owner=owner, lease_expires=now + lease_seconds).returning(*hosts.c))
        with sync_engine(store).begin() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    async def claim_due(self: Store, owner: str, limit: int, lease_seconds: float) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(writer, claim_sync, self, owner, limit, lease_seconds)

    Store._fenced_update = _fenced_update  # type: ignore[method-assign]
    Store.claim_due = claim_due  # type: ignore[method-assign]


def summary() -> dict[str, dict[str, float]]:
    out = {}
    for label, values in sorted(TIMINGS.items()):
        values = sorted(values)
        out[label] = {"calls": len(values), "mean_ms": 1000 * statistics.fmean(values),
                      "p50_ms": 1000 * values[len(values) // 2],
                      "p99_ms": 1000 * values[min(len(values) - 1, int(len(values) * 0.99))],
                      "max_ms": 1000 * values[-1], "total_s": sum(values)}
    if LAGS:
        lags = sorted(LAGS)
        out["event loop lag"] = {"samples": len(lags), "mean_ms": 1000 * statistics.fmean(lags),
                                 "p50_ms": 1000 * lags[len(lags) // 2],
                                 "p99_ms": 1000 * lags[int(len(lags) * 0.99)], "max_ms": 1000 * lags[-1]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.daemon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", required=True)
    parser.add_argument("--memory-plugin", action="store_true")
    parser.add_argument("--trace-store", type=Path)
    parser.add_argument("--switch-interval", type=float)
    parser.add_argument("--serialize-writes", action="store_true")
    parser.add_argument("--one-hop-writes", action="store_true")
    parser.add_argument("--slow-callback", type=float,
                        help="asyncio debug mode: log every callback that holds the loop longer than this")
    args = parser.parse_args(argv)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.serialize_writes:
        serialize_writes()
    if args.one_hop_writes:
        one_hop_writes()
    if args.trace_store:
        trace_store()
    setup_logging("info")
    try:
        plugins = PluginManager(disabled=_disabled_plugins(args.config))
        plugins.load_entry_points()
        if args.memory_plugin:
            plugins.register(testing.plugin, "testing")
        plugins.collect_types()
        config = load_config(args.config, plugins.providers, plugins.registrars,
                             unavailable=plugins.unavailable_types())
    except (ConfigError, PluginLoadError) as exc:
        print(f"governord: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.daemon.log_level)
    async def run() -> int:
        if args.trace_store:
            watcher = asyncio.create_task(watch_loop())
        if args.slow_callback:
            loop = asyncio.get_running_loop()
            loop.set_debug(True)
            loop.slow_callback_duration = args.slow_callback
        try:
            return await Daemon(args.config, plugins, config).run()
        finally:
            if args.trace_store:
                watcher.cancel()

    try:
        return asyncio.run(run())
    finally:
        if args.trace_store:
            args.trace_store.write_text(json.dumps(summary(), indent=1))


if __name__ == "__main__":
    sys.exit(main())
