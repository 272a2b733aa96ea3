"""Prometheus metrics, named by Prometheus' rules: base units (seconds, Unix time in seconds),
counters ending in ``_total``, one ``_info`` series carrying the build's labels.

What is counted as it happens (every instance its own; ``sum`` across the fleet as usual):

- ``governord_host_transitions_total{from_state,to_state}``: committed host transitions;
- ``governord_hook_calls_total`` and ``governord_hook_failures_total{hook,plugin,provider,registrar}``:
  finished plugin calls and failed ones. ``provider`` names the provider instance
  (``[providers.NAME]``) a provisioning hook (provision, deprovision, list machines) was called
  for, ``registrar`` the registrar instance (``[registrars.NAME]``) whose plugin answered; each
  is empty where it does not apply (a site plugin's ``host_event``);
- ``governord_hook_duration_seconds{hook,plugin,provider,registrar}`` (histogram): how long each
  call of the hooks that do a step's work took (provision, deprovision, prepare, register,
  readiness check, deregister), failed or not: each registrar instance's part of a step;
- ``governord_step_duration_seconds{step,provider}`` (histogram), ``governord_step_retries_total``
  and ``governord_step_failures_total{step,provider}``: each run of a host's step that succeeded,
  each failure that will be tried again, each failure for good (the host rolled back or kept
  failed); the two counters start at 0 for every step and provider instance of the config. ``provider`` is the host's provider instance for the steps that call it
  (``provision``, ``deprovision``) and empty for the others, which call every registrar at once
  (each registrar's part is in the hook series). ``configure`` is timed from when the host
  entered ``configuring`` to when it was found ready: the wait, not the last poll;
- ``governord_decisions_total{app,kind,outcome,rule}``: decisions committed (``kind`` scale or
  release; ``outcome`` accepted, declined, pending, and for a pending request denied or
  expired; ``rule`` the rule that decided: max_hosts, min_hosts, cooldown, placement, approval,
  deletion_policy, nothing, release, cancel, unmade, operator, approval_expiry). A repeated
  idempotency key is no new decision;
- ``governord_api_refusals_total{reason,stage}``: refused or cut clients of the application API.

What is known only at scrape time is read then: ``governord_fenced_writes_refused_total`` and
``governord_steps_taken_over_total`` (the engine's own counts), ``governord_steps_in_flight``,
``governord_engine_workers``, ``governord_leader``, ``governord_store_up``,
``governord_certificate_expiry_timestamp_seconds{certificate}`` (``ca``: governord's CA;
``server``: the application API's server certificate; ``client_ca``: the site CA of
``api.tls.client_ca``, its soonest to expire if the file holds several; each file parsed again
only when it changed), ``governord_client_crl_next_update_timestamp_seconds`` (with
``api.tls.client_crl``: the soonest next update of its CRLs; past it, the CA's clients are
refused) and ``governord_build_info{version,python}``.

In a fleet every instance is scraped. What describes the whole fleet is the same read on every
instance, so only the leader reports it: a ``sum`` over the fleet counts it once, and a
failover moves it with the leader lease. These are

- ``governord_hosts{app,role,provider,state}``: live hosts (gone ones are history: see the
  transitions to ``gone``), every live state of each app, role and provider the config places
  hosts on or that has a host, zeros included. The cost: one grouped read of the live hosts per
  scrape of the leader, through the partial index of live hosts, never the gone ones' history
  (at 10,000 live hosts beside 10,000 gone ones, a median of 13 ms on PostgreSQL and 30 ms on
  SQLite on the shared 2-core test machine: ``python -m bench.metrics_scrape``, bench/RESULTS.md);
- ``governord_fleet_instances{status}``: instances sharing the store, up, lost or stopped;
- ``governord_requests_pending{app}`` (every configured application) and
  ``governord_request_pending_oldest_timestamp_seconds{app}`` (only those with one waiting): the
  requests waiting for an operator's approval, and when the oldest was made. One grouped read
  of the requests the retention keeps (2-3 ms for 1,000).

``governord_store_up`` (every instance) says whether the store answers this instance (the
health check's, see :meth:`Store.health <governord.store.Store.health>`); while it does not,
``/metrics`` still answers, the fleet-wide series as last read.

The sweep's series (``governord_sweep_*``) are registered by :mod:`governord.engine.sweep`, the
rate limits' by :mod:`governord.api.ratelimit`, on this registry.

Labels are never named ``instance`` or ``job``: Prometheus gives every scraped series those (the
target), and would rename ours ``exported_instance``."""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .engine import STEP_OF_STATE
from .models import HostState
from .store import unavailable

