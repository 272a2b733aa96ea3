"""The daemon's memory while it manages N hosts (default 10,000), from /proc.

    .venv/bin/python -m bench.memory --hosts 10000 [--record]

governord runs as a real process (``python -m bench.daemon --memory-plugin``: the daemon with
governord's in-process ``memory`` provider and registrar types added, so the numbers are the
daemon's own, not an SDK's). The operator asks for the hosts through the admin API (scale
requests of at most 1,000 hosts, the API's limit), the engine brings every one to ``ready``
(classified, provisioned, registered), and the daemon's RSS is sampled every half second
from /proc/PID/status:

- start: after READY=1, nothing managed yet;
- scale-up peak: the most resident memory while the hosts were being brought up;
- steady: resident memory once every host is ready and the daemon has idled ``--settle``
  seconds (what it costs to keep managing them);
- after reads: resident memory after an operator lists every host (admin ``GET /v1/hosts``) and
  Prometheus scrapes ``/metrics``, and the kernel's high-water mark (VmHWM) over the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from .common import DAEMON_CONFIG, admin, rss_mb, start_daemon
from .record import append_row, machine_label


class Sampler(threading.Thread):
    """Samples a process's RSS every ``interval`` seconds; ``peak`` since the last ``reset``."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0.0
        self.samples: list[tuple[float, float]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                now, _ = rss_mb(self.pid)
            except FileNotFoundError:
                return
            self.samples.append((time.time(), now))
            self.peak = max(self.peak, now)
            self.stopped.wait(self.interval)

    def reset(self) -> None:
        self.peak = 0.0


def counts(state_dir: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{state_dir / 'governord.db'}?mode=ro", uri=True, timeout=30)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM hosts GROUP BY state").fetchall())
    finally:
        conn.close()


async def scale_up(daemon: Any, hosts: int, timeout: float) -> float:
    started = time.monotonic()
    remaining = hosts
    while remaining:
        batch = min(1000, remaining)
        await admin(daemon, "POST", "/v1/apps/bench/scale", {"role": "node", "add": batch})
        remaining -= batch
    while True:
        seen = counts(daemon.state_dir)
        if seen.get("ready", 0) >= hosts:
            return time.monotonic() - started
        if seen.get("failed"):
            raise RuntimeError(f"hosts failed: {seen}")
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"not all ready after {timeout}s: {seen}")
        await asyncio.sleep(1.0)


async def operator_reads(daemon: Any) -> tuple[int, int]:
    """What an operator and Prometheus read: every host (page by page, as governord-ctl does), and
    the metrics."""
    hosts: list[Any] = []
    cursor = None
    while True:
        page = await admin(daemon, "GET", "/v1/hosts?limit=1000" + (f"&cursor={cursor}" if cursor else ""))
        hosts += page["hosts"]
        if not (cursor := page["next_cursor"]):
            break
    connector = aiohttp.UnixConnector(path=str(daemon.socket))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get("http://governord/metrics") as resp:
            metrics = await resp.read()
    return len(hosts), len(metrics)


def run(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    home.mkdir(parents=True, exist_ok=True)
    config = home / "governord.toml"
    config.write_text(DAEMON_CONFIG.format(home=home, workers=args.workers, max_hosts=args.hosts,
                                            log_level=args.log_level))
    census = home / "census.json"
    env = {"MALLOC_ARENA_MAX": str(args.malloc_arena_max)} if args.malloc_arena_max else None
    daemon = start_daemon(config, module="bench.daemon", args=["--memory-plugin", f"--census={census}"], env=env)
    sampler = Sampler(daemon.process.pid)
    try:
        time.sleep(1.0)
        start_rss, _ = rss_mb(daemon.process.pid)
        sampler.start()
        up_s = asyncio.run(scale_up(daemon, args.hosts, args.timeout))
        scale_peak = sampler.peak
        time.sleep(args.settle)
        steady, _ = rss_mb(daemon.process.pid)
        daemon.process.send_signal(signal.SIGUSR2)
        time.sleep(3.0)
        listed, metrics_bytes = asyncio.run(operator_reads(daemon))
        time.sleep(1.0)
        after_reads, high_water = rss_mb(daemon.process.pid)
        ready = counts(daemon.state_dir).get("ready", 0)
    finally:
        sampler.stopped.set()
        code = daemon.stop(timeout=120)
    return {
        "hosts": args.hosts,
        "ready": ready,
        "listed": listed,
        "metrics_bytes": metrics_bytes,
        "scale_up_s": up_s,
        "start_rss_mb": start_rss,
        "scale_up_peak_rss_mb": scale_peak,
        "steady_rss_mb": steady,
        "after_reads_rss_mb": after_reads,
        "high_water_rss_mb": high_water,
        "daemon_exit": code,
        "census": json.loads(census.read_text()) if census.exists() else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=64, help="the daemon's [engine] workers")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds idle before the steady sample")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the scale-up may take")
    parser.add_argument("--log-level", default="info", help="the daemon's log level (a site runs info)")
    parser.add_argument("--malloc-arena-max", type=int,
                        help="MALLOC_ARENA_MAX for the daemon (glibc: at most this many malloc arenas; "
                             "by default up to 8 per core, one per thread that allocates)")
    parser.add_argument("--workdir", type=Path, help="keep the daemon's files here")
    parser.add_argument("--record", action="store_true", help="append a row to bench/RESULTS.md")
    parser.add_argument("--note", default="", help="a note for the recorded row")
    args = parser.parse_args(argv)
    if args.workdir:
        result = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="governord-bench-memory-") as tmp:
            result = run(args, Path(tmp))
    print(json.dumps(result, indent=1))
    if result["census"] and args.workdir:
        print(f"memory census at steady state: {args.workdir / 'census.json'}")
    if result["ready"] < args.hosts or result["listed"] < args.hosts:
        print("FAILED: not every host was ready and listed", file=sys.stderr)
        return 1
    if args.record:
        append_row("memory", [
            time.strftime("%Y-%m-%d"), machine_label(), f"{args.hosts:,}", f"{result['scale_up_s']:.0f}",
            f"{result['start_rss_mb']:.0f}", f"{result['scale_up_peak_rss_mb']:.0f}",
            f"{result['steady_rss_mb']:.0f}", f"{result['after_reads_rss_mb']:.0f}",
            f"{result['high_water_rss_mb']:.0f}", args.note,
        ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
