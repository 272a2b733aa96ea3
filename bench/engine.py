"""Engine throughput: full lifecycles (provision, register, retire) of N hosts against the
in-process zero-latency provider and registrar (governord.testing), on SQLite in a temp dir,
or on PostgreSQL with one or more instances.

    .venv/bin/python -m bench.engine --hosts 1000 [--workers 64]
    .venv/bin/python -m bench.engine --hosts 1000 --store postgres --instances 3

Prints hosts per second for the scale-up (requested -> ready) and the retirement (-> gone),
and the daemon's peak RSS. Results are recorded in bench/RESULTS.md.

On PostgreSQL (a private cluster, lab/postgres.py, in a temp dir), each instance is a process
of its own, as in production: a Runtime (store, engine, fleet heartbeat) on the one database,
each with its own ``[fleet] instance`` name and ``--workers``. The first instance makes the scale
requests; all of them claim and run the steps. Times come from the database's own audit events
(the newest ``ready``, the newest ``gone``), read by this process, which polls the host counts
every 0.2 s and takes no part otherwise. The memory provider and registrar keep their worlds in
each process: a step taken over by another instance finds nothing there and moves on, as it
would after the machine vanished; the lifecycle still runs every step. CPU is reported per
instance and for PostgreSQL (postmaster and backends).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from governord import testing
from governord.config import build_config
from governord.dispatch.pluginmanager import PluginManager
from governord.runtime import Runtime

from .common import DAEMON_CONFIG, PrivatePostgres, drop_state_count_triggers, process_tree_cpu_seconds, query
from .record import append_row, machine_label


def cpu_seconds() -> float:
    """CPU time of this process, all threads: steadier than wall time on a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Arrivals:
    """Counts hosts arriving in a state, from the engine's own transition callbacks (polling
    the database would load the very store being measured)."""

    def __init__(self, runtime: Runtime) -> None:
        self.counts: dict[str, int] = {}
        self.changed = asyncio.Event()
        runtime.engine.on_transition.append(self._seen)

    def _seen(self, row: dict[str, object], _before: str) -> None:
        state = str(row["state"])
        self.counts[state] = self.counts.get(state, 0) + 1
        self.changed.set()

    async def wait(self, state: str, total: int) -> None:
        while self.counts.get(state, 0) < total:
            self.changed.clear()
            await self.changed.wait()


