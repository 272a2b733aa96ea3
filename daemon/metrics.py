"""Prometheus metrics. Host counts by state are read at scrape time from the counts the database
keeps by triggers (``state_counts``: a few rows, no scan of the hosts), so they are right after a
restart and whoever changed the hosts; transitions, hook failures and the application API's
refusals are counted as they happen.

In a fleet every instance is scraped. What each instance does (its transitions, steps, hook
calls, refusals, fenced writes) is its own series, summed across instances by Prometheus as
usual. What describes the whole fleet (hosts by state, instances by status) is the same read on
every instance, so only the leader reports it: a ``sum`` over the fleet counts it once, and a
failover moves it with the leader lease.

``governord_store_up`` (every instance) says whether the store answers this instance (the
health check's, see :meth:`Store.health <governord.store.Store.health>`); while it does not,
``/metrics`` still answers, the fleet-wide series as last read."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from .models import HostState
from .store import unavailable

if TYPE_CHECKING:
    from .dispatch import Dispatcher
    from .engine import Engine
    from .fleet import Fleet
    from .store import Row, Store


class Metrics:
    def __init__(self, store: Store, dispatcher: Dispatcher, engine: Engine, fleet: Fleet) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.engine = engine
        self.fleet = fleet
        self.registry = CollectorRegistry()
        self.hosts = Gauge("governord_hosts", "Hosts by lifecycle state (fleet-wide: reported by the leader only)",
                           ["state"], registry=self.registry)
        self.instances = Gauge("governord_fleet_instances",
                               "Instances sharing the store by status: up, lost, stopped (reported by the leader only)",
                               ["status"], registry=self.registry)
        self.leader = Gauge("governord_leader", "1 if this instance holds the fleet's leader lease",
                            registry=self.registry)
        self.fenced_out = Gauge("governord_fenced_writes_refused",
                                "Host writes refused since start because this instance's lease on the host was lost "
                                "(a stale fencing token)", registry=self.registry)
        self.taken_over = Gauge("governord_steps_taken_over",
                                "Steps stopped since start because another instance claimed their host after this "
                                "instance's lease ran out", registry=self.registry)
        self.transitions = Counter(
            "governord_host_transitions_total", "Committed host state transitions", ["from_state", "to_state"],
            registry=self.registry,
        )
        self.hook_calls = Gauge(
            "governord_hook_calls", "Hook calls per plugin since start", ["hook", "plugin"], registry=self.registry
        )
        self.hook_failures = Gauge(
            "governord_hook_failures", "Failed hook calls per plugin since start", ["hook", "plugin"],
            registry=self.registry,
        )
        self.in_flight = Gauge("governord_steps_in_flight", "Host steps running now", registry=self.registry)
        self.store_up = Gauge("governord_store_up", "1 while the store (the database) answers, 0 while it cannot be "
                              "reached", registry=self.registry)
        self.api_refusals = Counter(
            "governord_api_refusals",
            "Connections and requests the application API refused or cut, by reason (e.g. unknown_ca, expired, "
            "revoked_by_crl, too_many_connections, handshake_timeout, request_timeout) and stage (connection: "
            "over a cap, no request in time or out of descriptors; handshake: the TLS handshake failed or timed "
            "out; request: refused before the rules, or its body did not arrive in time)",
            ["reason", "stage"], registry=self.registry,
        )

    def refused(self, reason: str, stage: str) -> None:
        """Count one refusal of the application API."""
        self.api_refusals.labels(reason, stage).inc()

    def transition(self, row: Row, previous: str) -> None:
        self.transitions.labels(previous, row["state"]).inc()

    async def render(self) -> bytes:
        up = await self.store.health() is None
        if not self.fleet.is_leader:
            self.hosts.clear()
            self.instances.clear()
        elif up:
            try:
                counts = await self.store.count_by_state()
                members = await self.fleet.members()
            except Exception as exc:
                if unavailable(exc) is None:
                    raise
                up = False  # gone since the health check: the series stay as last read
            else:
                for state in HostState:
                    self.hosts.labels(state.value).set(counts.get(state.value, 0))
                for status in ("up", "lost", "stopped"):
                    self.instances.labels(status).set(sum(1 for m in members if m["status"] == status))
        self.store_up.set(1 if up else 0)
        self.leader.set(1 if self.fleet.is_leader else 0)
        self.fenced_out.set(self.engine.fenced_out)
        self.taken_over.set(self.engine.taken_over)
        for (hook, plugin), (calls, failures) in self.dispatcher.stats.items():
            self.hook_calls.labels(hook, plugin).set(calls)
            self.hook_failures.labels(hook, plugin).set(failures)
        self.in_flight.set(self.engine.in_flight)
        return generate_latest(self.registry)
