"""A fleet in the lab: several governord instances sharing one PostgreSQL database.

    fleet = GovernordFleet(lab, postgres_url, instances=3, lease_seconds=6.0)
    fleet.start_all()
    fleet.daemons["gov-2"].ctl("status")
    fleet.kill("gov-1")
    fleet.start("gov-1")

Each instance has its own ``[fleet] instance`` name, state directory, admin socket and API port
(:meth:`Lab.write_config` puts its files under ``workdir/NAME``), and all of them the same
database and the same CA: the first instance makes the CA at its first start, and its ``pki``
directory is copied into each other instance's state directory before that one first starts,
which is how an operator shares the CA key among the instances. The fleet's quick timings
(``heartbeat`` 1 s, ``leader_lease`` 4 s, and the ``lease_seconds`` given) make takeovers happen
in seconds.
"""

from __future__ import annotations

import shutil
import signal
import time
from typing import Any

from .stack import Governord, Lab, PostgresView


class GovernordFleet:
    """N governord processes on one PostgreSQL database, started, killed and restarted by name."""

    def __init__(self, lab: Lab, store_url: str, *, instances: int = 3, prefix: str = "gov",
                 **config: Any) -> None:
        self.lab = lab
        self.names = [f"{prefix}-{number}" for number in range(1, instances + 1)]
        self.configs = {name: lab.write_config(name, store_url=store_url, **config) for name in self.names}
        self.store: PostgresView = lab.postgres_view(store_url)
        #: the latest process of each instance started so far
        self.daemons: dict[str, Governord] = {}

    # -- processes ----------------------------------------------------------------------------

    def start(self, name: str, *, wait_ready: bool = True) -> Governord:
        """Start (or restart) the instance ``name``; its first start gets the CA of the first
        instance, which must have started once already."""
        config = self.configs[name]
        pki = config.parent / "state" / "pki"
        first = self.names[0]
        if name != first and not pki.exists():
            source = self.configs[first].parent / "state" / "pki"
            if not (source / "ca.key").exists():
                raise RuntimeError(f"start {first} first: it makes the CA the others share")
            pki.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, pki)
        daemon = self.lab.start_governord(config, wait_ready=wait_ready)
        self.daemons[name] = daemon
        return daemon

    def start_all(self) -> dict[str, Governord]:
        """Start every instance: the first alone (it migrates the database and makes the CA),
        then the others together."""
        self.start(self.names[0])
        for name in self.names[1:]:
            self.start(name, wait_ready=False)
        for name in self.names[1:]:
            self.daemons[name].wait_notification("READY=1", timeout=120)
        return self.daemons

    def running(self) -> list[str]:
        return [name for name, daemon in self.daemons.items() if daemon.process.poll() is None]

    def kill(self, name: str) -> None:
        """SIGKILL the instance: no clean stop, its leases stay until they run out."""
        self.daemons[name].kill()

    def pause(self, name: str) -> None:
        self.daemons[name].signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.daemons[name].signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop every running instance cleanly (a paused one is resumed first)."""
        for name in self.running():
            self.resume(name)
        for name in self.running():
            self.daemons[name].stop()

    # -- what the store says ----------------------------------------------------------------

    def hosts(self) -> list[dict[str, Any]]:
        return self.store.query("SELECT * FROM hosts")

    def events(self, after: int = 0) -> list[dict[str, Any]]:
        return self.store.query("SELECT * FROM events WHERE id > :after ORDER BY id", {"after": after})

    def instances(self) -> dict[str, dict[str, Any]]:
        """The ``instances`` rows by name."""
        return {row["name"]: row for row in self.store.query("SELECT * FROM instances")}

    def leader(self) -> str | None:
        """The instance holding a live leader lease, by the database (None: nobody)."""
        rows = self.store.query("SELECT holder FROM fleet_leases WHERE name = 'leader' AND expires_at >= :now",
                                {"now": time.time()})
        if not rows or rows[0]["holder"] is None:
            return None
        return str(rows[0]["holder"]).rsplit("/", 1)[0]

    def metric(self, name: str, metric: str) -> float | None:
        """The value of an unlabelled metric on the instance's ``/metrics`` (None: not there)."""
        status, body = self.daemons[name].admin_get("/metrics")
        if status != 200:
            raise RuntimeError(f"{name}: /metrics answered {status}")
        for line in body.splitlines():
            if line.startswith(metric + " "):
                return float(line.split()[1])
        return None


__all__ = ["GovernordFleet"]
