"""Takeover after ``kill -9``: how long a fleet on one PostgreSQL database takes to go on with a
dead instance's work, measured over many kills.

    .venv/bin/python -m bench.takeover --kills 20 [--lease-seconds 5 --leader-lease 6 --heartbeat 2]

Three governord processes (``python -m bench.daemon --memory-plugin --memory-delay S``: the
daemon with the in-process memory provider and registrar, each of their calls ``S`` seconds
long, so steps are in flight long enough to be interrupted) share a private PostgreSQL
database (lab/postgres.py). Each round adds ``--hosts`` hosts through one instance's admin
socket, waits until every one of them is leased (a step running on some instance), then
``SIGKILL``s one instance at a random moment (up to a third of the lease later), taking turns between the one that holds most of the round's steps
and the leader (often the same process: then both are measured from that one kill):

- **steps**: from the kill to the first claim by another instance of a host the dead one had
  leased (``hosts.lease_owner`` names another instance), polled every 20 ms. Expected at most
  ``[engine] lease_seconds`` (the dead instance's last renewal may be up to a third of it
  before the kill, so from about two thirds of it) plus the engine's 1 s idle poll.
- **leader**: from the kill of the leader to another instance's holding the ``leader`` lease
  (``fleet_leases.acquired_at``, the new holder's own clock). Expected at most ``[fleet]
  leader_lease`` plus one ``heartbeat`` (the lease is sought at each heartbeat).

The killed instance is started again (same name) only after the takeover was seen, so its
restart, which frees its own earlier leases at once, cannot be what ends the wait. The lease
times default to short ones so that 20 kills take a few minutes; the production defaults
(``--lease-seconds 60 --leader-lease 30 --heartbeat 5``) give the same picture, scaled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lab.stack import Governord

from .common import DAEMON_CONFIG, PrivatePostgres, admin, query, start_daemon
from .record import append_row, machine_label


class Fleet:
    """Three (``--instances``) daemons on one database, started and killed by index."""

    def __init__(self, args: argparse.Namespace, home: Path, url: str) -> None:
        self.args = args
        self.url = url
        self.names = [f"bench-{i + 1}" for i in range(args.instances)]
        self.configs: dict[str, Path] = {}
        self.env: dict[str, str] = {}
        for name in self.names:
            sections, self.env = PrivatePostgres.store_sections(
                url, name, heartbeat=args.heartbeat, leader_lease=args.leader_lease, pool_size=4)
            directory = home / name
            directory.mkdir(parents=True)
            text = DAEMON_CONFIG.format(home=directory, log_level="info", workers=args.workers, max_hosts=100000)
            text = text.replace(f"workers = {args.workers}\n",
                                f"workers = {args.workers}\nlease_seconds = {args.lease_seconds}\n")
            self.configs[name] = directory / "governord.toml"
            self.configs[name].write_text(text + sections)
        self.daemons: dict[str, Governord] = {}

    def start(self, name: str) -> Governord:
        daemon = start_daemon(self.configs[name], module="bench.daemon",
                              args=["--memory-plugin", f"--memory-delay={self.args.step_delay}"], env=self.env)
        self.daemons[name] = daemon
        return daemon

    def kill(self, name: str) -> float:
        """SIGKILL the instance; returns the time of the signal."""
        daemon = self.daemons[name]
        killed = time.time()
        os.kill(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait()
        daemon.notify.close()
        return killed

    def stop(self) -> None:
        for daemon in self.daemons.values():
            if daemon.process.poll() is None:
                daemon.stop(timeout=30)


def instance_of(owner: str | None) -> str | None:
    return owner.split("/", 1)[0] if owner else None


def leader(url: str) -> tuple[str | None, float | None]:
    """(the leader's instance name, when it took the lease), by the database."""
    rows = query(url, "SELECT holder, acquired_at, expires_at FROM fleet_leases WHERE name = 'leader'")
    if not rows or rows[0][0] is None or (rows[0][2] or 0) < time.time():
        return None, None
    return instance_of(rows[0][0]), rows[0][1]


def wait(what: str, check: Any, timeout: float, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def one_round(fleet: Fleet, number: int, kind: str) -> dict[str, Any]:
    """Add hosts, wait for their steps to be running, kill one instance (``kind``: the one
    with most of the round's steps, or the leader), measure, restart it."""
    args, url = fleet.args, fleet.url
    live = next(iter(fleet.daemons.values()))
    result = asyncio.run(admin(live, "POST", "/v1/apps/bench/scale", {"role": "node", "add": args.hosts}))
    ids = [h["id"] for h in result["hosts"]]
    params = {"ids": ids}
    sql = "SELECT id, lease_owner FROM hosts WHERE id = ANY(:ids) AND lease_owner IS NOT NULL AND lease_expires > :now"

    def leased() -> dict[str, str] | None:
        rows = dict(query(url, sql, {**params, "now": time.time()}))
        return rows if len(rows) == len(ids) else None

    owners = wait("the round's steps to be running", leased, 60)
    by_instance: dict[str, list[str]] = {}
    for host_id, owner in owners.items():
        by_instance.setdefault(instance_of(owner) or "", []).append(host_id)
    leader_name, _ = leader(url)
    victim = max(by_instance, key=lambda n: len(by_instance[n])) if kind == "steps" or leader_name is None \
        else leader_name
    held = by_instance.get(victim, [])
    # at a random moment of the lease's renewal cycle (renewed every third of it), and of the
    # heartbeat's, as a real crash would come
    time.sleep(random.uniform(0, max(args.lease_seconds / 3, args.heartbeat)))
    killed = fleet.kill(victim)
    out: dict[str, Any] = {"round": number, "kind": kind, "victim": victim, "steps_held": len(held),
                           "was_leader": victim == leader_name}
    pending = {"steps": bool(held), "leader": victim == leader_name}
    deadline = time.monotonic() + 3 * max(args.lease_seconds, args.leader_lease) + 30
    while any(pending.values()):
        now = time.time()
        if pending["steps"]:
            rows = query(url, "SELECT lease_owner FROM hosts WHERE id = ANY(:ids)", {"ids": held})
            if any(instance_of(r[0]) not in (None, victim) for r in rows):
                out["steps_s"] = now - killed
                pending["steps"] = False
        if pending["leader"]:
            name, acquired = leader(url)
            if name is not None and name != victim:
                out["leader_s"] = (acquired or now) - killed
                out["new_leader"] = name
                pending["leader"] = False
        if time.monotonic() > deadline:
            raise RuntimeError(f"round {number}: no takeover after killing {victim}: {pending}")
        time.sleep(0.02)
    fleet.start(victim)
    return out


def run(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    with PrivatePostgres() as pg:
        url = pg.new_database()
        fleet = Fleet(args, home, url)
        try:
            fleet.start(fleet.names[0])  # migrates the database alone
            for name in fleet.names[1:]:
                fleet.start(name)
            wait("a leader", lambda: leader(url)[0], 60, 0.2)
            rounds = []
            number = 0
            while (sum("steps_s" in r for r in rounds) < args.kills
                   or sum("leader_s" in r for r in rounds) < args.kills):
                number += 1
                need_steps = sum("steps_s" in r for r in rounds) < args.kills
                need_leader = sum("leader_s" in r for r in rounds) < args.kills
                kind = "leader" if need_leader and (number % 2 == 0 or not need_steps) else "steps"
                out = one_round(fleet, number, kind)
                rounds.append(out)
                print(json.dumps(out), flush=True)
        finally:
            fleet.stop()
    summary: dict[str, Any] = {"kills": len(rounds), "instances": args.instances, "lease_seconds": args.lease_seconds,
                               "leader_lease": args.leader_lease, "heartbeat": args.heartbeat}
    for what, bound in (("steps", args.lease_seconds + 1.0), ("leader", args.leader_lease + args.heartbeat)):
        values = sorted([r[f"{what}_s"] for r in rounds if f"{what}_s" in r][:args.kills])
        summary[what] = {"samples": len(values), "p50_s": statistics.median(values), "min_s": values[0],
                         "max_s": values[-1], "expected_bound_s": bound}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.takeover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="samples of each takeover (steps, leader)")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=6, help="hosts added each round")
    parser.add_argument("--workers", type=int, default=16, help="each instance's [engine] workers")
    parser.add_argument("--lease-seconds", type=float, default=5.0, help="[engine] lease_seconds")
    parser.add_argument("--leader-lease", type=float, default=6.0, help="[fleet] leader_lease")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="[fleet] heartbeat")
    parser.add_argument("--step-delay", type=float, default=6.0,
                        help="seconds each memory provider and registrar call takes (a step lasts 1 to 2 of them)")
    parser.add_argument("--workdir", type=Path, help="keep the daemons' files (logs) here")
    parser.add_argument("--record", action="store_true", help="append a row to bench/RESULTS.md")
    parser.add_argument("--note", default="", help="a note for the recorded row")
    args = parser.parse_args(argv)
    if args.workdir:
        summary = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="governord-bench-takeover-") as tmp:
            summary = run(args, Path(tmp))
    print(json.dumps(summary, indent=1))
    if args.record:
        load = os.getloadavg()[0]
        for what in ("steps", "leader"):
            s = summary[what]
            append_row("takeover", [
                time.strftime("%Y-%m-%d"), machine_label(), what, str(args.instances),
                f"{args.lease_seconds:g} / {args.leader_lease:g} / {args.heartbeat:g}", str(s["samples"]),
                f"{s['p50_s']:.2f}", f"{s['min_s']:.2f}", f"{s['max_s']:.2f}", f"{s['expected_bound_s']:g}",
                f"{load:.1f}", args.note,
            ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
