"""``python -m bench.daemon --config FILE``: governord's daemon as ``python -m governord`` runs
it, with what the benchmarks need and nothing in the product changed:

- ``--memory-plugin``: also register :mod:`governord.testing` (the in-process ``memory``
  provider and registrar types), for benchmarks that measure governord itself, not a peer;
- ``--trace-store FILE``: time every call of the store's methods (wall time, as the engine
  sees it) and write count, mean, p50, p99 and max per method to FILE (JSON) at exit;
- ``--slow-callback S``: asyncio's debug mode, logging every callback that holds the event
  loop longer than S seconds (and naming it);
- ``--shared-executor``: SDK calls in asyncio's default executor, as before each instance had
  its own thread pool (for before/after numbers);
- ``--census FILE``: on SIGUSR2, a memory census (SQLite's allocations, the simulated peers'
  worlds, Python objects by type) to FILE;
- ``--park-engine``: the engine claims no work (the API measured alone);
- ``--switch-interval S``: the interpreter's GIL switch interval (an experiment knob);
- ``--memory-delay S``: every call of the memory provider and registrars waits S seconds first
  (steps that take time, for the takeover benchmark).

(The experiments ``--one-hop-writes`` and ``--serialize-writes`` of the first measurements are
gone: the store now commits the engine's writes from one writer thread, in groups, and decisions
take turns with it; see RESULTS.md.)
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
from governord.dispatch.pluginmanager import PluginLoadError, PluginManager
from governord.errors import ConfigError
from governord.logs import setup_logging
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
    """The engine starts and stops as usual, but claims no work: what the API accepts stays
    ``requested``. For measuring the API path alone."""
    from governord.engine import Engine

    async def start(self: Engine) -> None:
        return None

    Engine.start = start  # type: ignore[method-assign]


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


def memory_delay(seconds: float) -> None:
    """Every instance of the memory provider and registrars waits ``seconds`` in each call."""
    for kind in (testing.MemoryProvider, testing.MemoryRegistrar):
        original = kind.fault.fget  # type: ignore[attr-defined]

        def fault(self: Any, original: Any = original) -> testing.Faults:
            faults: testing.Faults = original(self)
            faults.delay = seconds
            return faults

        kind.fault = property(fault)  # type: ignore[assignment,method-assign]


LAGS: list[float] = []


async def watch_loop(interval: float = 0.01) -> None:
    """How late a 10 ms sleep wakes up: the event loop's lag, sampled all the time."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval)
        LAGS.append(loop.time() - started - interval)


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
    parser.add_argument("--shared-executor", action="store_true",
                        help="SDK calls in asyncio's shared default executor, as before the per-instance pools")
    parser.add_argument("--census", type=Path, help="on SIGUSR2, write a memory census (JSON) here")
    parser.add_argument("--park-engine", action="store_true",
                        help="start no engine loop: accepted hosts stay requested (measures the API alone)")
    parser.add_argument("--memory-delay", type=float,
                        help="the memory provider's and registrars' calls each wait this many seconds first")
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
    if args.trace_store:
        trace_store()
    if args.memory_delay:
        memory_delay(args.memory_delay)
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
