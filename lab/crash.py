"""The crash harness: SIGKILL governord at random moments while it scales up and retires a batch of
hosts, restart it each time, and check after every phase that everything converged.

    python -m lab.crash --hosts 100 --rounds 20 --seed 1
    python -m lab.crash --hosts 100 --rounds 20 --seed 1 --instances 3 --store postgresql

Each round has two phases, a scale-up of ``--hosts`` hosts and their retirement, each asked for by
one request with an idempotency key. A phase kills the daemon 1 to ``--max-kills`` times: first
after a random number of the phase's steps have started (none: while the request is being sent),
then each at a random moment within ``--window`` seconds of the last restart (some land during
start-up, most while steps are in flight). It restarts the daemon at once each time, and re-sends
the request if it did not get through (the key makes that safe). Once the
daemon has the phase's work done, the harness asks the other side directly (vcsim, the Foreman
and Satellite simulators, and governord's own database) and counts:

``dup``        extra machines carrying the ownership marker of a host that has one already
``leaked``     machines carrying a marker of a host that is gone or unknown
``missing``    ready hosts without a machine, or without their Foreman host or Satellite system
``orphans``    Foreman hosts and Satellite systems of no live host
``lost``       requests sent whose key governord has no record of, or that it recorded more than once
``failed``     hosts that ended failed, or (up) not ready / (down) not gone
``redone``     steps that were interrupted (a step-started with no outcome before the next start)
``resent``     requests sent again because a kill cut governord-ctl off (same key)
``taken``      (a fleet) hosts a killed instance held that another instance claimed before it came back

With ``--instances N --store postgresql`` the harness starts a private PostgreSQL cluster
(lab/postgres.py) and N governord instances on one database of it (lab/fleet.py: their own names,
state directories and sockets, the first one's CA). Each request goes to a random instance, each
kill hits a random instance, which is restarted at once or, every other time at random, only
after its leases ran out (``--lease-seconds``), so that the others take its steps over; the
counts are the same.

and, per phase, the states hosts were in at the moments of the kills (summed over the kills;
``request``: governord-ctl was still running, starting up, sending or awaiting the answer;
``start-up``: the daemon had not said READY yet).

It prints one line per phase and a total, and exits 1 if any of dup, leaked, missing, orphans,
lost or failed is non-zero.
The random choices come from ``--seed``; when the kills land still depends on timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fleet import GovernordFleet
from .postgres import start_cluster
from .stack import Governord, Lab

#: host states in which nothing more happens without an operator or a request
RESTING = frozenset({"ready", "gone", "failed"})
#: steps that start (and are counted) per host in a scale-up and in a retirement
UP_STEPS = ("classify", "provision", "register")
DOWN_STEPS = ("retire", "deregister", "deprovision", "clean")
#: the counts that must be zero after every phase
MUST_BE_ZERO = ("dup", "leaked", "missing", "orphans", "lost", "failed")


@dataclass
class PhaseResult:
    """What one phase did and what the other side showed afterwards."""

    round: int
    phase: str
    kills: int = 0
    #: hosts the phase's request named
    hosts: int = 0
    ready: int = 0
    gone: int = 0
    dup: int = 0
    leaked: int = 0
    missing: int = 0
    orphans: int = 0
    lost: int = 0
    failed: int = 0
    redone: int = 0
    #: times the request had to be sent again (a kill cut it off; the key made that safe)
    resent: int = 0
    #: hosts a killed instance held that another instance of the fleet claimed before it came back
    taken: int = 0
    seconds: float = 0.0
    #: host states seen at the moments of the kills (how many hosts were where)
    killed_during: Counter[str] = field(default_factory=Counter)

    @property
    def converged(self) -> bool:
        return all(getattr(self, name) == 0 for name in MUST_BE_ZERO)


COLUMNS = ("kills", "hosts", "ready", "gone", *MUST_BE_ZERO, "redone", "resent", "taken")


def header() -> str:
    return f"{'round':>5} {'phase':5} " + " ".join(f"{c:>7}" for c in COLUMNS) + f" {'seconds':>8}  killed during"


def line(result: PhaseResult) -> str:
    during = ", ".join(f"{state} {n}" for state, n in result.killed_during.most_common()) or "-"
    return (f"{result.round:>5} {result.phase:5} " + " ".join(f"{getattr(result, c):>7}" for c in COLUMNS)
            + f" {result.seconds:>8.1f}  {during}")


def total_line(results: list[PhaseResult]) -> str:
    sums = {c: sum(getattr(r, c) for r in results) for c in COLUMNS}
    return f"{'total':>5} {'':5} " + " ".join(f"{sums[c]:>7}" for c in COLUMNS) + \
        f" {sum(r.seconds for r in results):>8.1f}"


class CrashHarness:
    """Runs the rounds against one lab (vcsim and both simulators) and one governord config, or
    a fleet of governord instances on one PostgreSQL database (``store_url``, ``instances``)."""

    def __init__(self, lab: Lab, *, hosts: int, seed: int, max_kills: int = 3, window: float | None = None,
                 workers: int = 16, settle_timeout: float = 900.0, echo: bool = True,
                 store_url: str | None = None, instances: int = 1, lease_seconds: float = 6.0) -> None:
        self.lab = lab
        self.hosts = hosts
        self.rng = random.Random(seed)
        self.seed = seed
        self.max_kills = max_kills
        # about the time the lab needs for the phase (~0.25 s a host), so most kills land mid-work
        self.window = window if window is not None else 2.0 + 0.15 * hosts
        self.settle_timeout = settle_timeout
        self.echo = echo
        #: the fleet on PostgreSQL, or None: one daemon on its SQLite file
        self.fleet: GovernordFleet | None = None
        if store_url is not None:
            self.fleet = GovernordFleet(lab, store_url, instances=instances, workers=workers, max_hosts=hosts,
                                        retry_limit=10, lease_seconds=lease_seconds)
            self.names = self.fleet.names
        else:
            if instances != 1:
                raise ValueError("several instances share a PostgreSQL store: give store_url")
            self.config = lab.write_config(workers=workers, max_hosts=hosts, retry_limit=10)
            self.names = ["governord"]
        self.lease_seconds = lease_seconds
        self.daemons: dict[str, Governord] = {}
        self.results: list[PhaseResult] = []

    # -- the daemons -----------------------------------------------------------------------

    def _start(self, name: str, *, wait_ready: bool) -> Governord:
        if self.fleet is not None:
            daemon = self.fleet.start(name, wait_ready=wait_ready)
        else:
            daemon = self.lab.start_governord(self.config, wait_ready=wait_ready)
        self.daemons[name] = daemon
        return daemon

    def _ready(self, name: str) -> Governord:
        """The instance's running daemon, started (or waited for) until it is ready."""
        daemon = self.daemons.get(name)
        if daemon is None or daemon.process.poll() is not None:
            return self._start(name, wait_ready=True)
        daemon.wait_notification("READY=1", timeout=120)
        return daemon

    def _all_ready(self) -> None:
        for name in self.names:  # the first one first: it makes the CA the others copy
            self._ready(name)

    @property
    def _db(self) -> Governord:
        """Any of the daemons, to read the store with (dead or alive: the store is the same)."""
        return self.daemons[self.names[0]]

    def _send(self, daemon: Governord, args: tuple[str, ...]) -> subprocess.Popen[str]:
        """governord-ctl in the background, so that a kill can land while it talks."""
        return subprocess.Popen(
            [sys.executable, "-m", "governord.ctl", "--socket", str(daemon.socket), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )

    # -- one round ---------------------------------------------------------------------------

    def run(self, rounds: int) -> list[PhaseResult]:
        if self.echo:
            print(header(), flush=True)
        try:
            for number in range(1, rounds + 1):
                for phase in ("up", "down"):
                    result = self._phase(number, phase)
                    self.results.append(result)
                    if self.echo:
                        print(line(result), flush=True)
        finally:
            if self.fleet is not None:
                self.fleet.stop()
            for daemon in self.daemons.values():
                daemon.stop()
        if self.echo:
            print(total_line(self.results), flush=True)
        return self.results

    def _phase(self, number: int, phase: str) -> PhaseResult:
        result = PhaseResult(number, phase)
        key = f"crash-{self.seed}-{number}-{phase}"
        args = ("scale", "demo", "node", "--key", key) + (
            ("--add", str(self.hosts)) if phase == "up" else ("--count", "0"))
        started = time.monotonic()
        first_event = self._last_event(self._db) if self.daemons else 0
        self._all_ready()
        target = self.rng.choice(self.names)
        sender: subprocess.Popen[str] | None = self._send(self.daemons[target], args)
        # The first kill is placed by progress, so that it always lands while the phase works:
        # after a random number of its steps have started (-1: at once, while the request is being
        # sent), among the first half of them. Later ones come at random times after a restart.
        # In a fleet each kill hits a random instance, restarted at once or (every other time,
        # at random) only once its leases ran out, so that the others take its steps over.
        steps = self.hosts * (len(UP_STEPS) if phase == "up" else len(DOWN_STEPS))
        after_steps: int | None = self.rng.randrange(-1, max(steps // 2, 1))
        for _ in range(self.rng.randint(1, self.max_kills)):
            deadline = time.monotonic() + (self.settle_timeout if after_steps is not None
                                           else self.rng.uniform(0.0, self.window))
            while time.monotonic() < deadline and not self._done(key, phase):
                if after_steps is not None and self._started_steps(first_event) > after_steps:
                    break
                time.sleep(0.01)
            after_steps = None
            if self._done(key, phase):
                break
            victim = self.rng.choice(self.names)
            daemon = self.daemons[victim]
            result.killed_during.update(r["state"] for r in self._db.db_rows("hosts") if r["state"] not in RESTING)
            if daemon.process.poll() is None and not daemon.is_ready():
                result.killed_during["start-up"] += 1
            held = self._held_by(victim)
            daemon.kill()
            result.kills += 1
            if sender is not None and sender.poll() is None and victim == target:
                result.killed_during["request"] += 1
            if self.fleet is not None and self.rng.random() < 0.5:
                # the others take its steps over once its leases run out; then it comes back
                time.sleep(self.lease_seconds + 1.0)
                result.taken += self._taken(victim, held)
            self._start(victim, wait_ready=False)
            if sender is not None and victim == target:
                sender.wait(60)
                if sender.returncode != 0:
                    sender = None  # it did not get through: sent again once an instance is up
            if sender is None:
                target = self.rng.choice(self.names)
                sender = self._send(self._ready(target), args)
                result.resent += 1
        self._all_ready()
        if sender is not None:
            sender.wait(60)
            if sender.returncode != 0:
                self.daemons[target].ctl(*args)  # the key makes a repeat safe
                result.resent += 1
        deadline = time.monotonic() + self.settle_timeout
        while not self._done(key, phase):
            for daemon in self.daemons.values():
                if daemon.process.poll() is not None:
                    raise RuntimeError(f"governord exited {daemon.process.returncode}; log:\n{daemon.log_tail()}")
            if time.monotonic() > deadline:
                break  # counted below as not converged
            time.sleep(0.2)
        result.seconds = time.monotonic() - started
        self._count(result, key, phase, first_event)
        return result

    def _held_by(self, name: str) -> dict[str, int]:
        """The hosts the instance ``name`` holds a lease on now, with their fencing tokens."""
        return {r["id"]: r["lease_token"] for r in self._db.db_rows("hosts")
                if (r["lease_owner"] or "").rsplit("/", 1)[0] == name}

    def _taken(self, name: str, held: dict[str, int]) -> int:
        """How many of ``held`` another instance has claimed since (a larger fencing token)."""
        rows = {r["id"]: r for r in self._db.db_rows("hosts")}
        return sum(1 for host_id, token in held.items() if rows[host_id]["lease_token"] > token)

    def _last_event(self, daemon: Governord) -> int:
        rows = daemon.db_query("SELECT MAX(id) AS last FROM events", {})
        return int(rows[0]["last"] or 0) if rows else 0

    def _started_steps(self, after_event: int) -> int:
        rows = self._db.db_query("SELECT COUNT(*) AS n FROM events WHERE id > :after AND kind = 'step-started'",
                                 {"after": after_event})
        return int(rows[0]["n"]) if rows else 0

    def _request(self, key: str) -> list[dict[str, Any]]:
        return [r for r in self._db.db_rows("requests") if r["idempotency_key"] == key]

    def _done(self, key: str, phase: str) -> bool:
        """The phase's request is recorded and every host it named rests."""
        requests = self._request(key)
        if len(requests) != 1:
            return False
        ids = set(json.loads(requests[0]["host_ids"]))
        rows = [r for r in self._db.db_rows("hosts") if r["id"] in ids]
        return len(rows) == len(ids) and all(r["state"] in RESTING and not r["retire_requested"] for r in rows)

    # -- counting ----------------------------------------------------------------------------

    def _count(self, result: PhaseResult, key: str, phase: str, first_event: int) -> None:
        daemon = self._db
        requests = self._request(key)
        result.lost = 0 if len(requests) == 1 and requests[0]["state"] == "accepted" else 1
        ids = set(json.loads(requests[0]["host_ids"])) if requests else set()
        result.hosts = len(ids)
        rows = daemon.db_rows("hosts")
        mine = [r for r in rows if r["id"] in ids]
        result.ready = sum(r["state"] == "ready" for r in mine)
        result.gone = sum(r["state"] == "gone" for r in mine)
        wanted = "ready" if phase == "up" else "gone"
        result.failed = sum(r["state"] != wanted for r in mine) + (self.hosts - len(ids) if phase == "up" else 0)
        live = {r["id"]: r for r in rows if r["state"] != "gone"}
        ready = {r["id"]: r for r in rows if r["state"] == "ready"}

        # one by one: two VMs may carry the same name as well as the same marker
        markers = Counter(vm["host_id"] for vm in self.lab.vsphere_vm_list())
        result.dup = sum(n - 1 for n in markers.values() if n > 1)
        result.leaked = sum(n for host_id, n in markers.items() if host_id not in live)
        result.missing = sum(host_id not in markers for host_id in ready)

        fqdns = {r["fqdn"] for r in live.values()}
        foreman = self.lab.foreman_hosts()
        satellite = self.lab.satellite_systems()
        result.orphans = sum(name not in fqdns for name in foreman) + sum(name not in fqdns for name in satellite)
        result.missing += sum(r["fqdn"] not in foreman for r in ready.values())
        result.missing += sum(r["fqdn"] not in satellite for r in ready.values())

        result.redone = _interrupted_steps(daemon.db_query("SELECT * FROM events WHERE id > :after",
                                                           {"after": first_event}))


def _interrupted_steps(events: list[dict[str, Any]]) -> int:
    """Steps started but cut off by a kill: a step-started followed, for the same host, by another
    step-started with no outcome (transition, retry or failure) in between."""
    open_steps: dict[str, bool] = {}
    redone = 0
    for event in sorted(events, key=lambda e: e["id"]):
        host = event["host_id"]
        if host is None:
            continue
        if event["kind"] == "step-started":
            if open_steps.get(host):
                redone += 1
            open_steps[host] = True
        else:
            open_steps[host] = False
    return redone


def start_lab(lab: Lab, *, vcsim_delay_ms: int = 0) -> None:
    """vcsim (optionally slowed down) and both simulators."""
    lab.start_foreman()
    lab.start_satellite()
    lab.start_vcsim(delay_ms=vcsim_delay_ms)
    lab.start_platform("vsphere")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lab.crash", description=__doc__.split("\n\n")[0],
                                     epilog="See the module's docstring for what is counted.")
    parser.add_argument("--hosts", type=int, default=100, help="hosts scaled up and retired per round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill schedule")
    parser.add_argument("--max-kills", type=int, default=3, help="most kills per phase (at least one)")
    parser.add_argument("--window", type=float, default=None,
                        help="seconds after a restart in which a further kill lands (default: 2 + 0.15 a host)")
    parser.add_argument("--vcsim-delay-ms", type=int, default=0,
                        help="slow every vCenter call down (longer steps: more kills land mid-call)")
    parser.add_argument("--workers", type=int, default=16, help="[engine] workers of each daemon")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the daemons' store: SQLite (one daemon) or a private PostgreSQL cluster")
    parser.add_argument("--instances", type=int, default=1,
                        help="governord instances sharing the store (more than one needs --store postgresql)")
    parser.add_argument("--lease-seconds", type=float, default=6.0,
                        help="[engine] lease_seconds of a fleet's instances (how soon the others take over)")
    parser.add_argument("--workdir", type=Path, help="where the lab lives (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (logs, database) afterwards")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hosts < 1 or args.rounds < 1 or args.max_kills < 1 or args.instances < 1:
        print("lab.crash: --hosts, --rounds, --max-kills and --instances must be at least 1", file=sys.stderr)
        return 2
    if args.instances > 1 and args.store != "postgresql":
        print("lab.crash: --instances above 1 needs --store postgresql (instances share a PostgreSQL store)",
              file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="governord-crash-"))
    fleet = f", {args.instances} instances" if args.store == "postgresql" else ""
    print(f"crash harness: {args.rounds} rounds of {args.hosts} hosts up and down, seed {args.seed}, "
          f"store {args.store}{fleet}, lab in {workdir}", flush=True)
    try:
        with contextlib.ExitStack() as stack:
            store_url = None
            if args.store == "postgresql":
                # PostgreSQL runs as user postgres, which must reach its directory
                workdir.chmod(0o711)
                cluster = stack.enter_context(start_cluster(workdir / "postgres", max_connections=40 * args.instances))
                store_url = cluster.create_database("governord", owner="governord", password=secrets.token_urlsafe(16))
            lab = stack.enter_context(Lab(workdir / "lab"))
            start_lab(lab, vcsim_delay_ms=args.vcsim_delay_ms)
            results = CrashHarness(lab, hosts=args.hosts, seed=args.seed, max_kills=args.max_kills,
                                   window=args.window, workers=args.workers, store_url=store_url,
                                   instances=args.instances, lease_seconds=args.lease_seconds).run(args.rounds)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    bad = [r for r in results if not r.converged]
    print("converged after every phase" if not bad else
          f"NOT converged after {len(bad)} phases: " + ", ".join(f"round {r.round} {r.phase}" for r in bad))
    return 1 if bad else 0


__all__ = ["COLUMNS", "CrashHarness", "MUST_BE_ZERO", "PhaseResult", "main", "start_lab"]

if __name__ == "__main__":
    sys.exit(main())