async def run(hosts: int, workers: int, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        plugins = PluginManager()
        plugins.register(testing.plugin, "testing")
        plugins.collect_types()
        # the API and memory benchmarks' daemon; its listeners are configured but not started here
        raw = tomllib.loads(DAEMON_CONFIG.format(home=tmp, log_level="warning", workers=workers, max_hosts=hosts))
        config = build_config("bench.toml", raw, plugins.providers, plugins.registrars, unavailable={})
        runtime = await Runtime.open(config, plugins)
        await runtime.start()
        arrivals = Arrivals(runtime)
        try:
            cpu_before = cpu_seconds()
            started = time.perf_counter()
            for _ in range(0, hosts, batch):
                await runtime.governor.scale("bench", "node", add=min(batch, hosts), actor="bench")
            accepted = time.perf_counter()
            await arrivals.wait("ready", hosts)
            ready = time.perf_counter()
            await runtime.governor.scale("bench", "node", count=0, actor="bench")
            await arrivals.wait("gone", hosts)
            counts = await runtime.store.count_by_state()
            assert counts == {"gone": hosts}, counts  # every host really went the whole way
            gone = time.perf_counter()
        finally:
            await runtime.stop()
    return {
        "hosts": hosts,
        "accept_s": accepted - started,
        "up_s": ready - started,
        "down_s": gone - ready,
        "total_s": gone - started,
        "lifecycles_per_s": hosts / (gone - started),
        "cpu_s": cpu_seconds() - cpu_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def instance_process(index: int, home: str, url: str, hosts: int, workers: int, batch: int,
                     commands: Any, replies: Any) -> None:
    """One governord instance on the shared database: a Runtime in a process of its own, told
    what to do through ``commands`` ("scale-up", "retire" for the first; "stop" for all)."""
    asyncio.run(_instance(index, Path(home), url, hosts, workers, batch, commands, replies))


async def _instance(index: int, home: Path, url: str, hosts: int, workers: int, batch: int,
                    commands: Any, replies: Any) -> None:
    plugins = PluginManager()
    plugins.register(testing.plugin, "testing")
    plugins.collect_types()
    sections, env = PrivatePostgres.store_sections(url, f"bench-{index + 1}")
    os.environ.update(env)
    text = DAEMON_CONFIG.format(home=home, log_level="warning", workers=workers, max_hosts=hosts) + sections
    config = build_config("bench.toml", tomllib.loads(text), plugins.providers, plugins.registrars, unavailable={})
    runtime = await Runtime.open(config, plugins)
    await runtime.start()
    transitions = [0]  # the transitions this instance committed (its share of the work)

    def seen(_row: dict[str, object], _before: str) -> None:
        transitions[0] += 1

    runtime.engine.on_transition.append(seen)
    replies.put(("ready", index, None))
    loop = asyncio.get_running_loop()
    cpu_before = cpu_seconds()
    try:
        while True:
            command = await loop.run_in_executor(None, commands.get)
            if command == "scale-up":
                cpu_before = cpu_seconds()
                for _ in range(0, hosts, batch):
                    await runtime.governor.scale("bench", "node", add=min(batch, hosts), actor="bench")
                replies.put(("accepted", index, time.time()))
            elif command == "retire":
                await runtime.governor.scale("bench", "node", count=0, actor="bench")
                replies.put(("retired", index, time.time()))
            elif command == "stop":
                break
    finally:
        cpu = cpu_seconds() - cpu_before
        await runtime.stop()
        replies.put(("stopped", index, {"cpu_s": cpu, "transitions": transitions[0],
                                        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def reply(replies: Any, processes: list[Any], timeout: float) -> tuple[str, int, Any]:
    """The next message of an instance; raises at once if one of them died."""
    import queue

    deadline = time.monotonic() + timeout
    while True:
        try:
            return replies.get(timeout=1.0)  # type: ignore[no-any-return]
        except queue.Empty:
            dead = [p.name for p in processes if not p.is_alive()]
            if dead:
                raise RuntimeError(f"an instance died: {dead} (its error is above)") from None
            if time.monotonic() > deadline:
                raise


def wait_for(url: str, state: str, hosts: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        counts = dict(query(url, "SELECT state, count(*) FROM hosts GROUP BY state"))
        if counts.get(state, 0) >= hosts:
            return
        if counts.get("failed"):
            raise RuntimeError(f"hosts failed: {counts}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {hosts} {state}: {counts}")
        time.sleep(0.2)


class LockWaits:
    """Samples, every 0.25 s while the benchmark runs, the database's sessions that wait for a
    lock and the lock they wait for (a row lock queues behind the holder's transaction, further
    waiters on the row's tuple lock, which names the table). What the instances wait for when
    they wait in PostgreSQL rather than on the CPU."""

    SQL = ("SELECT coalesce(c.relname, l.locktype), count(*) FROM pg_locks l "
           "LEFT JOIN pg_class c ON c.oid = l.relation WHERE NOT l.granted GROUP BY 1")

    def __init__(self, url: str) -> None:
        import threading

        self.url = url
        self.samples = 0
        self.waiting: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.samples += 1
            for what, count in query(self.url, self.SQL):
                self.waiting[what] = self.waiting.get(what, 0) + int(count)

    def stop(self) -> dict[str, float]:
        """Mean sessions waiting, per lock kind or table."""
        self._stop.set()
        self._thread.join()
        return {what: round(count / max(1, self.samples), 2) for what, count in sorted(self.waiting.items())}


def run_fleet(hosts: int, workers: int, batch: int, instances: int, timeout: float,
              drop_state_count_trigger: bool = False) -> dict[str, Any]:
    """The lifecycles on PostgreSQL, ``instances`` processes sharing one database."""
    context = multiprocessing.get_context("spawn")
    with PrivatePostgres() as pg, tempfile.TemporaryDirectory(prefix="governord-bench-engine-") as tmp:
        url = pg.new_database()
        replies = context.Queue()
        commands = [context.Queue() for _ in range(instances)]
        processes = []
        try:
            for index in range(instances):
                home = Path(tmp) / f"bench-{index + 1}"
                home.mkdir()
                process = context.Process(target=instance_process, args=(
                    index, str(home), url, hosts, workers, batch, commands[index], replies))
                process.start()
                processes.append(process)
                if index == 0:  # the first migrates the database alone
                    assert reply(replies, processes, 120)[0] == "ready"
            for _ in range(instances - 1):
                assert reply(replies, processes, 120)[0] == "ready"
            if drop_state_count_trigger:
                drop_state_count_triggers(url)
            pg_cpu_before = process_tree_cpu_seconds(pg.cluster.process.pid)
            waits = LockWaits(url)
            commits_sql = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
            commits_before = int(query(url, commits_sql)[0][0])
            started = time.time()
            commands[0].put("scale-up")
            kind, _, accepted = reply(replies, processes, timeout)
            assert kind == "accepted", kind
            wait_for(url, "ready", hosts, timeout)
            ready = float(query(url, "SELECT max(ts) FROM events WHERE kind = 'ready'")[0][0])
            released = time.time()
            commands[0].put("retire")
            assert reply(replies, processes, timeout)[0] == "retired"
            wait_for(url, "gone", hosts, timeout)
            gone = float(query(url, "SELECT max(ts) FROM events WHERE kind = 'gone'")[0][0])
            pg_cpu = process_tree_cpu_seconds(pg.cluster.process.pid) - pg_cpu_before
            lock_waits = waits.stop()
            time.sleep(0.6)  # the statistics collector's reports arrive after at most 0.5 s
            transactions = int(query(url, commits_sql)[0][0]) - commits_before
            counts = dict(query(url, "SELECT state, count(*) FROM hosts GROUP BY state"))
            assert counts == {"gone": hosts}, counts  # every host really went the whole way
        finally:
            for queue in commands:
                queue.put("stop")
            stopped = {}
            for _ in processes:
                try:
                    kind, index, detail = reply(replies, processes, 120)
                except Exception:  # noqa: BLE001 - a process that died says nothing more
                    break
                if kind == "stopped":
                    stopped[index] = detail
            for process in processes:
                process.join(60)
                if process.is_alive():
                    process.kill()
    total = gone - started
    return {
        "hosts": hosts,
        "instances": instances,
        "accept_s": accepted - started,
        "up_s": ready - started,
        "down_s": gone - released,
        "total_s": total,
        "lifecycles_per_s": hosts / total,
        "cpu_s": sum(d["cpu_s"] for d in stopped.values()),
        "cpu_s_per_instance": [round(stopped[i]["cpu_s"], 1) for i in sorted(stopped)],
        "postgres_cpu_s": pg_cpu,
        "sessions_waiting_for_locks": lock_waits,
        # every transaction of the database meanwhile (this process's polls included, about 5/s)
        "transactions_per_lifecycle": transactions / hosts,
        "transitions_by_instance": [stopped[i]["transitions"] for i in sorted(stopped)],
        "peak_rss_mb": max(d["peak_rss_mb"] for d in stopped.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=64, help="[engine] workers of each instance")
    parser.add_argument("--batch", type=int, default=100, help="hosts per scale request")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--instances", type=int, default=1,
                        help="instances (processes) on the one database (PostgreSQL only)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds each phase may take")
    parser.add_argument("--drop-state-count-triggers", "--drop-state-count-trigger", action="store_true",
                        dest="drop_state_count_trigger",
                        help="experiment (PostgreSQL): drop the triggers that keep state_counts on every state "
                             "change, to measure what their hot rows cost (metrics then count wrong)")
    parser.add_argument("--record", action="store_true", help="append a row to bench/RESULTS.md")
    parser.add_argument("--note", default="", help="a note for the recorded row")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    if args.store == "sqlite":
        if args.instances != 1:
            parser.error("--instances: SQLite has one instance; use --store postgres")
        result: dict[str, Any] = asyncio.run(run(args.hosts, args.workers, args.batch))
    else:
        result = run_fleet(args.hosts, args.workers, args.batch, args.instances, args.timeout,
                           args.drop_state_count_trigger)
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={json.dumps(v, separators=(',', ':'))}"
                   for k, v in result.items()))
    if args.record:
        cpu = " + ".join(f"{c:.1f}" for c in result.get("cpu_s_per_instance", [result["cpu_s"]]))
        append_row("engine-fleet", [
            time.strftime("%Y-%m-%d"), machine_label(), args.store, str(args.instances), f"{args.hosts:,}",
            f"{result['accept_s']:.2f}", f"{result['up_s']:.1f}", f"{result['down_s']:.1f}", f"{result['total_s']:.1f}",
            f"{result['lifecycles_per_s']:.0f}", cpu, f"{result.get('postgres_cpu_s', 0.0):.1f}", f"{load:.1f}",
            args.note,
        ])


if __name__ == "__main__":
    main()
