"""Applications' API throughput: authenticated scale requests accepted per second, and their
latency, over mTLS with keep-alive, from separate load processes.

    .venv/bin/python -m bench.api --duration 20 --processes 2 --connections 32 [--record]

The request: ``POST /v1/scale {"role": "node", "add": 1, "idempotency_key": <unique>}`` by the
application ``bench`` with its own client certificate (issued by governord's CA through the
admin API, as ``governord-ctl apps register`` does), against a cap of a million hosts, so every
request is accepted: persisted with its key, decided by the rules, one host inserted, the engine
woken. It is the one request that does everything the API path does, and the one an
application sends most.

The engine runs, on governord's in-process ``memory`` provider and registrar
(``governord.testing``): every accepted host is really provisioned and registered in the
background, so the API competes with the engine for the daemon's one event loop as it would in
production, but no peer (vcsim would take one of the two cores) sits in the measurement.

Each load process keeps ``--connections`` TLS connections open (keep-alive) and sends on each
as soon as the previous answer arrived (closed loop). The numbers are taken over
``--duration`` seconds after ``--warmup`` seconds. Afterwards the daemon's own database is
checked: as many requests as answered 202 were recorded, each with one host.

``--apps N``: N applications send, each with its own certificate, over the connections in turn
(their decisions need not take turns with each other's).

``--store postgres --instances N``: N daemons (``[fleet] instance`` bench-1 ... bench-N, each its
own process, state directory and port) on one private PostgreSQL database (lab/postgres.py).
The first makes the CA and issues the application's certificate; its ``pki`` directory is
copied to the others before they start (how an operator shares the CA among instances). Each
load process spreads its connections over the instances in turn, as a load balancer in front
of them would. CPU is reported per daemon, for PostgreSQL (postmaster and backends) and for the
load processes, all over the measured seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from .common import (
    DAEMON_CONFIG,
    PrivatePostgres,
    admin,
    cpu_seconds,
    drop_state_count_triggers,
    process_tree_cpu_seconds,
    query,
    rss_mb,
    start_daemon,
)
from .record import append_row, machine_label


def load_process(url: list[str], cert: list[dict[str, str]], connections: int, warmup: float, duration: float,
                 start_at: float, queue: Any, kind: str = "scale") -> None:
    """One load process: ``connections`` closed loops of requests; puts its results."""
    asyncio.run(_load(url, cert, connections, warmup, duration, start_at, queue, kind))


async def _load(urls: list[str], certs: list[dict[str, str]], connections: int, warmup: float, duration: float,
                start_at: float, queue: Any, kind: str) -> None:
    """Connection ``i`` goes to instance ``i mod instances`` as application ``(i div instances)
    mod applications``: every instance gets every application's requests."""
    sessions = []
    for cert in certs:
        context = ssl.create_default_context(cafile=cert["ca"])
        context.load_cert_chain(cert["certificate"], cert["key"])
        connector = aiohttp.TCPConnector(ssl=context, limit=connections, force_close=False)
        sessions.append(aiohttp.ClientSession(connector=connector))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    measure_from = start_at + warmup
    measure_to = measure_from + duration
    prefix = uuid.uuid4().hex[:12]
    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))

        async def loop(index: int) -> None:
            url = urls[index % len(urls)]
            session = sessions[(index // len(urls)) % len(sessions)]
            seq = 0
            while True:
                now = time.time()
                if now >= measure_to:
                    return
                seq += 1
                body = {"role": "node", "add": 1, "idempotency_key": f"{prefix}-{index}-{seq}"}
                sent = time.perf_counter()
                try:
                    async with (session.post(url, json=body) if kind == "scale" else session.get(url)) as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, OSError) as exc:
                    errors.append(repr(exc))
                    status = 0
                took = time.perf_counter() - sent
                if now >= measure_from:
                    statuses[status] = statuses.get(status, 0) + 1
                    latencies.append(took)

        async def cpu_while_measured() -> float:
            await asyncio.sleep(max(0.0, measure_from - time.time()))
            before = time.process_time()
            await asyncio.sleep(max(0.0, measure_to - time.time()))
            return time.process_time() - before

        *_, cpu = await asyncio.gather(*(loop(i) for i in range(connections)), cpu_while_measured())
    finally:
        for session in sessions:
            await session.close()
    queue.put({"latencies": latencies, "statuses": statuses, "errors": errors[:5], "cpu_s": cpu})


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def prepare(daemon: Any, app: str = "bench") -> dict[str, str]:
    """An application's certificate, key and CA, written beside the daemon's config (the
    admin API hands the key out once; governord keeps no copy)."""
    issued = await admin(daemon, "POST", f"/v1/apps/{app}/certificate")
    files = {"ca": daemon.config.parent / f"{app}-ca.pem", "certificate": daemon.config.parent / f"{app}.pem",
             "key": daemon.config.parent / f"{app}.key"}
    for name, path in files.items():
        path.write_text(issued[f"{name}_pem"])
    files["key"].chmod(0o600)
    return {name: str(path) for name, path in files.items()}


#: the further applications of --apps, like ``bench`` in DAEMON_CONFIG
MORE_APPS = """
[applications.{app}]
max_hosts = 1000000

[applications.{app}.rate_limit]
requests_per_second = 100000.0
burst = 100000

[applications.{app}.roles.node]
tags = ["node"]
provider = "mem"
name_pattern = "{app}-{{seq:07d}}"
domain = "bench.example"
profile = {{ size = "small" }}
"""


def apps(count: int) -> list[str]:
    return ["bench", *(f"bench{number}" for number in range(2, count + 1))]


def check_database(database: str | Path) -> tuple[int, int]:
    """(scale requests recorded, hosts recorded) in the daemons' database."""
    requests = query(database, "SELECT count(*) FROM requests WHERE kind = 'scale' AND state = 'accepted'")[0][0]
    hosts = query(database, "SELECT count(*) FROM hosts")[0][0]
    return int(requests), int(hosts)


def run(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    if args.store == "postgres":
        with PrivatePostgres() as pg:
            return run_on(args, home, pg.new_database(), pg.cluster.process.pid)
    return run_on(args, home, None, None)


def run_on(args: argparse.Namespace, home: Path, url: str | None, postgres_pid: int | None) -> dict[str, Any]:
    """The benchmark against ``args.instances`` daemons on the database of ``url`` (None: one
    daemon on SQLite in its state directory)."""
    daemon_args = ["--memory-plugin"]
    if args.trace_store:
        daemon_args.append(f"--trace-store={args.trace_store}")
    daemon_args += args.daemon_arg
    daemons: list[Any] = []
    try:
        for index in range(args.instances):
            directory = home if url is None else home / f"bench-{index + 1}"
            directory.mkdir(parents=True, exist_ok=True)
            config = directory / "governord.toml"
            text = DAEMON_CONFIG.format(home=directory, workers=args.workers, log_level=args.log_level,
                                        max_hosts=1000000) + "".join(
                MORE_APPS.format(app=f"bench{number}") for number in range(2, args.apps + 1))
            env: dict[str, str] = {}
            if url is not None:
                sections, env = PrivatePostgres.store_sections(url, f"bench-{index + 1}")
                text += sections
            config.write_text(text)
            if index > 0:  # the first instance's CA, shared
                shutil.copytree(daemons[0].state_dir / "pki", directory / "state" / "pki")
            daemons.append(start_daemon(config, module="bench.daemon", args=daemon_args, env=env))
            if index == 0 and url is not None and args.drop_state_count_triggers:
                drop_state_count_triggers(url)
            if index == 0:
                certs = [asyncio.run(prepare(daemons[0], app)) for app in apps(args.apps)]
        daemon = daemons[0]
        path = {"scale": "/v1/scale", "health": "/healthz"}[args.request]
        urls = [f"https://localhost:{d.api_port}{path}" for d in daemons]
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        start_at = time.time() + 3.0  # the load processes start (imports) meanwhile
        workers = [
            context.Process(target=load_process,
                            args=(urls, certs, args.connections, args.warmup, args.duration, start_at, queue,
                                  args.request))
            for _ in range(args.processes)
        ]
        for worker in workers:
            worker.start()
        time.sleep(max(0.0, start_at + args.warmup - time.time()))
        load_before = os.getloadavg()[0]
        cpu_before = [cpu_seconds(d.process.pid) for d in daemons]
        pg_before = process_tree_cpu_seconds(postgres_pid) if postgres_pid else 0.0
        spy = None
        if args.profile:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--gil", "--pid", str(daemon.process.pid),
                 "--duration", str(int(args.duration)), "--rate", "100", "--format", "raw",
                 "--output", str(args.profile)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(args.duration)
        cpu_used = [cpu_seconds(d.process.pid) - before for d, before in zip(daemons, cpu_before, strict=True)]
        pg_used = process_tree_cpu_seconds(postgres_pid) - pg_before if postgres_pid else 0.0
        results = [queue.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(30)
        if spy is not None:
            spy.wait(60)
        rss_now, rss_peak = rss_mb(daemon.process.pid)
        recorded_requests, recorded_hosts = check_database(url or home / "state" / "governord.db")
    finally:
        codes = [d.stop(timeout=120) for d in daemons]
    latencies = [x for r in results for x in r["latencies"]]
    statuses: dict[int, int] = {}
    for r in results:
        for status, count in r["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    errors = [e for r in results for e in r["errors"]]
    accepted = statuses.get(202 if args.request == "scale" else 200, 0)
    return {
        "duration_s": args.duration,
        "processes": args.processes,
        "connections": args.processes * args.connections,
        "requests": len(latencies),
        "accepted": accepted,
        "accepted_per_s": accepted / args.duration,
        "statuses": statuses,
        "p50_ms": 1000 * percentile(latencies, 0.50) if latencies else None,
        "p90_ms": 1000 * percentile(latencies, 0.90) if latencies else None,
        "p99_ms": 1000 * percentile(latencies, 0.99) if latencies else None,
        "mean_ms": 1000 * statistics.fmean(latencies) if latencies else None,
        "store": args.store,
        "instances": args.instances,
        "daemon_cpu_percent": 100 * sum(cpu_used) / args.duration,
        "daemon_cpu_percent_each": [round(100 * c / args.duration) for c in cpu_used],
        "postgres_cpu_percent": 100 * pg_used / args.duration,
        "load_average_before": load_before,
        # the load processes share the machine: what they take, the daemon cannot have
        "load_cpu_percent": 100 * sum(r["cpu_s"] for r in results) / args.duration,
        "daemon_rss_mb": rss_now,
        "daemon_peak_rss_mb": rss_peak,
        "recorded_requests": recorded_requests,
        "recorded_hosts": recorded_hosts,
        "daemon_exit": codes,
        "errors": errors[:5],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--request", choices=["scale", "health"], default="scale",
                        help="scale: the measured request; health: GET /healthz on the same mTLS keep-alive "
                             "connections (the HTTP and TLS layers alone, for comparison)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    parser.add_argument("--processes", type=int, default=2, help="load processes")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections per load process")
    parser.add_argument("--workers", type=int, default=16, help="the daemon's [engine] workers")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--instances", type=int, default=1, help="daemons on the one database (PostgreSQL only)")
    parser.add_argument("--apps", type=int, default=1,
                        help="applications sending (each its own certificate and connections): one application's "
                             "decisions take turns, different applications' need not")
    parser.add_argument("--log-level", default="info", help="the daemon's log level (a site runs info)")
    parser.add_argument("--workdir", type=Path, help="keep the daemon's files here")
    parser.add_argument("--profile", type=Path, help="py-spy the daemon while measuring, sampling the thread that holds the GIL (raw stacks to this file)")
    parser.add_argument("--trace-store", type=Path, help="time every store call in the daemon (JSON to this file)")
    parser.add_argument("--daemon-arg", action="append", default=[],
                        help="pass an option to bench.daemon (e.g. --daemon-arg=--park-engine)")
    parser.add_argument("--drop-state-count-triggers", action="store_true",
                        help="experiment (PostgreSQL): drop the triggers that keep state_counts (see bench.common)")
    parser.add_argument("--record", action="store_true", help="append a row to bench/RESULTS.md")
    parser.add_argument("--note", default="", help="a note for the recorded row")
    args = parser.parse_args(argv)
    if args.store == "sqlite" and args.instances != 1:
        parser.error("--instances: SQLite has one instance; use --store postgres")
    if args.workdir:
        result = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="governord-bench-api-") as tmp:
            result = run(args, Path(tmp))
    print(json.dumps(result, indent=1))
    if args.request == "scale" and result["recorded_requests"] < result["accepted"]:
        print("FAILED: fewer requests recorded than accepted", file=sys.stderr)
        return 1
    if args.record and args.store == "postgres":
        append_row("api-fleet", [
            time.strftime("%Y-%m-%d"), machine_label(), str(args.instances), str(args.apps), f"{args.processes} x {args.connections}",
            f"{args.duration:.0f}", f"{result['accepted_per_s']:.0f}", f"{result['p50_ms']:.1f}",
            f"{result['p99_ms']:.1f}", " + ".join(str(c) for c in result["daemon_cpu_percent_each"]),
            f"{result['postgres_cpu_percent']:.0f}", f"{result['load_cpu_percent']:.0f}",
            f"{result['load_average_before']:.1f}", args.note,
        ])
    elif args.record:
        append_row("api", [
            time.strftime("%Y-%m-%d"), machine_label(), args.request, f"{args.processes} x {args.connections}",
            f"{args.duration:.0f}", f"{result['accepted_per_s']:.0f}", f"{result['p50_ms']:.1f}",
            f"{result['p99_ms']:.1f}", f"{result['daemon_cpu_percent']:.0f}", args.note,
        ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
