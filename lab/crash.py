"""The crash harness: SIGKILL governord at random moments while it scales up and retires a batch of
hosts, restart it each time, and check after every phase that everything converged.

    python -m lab.crash --hosts 100 --rounds 20 --seed 1

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

and, per phase, the states hosts were in at the moments of the kills (summed over the kills;
``request``: governord-ctl was still running, starting up, sending or awaiting the answer;
``start-up``: the daemon had not said READY yet).

It prints one line per phase and a total, and exits 1 if any of dup, leaked, missing, orphans,
lost or failed is non-zero.
The random choices come from ``--seed``; when the kills land still depends on timing.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    seconds: float = 0.0
    #: host states seen at the moments of the kills (how many hosts were where)
    killed_during: Counter[str] = field(default_factory=Counter)

    @property
    def converged(self) -> bool:
        return all(getattr(self, name) == 0 for name in MUST_BE_ZERO)


COLUMNS = ("kills", "hosts", "ready", "gone", *MUST_BE_ZERO, "redone", "resent")


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
    """Runs the rounds against one lab (vcsim and both simulators) and one governord config."""

    def __init__(self, lab: Lab, *, hosts: int, seed: int, max_kills: int = 3, window: float | None = None,
                 workers: int = 16, settle_timeout: float = 900.0, echo: bool = True) -> None:
        self.lab = lab
        self.hosts = hosts
        self.rng = random.Random(seed)
        self.seed = seed
        self.max_kills = max_kills
        # about the time the lab needs for the phase (~0.25 s a host), so most kills land mid-work
        self.window = window if window is not None else 2.0 + 0.15 * hosts
        self.settle_timeout = settle_timeout
        self.echo = echo
        self.config = lab.write_config(workers=workers, max_hosts=hosts, retry_limit=10)
        self.daemon: Governord | None = None
        self.results: list[PhaseResult] = []

    # -- the daemon ------------------------------------------------------------------------

    def _start(self, *, wait_ready: bool) -> Governord:
        self.daemon = self.lab.start_governord(self.config, wait_ready=wait_ready)
        return self.daemon

    def _ready(self) -> Governord:
        """The running daemon, started (or waited for) until it is ready."""
        daemon = self.daemon
        if daemon is None or daemon.process.poll() is not None:
            return self._start(wait_ready=True)
        daemon.wait_notification("READY=1", timeout=120)
        return daemon

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
            if self.daemon is not None:
                self.daemon.stop()
        if self.echo:
            print(total_line(self.results), flush=True)
        return self.results

    def _phase(self, number: int, phase: str) -> PhaseResult:
        result = PhaseResult(number, phase)
        key = f"crash-{self.seed}-{number}-{phase}"
        args = ("scale", "demo", "node", "--key", key) + (
            ("--add", str(self.hosts)) if phase == "up" else ("--count", "0"))
        started = time.monotonic()
        first_event = self._last_event(self.daemon) if self.daemon else 0
        daemon = self._ready()
        sender: subprocess.Popen[str] | None = self._send(daemon, args)
        # The first kill is placed by progress, so that it always lands while the phase works:
        # after a random number of its steps have started (-1: at once, while the request is being
        # sent), among the first half of them. Later ones come at random times after a restart.
        steps = self.hosts * (len(UP_STEPS) if phase == "up" else len(DOWN_STEPS))
        after_steps: int | None = self.rng.randrange(-1, max(steps // 2, 1))
        for _ in range(self.rng.randint(1, self.max_kills)):
            deadline = time.monotonic() + (self.settle_timeout if after_steps is not None
                                           else self.rng.uniform(0.0, self.window))
            while time.monotonic() < deadline and not self._done(daemon, key, phase):
                if after_steps is not None and self._started_steps(daemon, first_event) > after_steps:
                    break
                time.sleep(0.01)
            after_steps = None
            if self._done(daemon, key, phase):
                break
            result.killed_during.update(r["state"] for r in daemon.db_rows("hosts") if r["state"] not in RESTING)
            if daemon.process.poll() is None and not daemon.is_ready():
                result.killed_during["start-up"] += 1
            daemon.kill()
            result.kills += 1
            if sender is not None and sender.poll() is None:
                result.killed_during["request"] += 1
            daemon = self._start(wait_ready=False)
            if sender is not None:
                sender.wait(60)
                if sender.returncode != 0:
                    sender = None  # it did not get through: sent again once the daemon is up
            if sender is None:
                daemon = self._ready()
                sender = self._send(daemon, args)
                result.resent += 1
        daemon = self._ready()
        if sender is not None:
            sender.wait(60)
            if sender.returncode != 0:
                daemon.ctl(*args)  # the key makes a repeat safe
                result.resent += 1
        deadline = time.monotonic() + self.settle_timeout
        while not self._done(daemon, key, phase):
            if daemon.process.poll() is not None:
                raise RuntimeError(f"governord exited {daemon.process.returncode}; log:\n{daemon.log_tail()}")
            if time.monotonic() > deadline:
                break  # counted below as not converged
            time.sleep(0.2)
        result.seconds = time.monotonic() - started
        self._count(result, daemon, key, phase, first_event)
        return result

    @staticmethod
    def _last_event(daemon: Governord) -> int:
        rows = daemon.db_query("SELECT MAX(id) AS last FROM events")
        return int(rows[0]["last"] or 0) if rows else 0

    @staticmethod
    def _started_steps(daemon: Governord, after_event: int) -> int:
        rows = daemon.db_query("SELECT COUNT(*) AS n FROM events WHERE id > ? AND kind = 'step-started'",
                               (after_event,))
        return int(rows[0]["n"]) if rows else 0

    def _request(self, daemon: Governord, key: str) -> list[dict[str, Any]]:
        return [r for r in daemon.db_rows("requests") if r["idempotency_key"] == key]

    def _done(self, daemon: Governord, key: str, phase: str) -> bool:
        """The phase's request is recorded and every host it named rests."""
        requests = self._request(daemon, key)
        if len(requests) != 1:
            return False
        ids = set(json.loads(requests[0]["host_ids"]))
        rows = [r for r in daemon.db_rows("hosts") if r["id"] in ids]
        return len(rows) == len(ids) and all(r["state"] in RESTING and not r["retire_requested"] for r in rows)

    # -- counting ----------------------------------------------------------------------------

    def _count(self, result: PhaseResult, daemon: Governord, key: str, phase: str, first_event: int) -> None:
        requests = self._request(daemon, key)
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

        markers = Counter(vm["host_id"] for vm in self.lab.vsphere_vms().values())
        result.dup = sum(n - 1 for n in markers.values() if n > 1)
        result.leaked = sum(n for host_id, n in markers.items() if host_id not in live)
        result.missing = sum(host_id not in markers for host_id in ready)

        fqdns = {r["fqdn"] for r in live.values()}
        foreman = self.lab.foreman_hosts()
        satellite = self.lab.satellite_systems()
        result.orphans = sum(name not in fqdns for name in foreman) + sum(name not in fqdns for name in satellite)
        result.missing += sum(r["fqdn"] not in foreman for r in ready.values())
        result.missing += sum(r["fqdn"] not in satellite for r in ready.values())

        result.redone = _interrupted_steps(daemon.db_query("SELECT * FROM events WHERE id > ?", (first_event,)))


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
    parser.add_argument("--workers", type=int, default=16, help="[engine] workers of the daemon")
    parser.add_argument("--workdir", type=Path, help="where the lab lives (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (logs, database) afterwards")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hosts < 1 or args.rounds < 1 or args.max_kills < 1:
        print("lab.crash: --hosts, --rounds and --max-kills must be at least 1", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="governord-crash-"))
    print(f"crash harness: {args.rounds} rounds of {args.hosts} hosts up and down, seed {args.seed}, "
          f"lab in {workdir}", flush=True)
    try:
        with Lab(workdir) as lab:
            start_lab(lab, vcsim_delay_ms=args.vcsim_delay_ms)
            results = CrashHarness(lab, hosts=args.hosts, seed=args.seed, max_kills=args.max_kills,
                                   window=args.window, workers=args.workers).run(args.rounds)
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
