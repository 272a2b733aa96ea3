"""``python -m bench.daemon --config FILE``: governord's daemon as ``python -m governord`` runs
it, with what the benchmarks need and nothing in the product changed:

- ``--memory-plugin``: also register :mod:`governord.testing` (the in-process ``memory``
  provider and registrar types), for benchmarks that measure governord itself, not a peer;
- ``--trace-store FILE``: time every call of the store's methods (wall time, as the engine
  sees it) and write count, mean, p50, p99 and max per method to FILE (JSON) at exit;
- ``--one-hop-writes``: an experiment: the engine's fenced update and claim each run as one
  transaction on a synchronous connection in one writer thread (see :class:`OneHop`);
- ``--one-hop-scale``: the same for the Governor's scale transaction (the API's scale path);
- ``--slow-callback S``: asyncio's debug mode, logging every callback that holds the event
  loop longer than S seconds (and naming it);
- ``--shared-executor``: SDK calls in asyncio's default executor, as before each instance had
  its own thread pool (for before/after numbers);
- ``--census FILE``: on SIGUSR2, a memory census (SQLite's allocations, the simulated peers'
  worlds, Python objects by type) to FILE;
- ``--park-engine``: the engine claims no work (the API measured alone);
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


def shared_executor() -> None:
    """As before the per-instance pools: every instance's SDK calls in asyncio's default
    executor (min(32, cores + 4) threads for the whole process). For before/after numbers."""
    from governord.providers import ConfiguredInstance

    ConfiguredInstance._threads = lambda self: None  # type: ignore[method-assign,assignment,return-value]


def park_engine() -> None:
    """The engine frees leases at start and stops as usual, but claims no work: what the API
    accepts stays ``requested``. For measuring the API path alone."""
    from governord.engine import Engine

    async def start(self: Engine) -> None:
        await self.store.release_leases_of(self.node + "/")

    Engine.start = start  # type: ignore[method-assign]


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


def census(path: Path) -> None:
    """On SIGUSR2, write where the daemon's memory is: SQLite's own allocations (all
    connections), the in-process memory provider's and registrar's worlds (the simulated peers,
    not governord), and the Python objects by type (count and shallow size)."""
    import ctypes
    import ctypes.util
    import gc
    import signal

    def write() -> None:
        gc.collect()
        by_type: dict[str, list[int]] = {}
        for obj in gc.get_objects():
            entry = by_type.setdefault(type(obj).__qualname__, [0, 0])
            entry[0] += 1
            entry[1] += sys.getsizeof(obj, 0)
        lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        lib.sqlite3_memory_highwater.restype = ctypes.c_int64
        worlds = {
            "memory provider machines": sum(len(w) for w in testing.MemoryProvider.worlds.values()),
            "memory registrar records": sum(len(w) for w in testing.MemoryRegistrar.worlds.values()),
            "testing journal entries": len(testing.journal),
        }
        status = {line.split(":")[0]: line.split(":")[1].strip()
                  for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(("Vm", "Rss"))}
        top = sorted(by_type.items(), key=lambda kv: kv[1][1], reverse=True)[:30]
        path.write_text(json.dumps({
            "status": status,
            "sqlite_memory_used_mb": lib.sqlite3_memory_used() / 2**20,
            "sqlite_memory_highwater_mb": lib.sqlite3_memory_highwater(0) / 2**20,
            "simulated peers": worlds,
            "gc_objects": len(gc.get_objects()),
            "top_types_by_shallow_size": {name: {"count": c, "mb": round(b / 2**20, 2)} for name, (c, b) in top},
        }, indent=1))

    signal.signal(signal.SIGUSR2, lambda *_: write())


LAGS: list[float] = []


async def watch_loop(interval: float = 0.01) -> None:
    """How late a 10 ms sleep wakes up: the event loop's lag, sampled all the time."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval)
        LAGS.append(loop.time() - started - interval)