if TYPE_CHECKING:
    from .api.tls import ApplicationTLS
    from .config import Config
    from .dispatch import Dispatcher, Outcome
    from .engine import Engine
    from .fleet import Fleet
    from .store import Row, Store

# no ``_created`` series beside each counter and histogram: twice the series for a start time
# that ``process_start_time_seconds``-style restarts already tell (rate() handles resets)
disable_created_metrics()

#: hooks whose call is for one provider instance: the host's, or the one named
_PROVIDER_HOOKS = frozenset({"governord_provision_host", "governord_deprovision_host"})
#: steps that call the host's provider instance
_PROVIDER_STEPS = frozenset({"provision", "deprovision"})
#: seconds; a step may take from milliseconds (a registrar's upsert) to most of an hour (a
#: bare-metal machine's install, a Puppet run waited for)
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
#: the hooks that do a step's work at a provider or registrar, timed per call (the others list,
#: classify or notify)
TIMED_HOOKS = frozenset({"governord_provision_host", "governord_deprovision_host", "governord_prepare_host",
                         "governord_register_host", "governord_check_host_ready", "governord_deregister_host"})
#: seconds; fewer buckets than a step's: one series set per hook and instance
HOOK_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 1800)


def hook_target(hook: str, plugin: str, kwargs: dict[str, Any]) -> tuple[str, str]:
    """(provider instance, registrar instance) a hook call was made for, each "" if none."""
    provider = ""
    if hook in _PROVIDER_HOOKS:
        provider = getattr(kwargs.get("host"), "provider", None) or ""
    elif hook == "governord_list_machines":
        provider = str(kwargs.get("provider") or "")
    registrar = plugin.removeprefix("registrar:") if plugin.startswith("registrar:") else ""
    return provider, registrar


@dataclass
class _Fleetwide:
    """The leader's last read of what describes the whole fleet."""

    hosts: list[tuple[str, str, str, str, int]] = field(default_factory=list)
    instances: dict[str, int] = field(default_factory=dict)
    pending: dict[str, tuple[int, float]] = field(default_factory=dict)