class OneHop:
    """Experiments: whole transactions run on a plain (synchronous) SQLAlchemy connection in one
    dedicated writer thread, one hop from the event loop per transaction instead of one per
    statement, cursor, commit and pool reset; writes queue in-process instead of in SQLite's
    busy handler (which sleeps 1 to 100 ms between tries). Same statements, same transaction
    boundaries, same durability. The store's and the Governor's own async code runs unchanged
    on the writer thread: its ``await conn.execute(...)`` is answered at once by a shim, so the
    coroutine finishes in one ``send``."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self.engines: dict[int, Any] = {}

    def sync_engine(self, store: Store) -> Any:
        from sqlalchemy import create_engine, event

        from governord.store import _sqlite_pragmas

        if id(store) not in self.engines:
            engine = create_engine(store.engine.url.set(drivername="sqlite"))
            event.listen(engine, "connect", _sqlite_pragmas)
            self.engines[id(store)] = engine
        return self.engines[id(store)]

    class SyncConn:
        """An AsyncConnection look-alike over a sync connection: ``await conn.execute(...)``
        runs at once."""

        def __init__(self, conn: Any) -> None:
            self.conn = conn

        async def execute(self, statement: Any, *args: Any) -> Any:
            return self.conn.execute(statement, *args)

    @staticmethod
    def finish(coro: Any) -> Any:
        """Run a coroutine that never really suspends; return its value."""
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        coro.close()
        raise RuntimeError("a coroutine on the writer thread really awaited something")

    async def transaction(self, store: Store, body: Any) -> Any:
        """``await body(conn)`` in one transaction on the writer thread."""

        def run() -> Any:
            with self.sync_engine(store).begin() as conn:
                return self.finish(body(self.SyncConn(conn)))

        return await asyncio.get_running_loop().run_in_executor(self.writer, run)

    def patch_engine_writes(self) -> None:
        """Store._fenced_update and Store.claim_due, each in one hop."""
        original_fenced = Store._fenced_update
        original_claim = Store.claim_due
        hop = self

        class Borrowed:
            """``async with store.engine.begin() as conn`` inside the original methods, served
            by the writer thread's connection."""

            def __init__(self, conn: Any) -> None:
                self.conn = conn

            def begin(self) -> Any:
                return self

            def connect(self) -> Any:
                return self

            async def __aenter__(self) -> Any:
                return self.conn

            async def __aexit__(self, *exc: object) -> None:
                return None

        def on_writer(original: Any) -> Any:
            @functools.wraps(original)
            async def patched(self: Store, *args: Any, **kwargs: Any) -> Any:
                async def body(conn: Any) -> Any:
                    view = Store.__new__(Store)
                    view.engine = Borrowed(conn)  # type: ignore[assignment]
                    return await original(view, *args, **kwargs)

                return await hop.transaction(self, body)
            return patched

        Store._fenced_update = on_writer(original_fenced)  # type: ignore[method-assign]
        Store.claim_due = on_writer(original_claim)  # type: ignore[method-assign]

    def patch_scale(self) -> None:
        """Governor.scale's transaction in one hop (same code, same lock, same statements)."""
        from governord import callbacks
        from governord.service import Decision, Governor

        hop = self

        async def scale(self: Governor, app: str, role: str, *, add: int | None = None, count: int | None = None,
                        actor: str, idempotency_key: str | None = None, callback_url: str | None = None) -> Any:
            self._check_scale(app, role, add, count)
            self._check_callback(app, callback_url)
            params = {"role": role, "add": add, "count": count}

            async def body(conn: Any) -> Any:
                if idempotency_key is not None:
                    earlier = await self.store.find_request(conn, app, idempotency_key)
                    if earlier is not None:
                        return Decision(earlier, replayed=True)
                plan = await self.plan_scale(conn, app, role, add=add, count=count)
                request = await self.store.insert_request(
                    conn, app=app, actor=actor, idempotency_key=idempotency_key, kind="scale",
                    params=params, state=plan.decision, reason=plan.reason)
                await self._carry_out(conn, request, plan, actor)
                if callback_url is not None:
                    await callbacks.enqueue(conn, request_id=request["id"], app=app, url=callback_url)
                return Decision(request)

            async with self._lock(app):
                decision = await hop.transaction(self.store, body)
            if not decision.replayed:
                self.engine.wake()
            return decision

        Governor.scale = scale  # type: ignore[method-assign]


def census(path: Path) -> None:
    """On SIGUSR2, write where the daemon's memory is: SQLite's own allocations (all
    connections), the in-process memory provider's and registrar's worlds (the simulated peers,
    not governord), and the Python objects by type (count and shallow size)."""
    import ctypes
    import ctypes.util
    import gc
    import signal

    def write() -> None:
        gc.collect()
        by_type: dict[str, list[int]] = {}
        for obj in gc.get_objects():
            entry = by_type.setdefault(type(obj).__qualname__, [0, 0])
            entry[0] += 1
            entry[1] += sys.getsizeof(obj, 0)
        lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        lib.sqlite3_memory_highwater.restype = ctypes.c_int64
        worlds = {
            "memory provider machines": sum(len(w) for w in testing.MemoryProvider.worlds.values()),
            "memory registrar records": sum(len(w) for w in testing.MemoryRegistrar.worlds.values()),
            "testing journal entries": len(testing.journal),
        }
        status = {line.split(":")[0]: line.split(":")[1].strip()
                  for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(("Vm", "Rss"))}
        top = sorted(by_type.items(), key=lambda kv: kv[1][1], reverse=True)[:30]
        path.write_text(json.dumps({
            "status": status,
            "sqlite_memory_used_mb": lib.sqlite3_memory_used() / 2**20,
            "sqlite_memory_highwater_mb": lib.sqlite3_memory_highwater(0) / 2**20,
            "simulated peers": worlds,
            "gc_objects": len(gc.get_objects()),
            "top_types_by_shallow_size": {name: {"count": c, "mb": round(b / 2**20, 2)} for name, (c, b) in top},
        }, indent=1))

    signal.signal(signal.SIGUSR2, lambda *_: write())


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
    parser.add_argument("--one-hop-scale", action="store_true")
    parser.add_argument("--shared-executor", action="store_true",
                        help="SDK calls in asyncio's shared default executor, as before the per-instance pools")
    parser.add_argument("--census", type=Path, help="on SIGUSR2, write a memory census (JSON) here")
    parser.add_argument("--park-engine", action="store_true",
                        help="start no engine loop: accepted hosts stay requested (measures the API alone)")
    parser.add_argument("--slow-callback", type=float,
                        help="asyncio debug mode: log every callback that holds the loop longer than this")
    args = parser.parse_args(argv)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.shared_executor:
        shared_executor()
    if args.census:
        census(args.census)
    if args.park_engine:
        park_engine()
    if args.serialize_writes:
        serialize_writes()
    if args.one_hop_writes or args.one_hop_scale:
        hop = OneHop()
        if args.one_hop_writes:
            hop.patch_engine_writes()
        if args.one_hop_scale:
            hop.patch_scale()
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