class _Certificates:
    """The soonest expiry in a PEM file, read again only when the file changed."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[tuple[int, int, int], float | None]] = {}

    def not_after(self, path: Path) -> float | None:
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        seen = self._seen.get(path)
        if seen is not None and seen[0] == key:
            return seen[1]
        try:
            found = [c.not_valid_after_utc.timestamp() for c in x509.load_pem_x509_certificates(path.read_bytes())]
        except (OSError, ValueError):
            found = []
        soonest = min(found) if found else None
        self._seen[path] = (key, soonest)
        return soonest


class _ScrapeTimeCollector(Collector):
    """The series read at scrape time: the fleet-wide ones (leader only), the engine's own
    counts, the certificates."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield CounterMetricFamily("governord_fenced_writes_refused",
                                  "Host writes refused because this instance's lease on the host was lost "
                                  "(a stale fencing token)", value=m.engine.fenced_out)
        yield CounterMetricFamily("governord_steps_taken_over",
                                  "Steps stopped because another instance claimed their host after this "
                                  "instance's lease ran out", value=m.engine.taken_over)
        if m.fleet.is_leader:
            yield from self._fleetwide(m.fleetwide)
        yield from self._certificates()

    def _fleetwide(self, read: _Fleetwide) -> Iterator[Metric]:
        hosts = GaugeMetricFamily("governord_hosts", "Live hosts by application, role, provider instance and state "
                                  "(fleet-wide: reported by the leader only)",
                                  labels=["app", "role", "provider", "state"])
        counts = {(app, role, provider, state): n for app, role, provider, state, n in read.hosts}
        configured = {(app, role, placement.provider)
                      for app, section in self.metrics.engine.config.applications.items()
                      for role, cfg in section.roles.items() for placement in cfg.effective_placements()}
        for app, role, provider in sorted({key[:3] for key in counts} | configured):
            for state in HostState:
                if state is not HostState.GONE:
                    hosts.add_metric([app, role, provider, state.value],
                                     counts.get((app, role, provider, state.value), 0))
        yield hosts
        instances = GaugeMetricFamily("governord_fleet_instances", "Instances sharing the store by status: up, "
                                      "lost, stopped (reported by the leader only)", labels=["status"])
        for status in ("up", "lost", "stopped"):
            instances.add_metric([status], read.instances.get(status, 0))
        yield instances
        pending = GaugeMetricFamily("governord_requests_pending", "Requests waiting for an operator's approval, "
                                    "by application (reported by the leader only)", labels=["app"])
        oldest = GaugeMetricFamily("governord_request_pending_oldest_timestamp_seconds",
                                   "When the application's oldest request waiting for approval was made "
                                   "(reported by the leader only)", labels=["app"])
        for app in sorted(set(self.metrics.engine.config.applications) | set(read.pending)):
            waiting, since = read.pending.get(app, (0, 0.0))
            pending.add_metric([app], waiting)
            if waiting:
                oldest.add_metric([app], since)
        yield pending
        yield oldest

    def _certificates(self) -> Iterator[Metric]:
        m = self.metrics
        expiry = GaugeMetricFamily("governord_certificate_expiry_timestamp_seconds",
                                   "When a certificate governord serves or trusts expires (its soonest, for a "
                                   "file of several): ca (governord's own CA), server (the application API's), "
                                   "client_ca (the site CA of api.tls.client_ca)", labels=["certificate"])
        files: dict[str, Path] = {"ca": m.ca_path} if m.ca_path is not None else {}
        tls = m.tls
        if tls is not None:
            files["server"] = Path(tls.certificate)
            if m.ca_path is None or tls.client_ca.resolve() != m.ca_path.resolve():
                files["client_ca"] = tls.client_ca
        for name, path in files.items():
            if (not_after := m.certificates.not_after(path)) is not None:
                expiry.add_metric([name], not_after)
        yield expiry
        if tls is not None and tls.crl is not None:
            updates = [crl.next_update_utc.timestamp() for crl in tls.crl.crls if crl.next_update_utc is not None]
            if updates:
                yield GaugeMetricFamily("governord_client_crl_next_update_timestamp_seconds",
                                        "The soonest next update of the site CA's CRLs (api.tls.client_crl): "
                                        "past it, that CA's clients are refused", value=min(updates))


class Metrics:
    def __init__(self, store: Store, dispatcher: Dispatcher, engine: Engine, fleet: Fleet) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.engine = engine
        self.fleet = fleet
        #: governord's CA certificate (the runtime sets it) and the application API's TLS (the
        #: daemon sets it once it listens): their certificates' expiry is reported
        self.ca_path: Path | None = None
        self.tls: ApplicationTLS | None = None
        self.certificates = _Certificates()
        self.fleetwide = _Fleetwide()
        self.registry = CollectorRegistry()
        registry = self.registry
        Info("governord_build", "The running governord's version and Python", registry=registry).info(
            {"version": __version__, "python": platform.python_version()})
        self.leader = Gauge("governord_leader", "1 if this instance holds the fleet's leader lease",
                            registry=registry)
        self.store_up = Gauge("governord_store_up", "1 while the store (the database) answers, 0 while it cannot be "
                              "reached", registry=registry)
        self.in_flight = Gauge("governord_steps_in_flight", "Hosts whose steps this instance runs now",
                               registry=registry)
        self.workers = Gauge("governord_engine_workers", "How many hosts this instance works on at once at most "
                             "([engine] workers)", registry=registry)
        self.transitions = Counter("governord_host_transitions", "Committed host state transitions",
                                   ["from_state", "to_state"], registry=registry)
        hook_labels = ["hook", "plugin", "provider", "registrar"]
        self.hook_calls = Counter("governord_hook_calls", "Finished hook calls per plugin, and the provider or "
                                  "registrar instance the call was for", hook_labels, registry=registry)
        self.hook_failures = Counter("governord_hook_failures", "Failed hook calls per plugin, and the provider or "
                                     "registrar instance the call was for", hook_labels, registry=registry)
        self.hook_duration = Histogram("governord_hook_duration_seconds", "How long a call of a hook that does "
                                       "a step's work took, per plugin and provider or registrar instance",
                                       hook_labels, buckets=HOOK_BUCKETS, registry=registry)
        self.step_duration = Histogram("governord_step_duration_seconds", "How long a host's step took when it "
                                       "succeeded (configure: the wait for readiness), by step and provider "
                                       "instance (provision, deprovision)", ["step", "provider"],
                                       buckets=STEP_BUCKETS, registry=registry)
        self.step_retries = Counter("governord_step_retries", "Step failures that will be tried again",
                                    ["step", "provider"], registry=registry)
        self.step_failures = Counter("governord_step_failures", "Steps failed for good (the host rolled back, or "
                                     "kept failed)", ["step", "provider"], registry=registry)
        self.decisions = Counter("governord_decisions", "Committed decisions on requests, by application, kind, "
                                 "outcome and the rule that decided", ["app", "kind", "outcome", "rule"],
                                 registry=registry)
        self.api_refusals = Counter(
            "governord_api_refusals",
            "Connections and requests the application API refused or cut, by reason (e.g. unknown_ca, expired, "
            "revoked_by_crl, too_many_connections, handshake_timeout, request_timeout) and stage (connection: "
            "over a cap, no request in time or out of descriptors; handshake: the TLS handshake failed or timed "
            "out; request: refused before the rules, or its body did not arrive in time)",
            ["reason", "stage"], registry=registry,
        )
        registry.register(_ScrapeTimeCollector(self))
        self.configure(engine.config)
        engine.on_transition.append(self.transition)
        engine.on_step.append(self.stepped)
        dispatcher.on_call.append(self.hook_called)

    def configure(self, config: Config) -> None:
        """Start the step counters of every step and provider instance at 0 (a new config's
        too): a counter that appears only at its first increment shows no increase to the
        alerts that watch it (``increase()`` needs two samples)."""
        for step in STEP_OF_STATE.values():
            for provider in (config.providers if step in _PROVIDER_STEPS else ("",)):
                self.step_retries.labels(step, provider)
                self.step_failures.labels(step, provider)

    # -- counted as it happens ---------------------------------------------------------------

    def refused(self, reason: str, stage: str) -> None:
        """Count one refusal of the application API."""
        self.api_refusals.labels(reason, stage).inc()

    def transition(self, row: Row, previous: str) -> None:
        self.transitions.labels(previous, row["state"]).inc()

    def hook_called(self, hook: str, plugin: str, kwargs: dict[str, Any], outcome: Outcome) -> None:
        labels = (hook, plugin, *hook_target(hook, plugin, kwargs))
        self.hook_calls.labels(*labels).inc()
        if outcome.error is not None:
            self.hook_failures.labels(*labels).inc()
        if hook in TIMED_HOOKS:
            self.hook_duration.labels(*labels).observe(outcome.duration)

    def stepped(self, row: Row, step: str, seconds: float, outcome: str) -> None:
        provider = (row["provider"] or "") if step in _PROVIDER_STEPS else ""
        if outcome == "done":
            if step == "configure" and row.get("state_since"):
                seconds = max(0.0, time.time() - row["state_since"])
            self.step_duration.labels(step, provider).observe(seconds)
        elif outcome == "retry":
            self.step_retries.labels(step, provider).inc()
        elif outcome == "failed":
            self.step_failures.labels(step, provider).inc()

    def decided(self, app: str, kind: str, outcome: str, rule: str) -> None:
        self.decisions.labels(app, kind, outcome, rule).inc()

    # -- read at scrape time -----------------------------------------------------------------

    async def render(self) -> bytes:
        up = await self.store.health() is None
        if self.fleet.is_leader and up:
            try:
                read = _Fleetwide(
                    hosts=await self.store.count_live_hosts(),
                    instances=_by_status(await self.fleet.members()),
                    pending=await self.store.pending_by_app(),
                )
            except Exception as exc:
                if unavailable(exc) is None:
                    raise
                up = False  # gone since the health check: the series stay as last read
            else:
                self.fleetwide = read
        self.store_up.set(1 if up else 0)
        self.leader.set(1 if self.fleet.is_leader else 0)
        self.in_flight.set(self.engine.in_flight)
        self.workers.set(self.engine.config.engine.workers)
        return generate_latest(self.registry)


def _by_status(members: list[Row]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for member in members:
        counts[member["status"]] = counts.get(member["status"], 0) + 1
    return counts
