"""The sweep: what governord recorded, compared with what exists, reconciled as the config says.

Three kinds of finding:

leaked
    a machine carrying governord's ownership marker whose host has no live record: no host row
    with the marker's id, or a row that is ``gone``.
vanished
    a ``ready`` or ``draining`` host governord provisioned whose machine its provider no longer
    has. A draining host was leaving anyway: ``fail`` and ``retire`` both retire it (there is
    nothing left to drain, and no reason to make it a new machine).
orphaned
    a registration (Foreman host, Satellite profile, Puppet certificate, PuppetDB node, ...)
    carrying the marker of a host that is gone, or that governord never had.

A dry run lists the findings and changes nothing. A real run acts as ``[sweep.policy]`` says:
destroy leaked machines, fail or retire vanished hosts, remove orphaned entries, or only report;
every action is an audit event (``sweep-*``), and each run with findings leaves a ``sweep``
event with all of them.

The engine keeps running meanwhile, so the sweep judges only what holds still:

- Providers and registrars are listed first and the store is read afterwards. A host's row is
  committed before its machine or any entry is made, so every marker found has its row in view.
- A row is judged only when it is not leased, has been in its state since before the listing
  began (a host that became ready, or gone, while the listing ran is left for the next sweep),
  and neither its creation nor its last transition is more recent than ``grace`` seconds.
- A listing that failed is never read as "nothing there": no host on that provider is judged
  vanished. Before a vanished host is acted on its provider is listed again, and the host is
  changed only if its row is still exactly as judged (same state since the same moment).
- Leaked machines are destroyed by their marker (every machine carrying that host id on that
  provider, nothing else); orphans are removed by the system's own id and only while they still
  carry the marker that was listed. Adopted hosts are never destroyed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..dispatch import Dispatcher, Outcome, describe_error
from ..fleet import SWEEP, Busy, Fleet, Lease
from ..models import OWNERSHIP_KEY, HostOrigin, HostState, HostView, Machine
from ..registrars import Registration
from ..store import Row, Store, host_view, log_failed

if TYPE_CHECKING:
    from ..config import Config
    from . import Engine

log = logging.getLogger(__name__)

#: Rows read per query when the sweep looks up the host ids it found in markers.
_ID_CHUNK = 500


@dataclass
class Finding:
    """One thing the sweep found that the records and the other side disagree on."""

    #: leaked, vanished or orphaned
    kind: str
    #: the provider or registrar instance where it was found
    where: str
    #: the governord host id (from the marker, or the host's row)
    host_id: str
    #: the machine's, entry's or host's name
    name: str
    #: the machine id, or the system's own id of the entry
    ident: str
    #: the host's state in governord's records, or "none" when it has no row
    record: str
    reason: str
    #: what was (or, in a dry run, would be) done
    action: str = "none"


@dataclass
class SweepReport:
    dry_run: bool
    started_at: float
    finished_at: float = 0.0
    policy: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    #: listings that failed (their absence judgements were skipped) and actions that failed
    errors: list[dict[str, str]] = field(default_factory=list)
    #: how many marked machines per provider and entries per registrar were listed
    checked: dict[str, dict[str, int]] = field(default_factory=lambda: {"providers": {}, "registrars": {}})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Listing:
    """What one hook listing returned over all implementations, and whether it is complete."""

    where: str
    items: list[Any]
    complete: bool
    error: str | None = None


class SweepMetrics:
    """The sweep's Prometheus series, on the daemon's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.findings = Gauge("governord_sweep_findings", "Findings of the latest sweep, by kind", ["kind"],
                              registry=registry)
        self.errors = Gauge("governord_sweep_errors", "Failed listings and actions of the latest sweep",
                            registry=registry)
        self.actions = Counter("governord_sweep_actions_total", "Sweep actions taken, by kind and outcome",
                               ["kind", "outcome"], registry=registry)
        self.last_run = Gauge("governord_sweep_last_run_timestamp_seconds", "When the latest sweep finished",
                              registry=registry)
        self.duration = Gauge("governord_sweep_last_duration_seconds", "How long the latest sweep took",
                              registry=registry)
        for kind in ("leaked", "vanished", "orphaned"):
            self.findings.labels(kind).set(0)

    def record(self, report: SweepReport) -> None:
        for kind in ("leaked", "vanished", "orphaned"):
            self.findings.labels(kind).set(sum(1 for f in report.findings if f.kind == kind))
        self.errors.set(len(report.errors))
        self.last_run.set(report.finished_at)
        self.duration.set(report.finished_at - report.started_at)


def _marker(host_id: str) -> str:
    return f"{OWNERSHIP_KEY}={host_id}"


class Sweeper:
    """Runs sweeps on demand and every ``[sweep] interval`` seconds; one at a time."""

    def __init__(self, store: Store, dispatcher: Dispatcher, engine: Engine, config: Config,
                 registry: CollectorRegistry, fleet: Fleet) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.engine = engine
        self.config = config
        #: periodic sweeps run on the fleet's leader; every sweep holds the fleet's sweep lease
        self.fleet = fleet
        self._lease: Lease | None = None
        self.metrics = SweepMetrics(registry)
        self._lock = asyncio.Lock()
        self._reconfigured = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- running --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic sweeps (the first one ``interval`` seconds from now)."""
        if self._task is None:
            self._task = asyncio.create_task(self._periodic(), name="sweep")

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config; the periodic timer starts again with its interval."""
        self.config = config
        self._reconfigured.set()

    async def stop(self) -> None:
        """Stop the periodic sweeps; a sweep under way is cancelled (every action is idempotent,
        and a host's change is one transaction)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _periodic(self) -> None:
        while True:
            self._reconfigured.clear()
            interval = self.config.sweep.interval
            try:
                if interval <= 0:
                    await self._reconfigured.wait()
                    continue
                await asyncio.wait_for(self._reconfigured.wait(), timeout=interval)
                continue  # reloaded: wait the (new) interval afresh
            except TimeoutError:
                pass
            if not self.fleet.is_leader:
                continue  # the leader sweeps for the fleet
            try:
                report = await self.run(dry_run=False, actor="governord")
            except Busy as busy:
                log.info("periodic sweep skipped: %s", busy)
                continue
            except Exception as exc:  # noqa: BLE001 - a failed sweep must not end the periodic ones
                log_failed(log, "sweep", exc)
                continue
            if report.findings or report.errors:
                log.warning("sweep: %d findings, %d errors", len(report.findings), len(report.errors),
                            extra={"findings": len(report.findings), "errors": len(report.errors)})

    # -- one sweep ------------------------------------------------------------------------

    async def run(self, *, dry_run: bool, actor: str) -> SweepReport:
        """Compare, and unless ``dry_run`` act as the policy says. Returns what was found and done.
        Raises Busy if a sweep runs on another instance of the fleet now."""
        async with self._lock, self.fleet.exclusive(SWEEP) as lease:
            self._lease = lease
            try:
                report = await self._sweep(dry_run=dry_run, actor=actor)
            finally:
                self._lease = None
        self.metrics.record(report)
        return report

    async def _sweep(self, *, dry_run: bool, actor: str) -> SweepReport:
        config = self.config
        policy = config.sweep.policy
        report = SweepReport(dry_run=dry_run, started_at=time.time(), policy=policy.model_dump())
        listed_at = time.time()

        # every provider and registrar is listed at once (each within its own concurrency limit)
        providers, systems = sorted(config.providers), list(config.registrars)
        listings = await asyncio.gather(
            *(self._list("governord_list_machines", f"provider {p}", provider=p) for p in providers),
            *(self._list("governord_list_registrations", f"registrar {s}", system=s) for s in systems),
        )
        machines: dict[str, _Listing] = dict(zip(providers, listings[:len(providers)], strict=True))
        entries: dict[str, _Listing] = dict(zip(systems, listings[len(providers):], strict=True))
        report.checked["providers"] = {name: len(listing.items) for name, listing in machines.items()}
        report.checked["registrars"] = {name: len(listing.items) for name, listing in entries.items()}
        for listing in listings:
            if listing.error:
                report.errors.append({"where": listing.where, "error": listing.error})

        # Read only now: every marker listed above was written after its host's row was committed.
        marked = {m.host_id for listing in machines.values() for m in listing.items if m.host_id}
        marked |= {e.host_id for listing in entries.values() for e in listing.items}
        rows = await self._rows(marked)
        now = time.time()

        leaked: list[tuple[Finding, Machine, Row | None]] = []
        for provider, listing in machines.items():
            for machine in listing.items:
                found = self._judge_leaked(provider, machine, rows.get(machine.host_id or ""), listed_at, now)
                if found is not None:
                    leaked.append((found, machine, rows.get(machine.host_id or "")))

        vanished: list[tuple[Finding, Row]] = []
        live = await self.store.list_hosts(states=[HostState.READY.value, HostState.DRAINING.value])
        for row in live:
            if row["origin"] != HostOrigin.PROVISIONED.value or not row["provider"]:
                continue
            on_provider = machines.get(row["provider"])
            if on_provider is None:
                report.errors.append({"where": f"provider {row['provider']}",
                                      "error": f"host {row['name']} is on provider {row['provider']}, which is not "
                                               "configured: not checked"})
                continue
            if not on_provider.complete or not self._settled(row, listed_at, now):
                continue
            if any(m.host_id == row["id"] for m in on_provider.items):
                continue
            finding = Finding("vanished", row["provider"], row["id"], row["name"], row["machine_id"] or "-",
                              row["state"], f"provider {row['provider']} has no machine with {_marker(row['id'])}")
            vanished.append((finding, row))

        orphans: list[tuple[Finding, Registration]] = []
        for system, listing in entries.items():
            for entry in listing.items:
                found = self._judge_orphan(system, entry, rows.get(entry.host_id), listed_at, now)
                if found is not None:
                    orphans.append((found, entry))

        findings = [f for f, _, _ in leaked] + [f for f, _ in vanished] + [f for f, _ in orphans]
        if dry_run:
            for finding in findings:
                finding.action = self._intent(finding.kind, policy.model_dump()[finding.kind])
        else:
            # machines first: a PuppetDB node stays deactivated only once its machine is gone
            for finding, machine, owner in leaked:
                await self._clean_leaked(finding, machine, owner, policy.leaked, actor, report)
            await self._handle_vanished(vanished, policy.vanished, actor, report)
            for finding, entry in orphans:
                await self._clean_orphan(finding, entry, policy.orphaned, actor, report)

        report.findings = findings
        report.finished_at = time.time()
        if not dry_run and (report.findings or report.errors or actor != "governord"):
            await self._audit("sweep", actor, None, {
                "findings": [asdict(f) for f in report.findings], "errors": report.errors,
                "checked": report.checked, "policy": report.policy,
            })
        log.info("sweep%s: %d findings, %d errors", " (dry run)" if dry_run else "", len(report.findings),
                 len(report.errors), extra={"dry_run": dry_run, "actor": actor})
        return report

    # -- listing and reading --------------------------------------------------------------

    async def _list(self, hook: str, where: str, **kwargs: Any) -> _Listing:
        outcomes: list[Outcome] = await self.dispatcher.collect(hook, **kwargs)
        items = [item for o in outcomes if o.ok and o.value is not None for item in o.value]
        failed = [o for o in outcomes if not o.ok]
        answered = [o for o in outcomes if o.ok and o.value is not None]
        if failed:
            return _Listing(where, items, False, "listing failed: " + "; ".join(describe_error(o) for o in failed))
        if not answered:
            return _Listing(where, items, False, "no plugin can list it")
        return _Listing(where, items, True)

    async def _rows(self, ids: Iterable[str]) -> dict[str, Row]:
        wanted = sorted(ids)
        rows: dict[str, Row] = {}
        for start in range(0, len(wanted), _ID_CHUNK):
            for row in await self.store.list_hosts(ids=wanted[start:start + _ID_CHUNK]):
                rows[row["id"]] = row
        return rows

    def _settled(self, row: Row, listed_at: float, now: float) -> bool:
        """Not in flight, unchanged since before the listing, and older than the grace period."""
        if row["lease_owner"] is not None:
            return False
        since = row["state_since"] or row["updated_at"]
        grace = self.config.sweep.grace
        return since <= listed_at and since <= now - grace and row["created_at"] <= now - grace

    # -- judging --------------------------------------------------------------------------

    def _judge_leaked(self, provider: str, machine: Machine, row: Row | None, listed_at: float,
                      now: float) -> Finding | None:
        if not machine.host_id:
            return None
        if row is None:
            return Finding("leaked", provider, machine.host_id, machine.name, machine.machine_id, "none",
                           f"carries {_marker(machine.host_id)}, a host governord has no record of")
        if row["state"] != HostState.GONE.value or row["origin"] == HostOrigin.ADOPTED.value:
            return None
        if not self._settled(row, listed_at, now):
            return None
        return Finding("leaked", provider, machine.host_id, machine.name, machine.machine_id, row["state"],
                       f"carries {_marker(machine.host_id)}, of host {row['name']}, which is gone")

    def _judge_orphan(self, system: str, entry: Registration, row: Row | None, listed_at: float,
                      now: float) -> Finding | None:
        if row is None:
            return Finding("orphaned", system, entry.host_id, entry.name, entry.entry_id, "none",
                           f"carries {_marker(entry.host_id)}, a host governord has no record of")
        if row["state"] != HostState.GONE.value or not self._settled(row, listed_at, now):
            return None
        return Finding("orphaned", system, entry.host_id, entry.name, entry.entry_id, row["state"],
                       f"carries {_marker(entry.host_id)}, of host {row['name']}, which is gone")

    @staticmethod
    def _intent(kind: str, policy: str) -> str:
        if policy == "report":
            return "would report"
        return {"leaked": "would destroy", "orphaned": "would deregister"}.get(kind, f"would {policy}")

    # -- acting ---------------------------------------------------------------------------

    async def _clean_leaked(self, finding: Finding, machine: Machine, row: Row | None, policy: str, actor: str,
                            report: SweepReport) -> None:
        if self._lost_lease(finding):
            return
        if policy != "clean":
            finding.action = "reported"
            return
        view = self._machine_host(finding.where, machine, row)
        try:
            outcome = await self.dispatcher.first("governord_deprovision_host", host=view)
        except Exception as exc:  # noqa: BLE001 - reported, the next sweep tries again
            await self._failed(finding, exc, actor, report)
            return
        finding.action = "destroyed"
        self.metrics.actions.labels(finding.kind, "done").inc()
        await self._audit("sweep-destroyed", actor, finding.host_id, {**asdict(finding), "by": outcome.plugin})

    async def _handle_vanished(self, found: list[tuple[Finding, Row]], policy: str, actor: str,
                               report: SweepReport) -> None:
        if policy == "report":
            for finding, _ in found:
                finding.action = "reported"
            return
        # the listing said absent: ask once more before changing a host on that word
        again: dict[str, _Listing] = {}
        for finding, row in found:
            provider = row["provider"]
            if provider not in again:
                again[provider] = await self._list("governord_list_machines", f"provider {provider}",
                                                   provider=provider)
            listing = again[provider]
            if not listing.complete:
                finding.action = "skipped: the provider could not be listed again"
                self.metrics.actions.labels(finding.kind, "skipped").inc()
                continue
            if any(m.host_id == row["id"] for m in listing.items):
                finding.action = "skipped: the machine is there after all"
                self.metrics.actions.labels(finding.kind, "skipped").inc()
                continue
            await self._act_on_vanished(finding, row, policy, actor)

    async def _act_on_vanished(self, finding: Finding, row: Row, policy: str, actor: str) -> None:
        if self._lost_lease(finding):
            return
        reason = f"machine vanished: {finding.reason} (found by the sweep)"
        if policy == "fail" and row["state"] != HostState.DRAINING.value:
            values: Row = {"state": HostState.FAILED.value, "failed_step": "provision", "error": reason,
                           "attempts": 0, "next_attempt_at": 0.0}
            kind, done = "sweep-failed-host", "failed (retry makes a new machine)"
        else:
            values = {"state": HostState.RETIRING.value, "retire_requested": False, "failed_step": None,
                      "error": None, "attempts": 0, "next_attempt_at": 0.0}
            kind, done = "sweep-retired", "retiring"
        detail = {**asdict(finding), "action": done}
        new = await self.store.sweep_update_host(row["id"], expect_state=row["state"],
                                                 expect_since=row["state_since"], values=values, kind=kind,
                                                 actor=actor, detail=detail)
        if new is None:
            finding.action = "skipped: the host changed meanwhile"
            self.metrics.actions.labels(finding.kind, "skipped").inc()
            return
        finding.action = done
        self.metrics.actions.labels(finding.kind, "done").inc()
        self.engine.wake()
        await self.dispatcher.notify("governord_host_event", host=host_view(new), event=new["state"],
                                     detail={"from": row["state"], "by": "sweep", "reason": reason})

    async def _clean_orphan(self, finding: Finding, entry: Registration, policy: str, actor: str,
                            report: SweepReport) -> None:
        if self._lost_lease(finding):
            return
        if policy != "clean":
            finding.action = "reported"
            return
        try:
            outcome = await self.dispatcher.first("governord_remove_registration", registration=entry)
        except Exception as exc:  # noqa: BLE001 - reported, the next sweep tries again
            await self._failed(finding, exc, actor, report)
            return
        if outcome.value:
            finding.action = "deregistered"
            self.metrics.actions.labels(finding.kind, "done").inc()
            await self._audit("sweep-deregistered", actor, finding.host_id, {**asdict(finding), "by": outcome.plugin})
        else:
            finding.action = "skipped: already gone, or another host's now"
            self.metrics.actions.labels(finding.kind, "skipped").inc()

    def _lost_lease(self, finding: Finding) -> bool:
        """Has this sweep lost the fleet's sweep lease (this instance was paused or cut off
        past it)? Then another may sweep now: act on nothing more."""
        if self._lease is None or self._lease.held:
            return False
        finding.action = "skipped: the sweep lease was lost"
        self.metrics.actions.labels(finding.kind, "skipped").inc()
        return True

    async def _failed(self, finding: Finding, exc: BaseException, actor: str, report: SweepReport) -> None:
        finding.action = f"failed: {exc}"
        self.metrics.actions.labels(finding.kind, "failed").inc()
        report.errors.append({"where": finding.where, "error": f"{finding.kind} {finding.name}: {exc}"})
        log.warning("sweep: %s %s on %s: %s", finding.kind, finding.name, finding.where, exc)
        await self._audit("sweep-action-failed", actor, finding.host_id, asdict(finding))

    @staticmethod
    def _machine_host(provider: str, machine: Machine, row: Row | None) -> HostView:
        """The host a leaked machine belongs to, as the deprovision hook is given it: its (gone)
        record where there is one, else what the machine says; the provider is where it was found."""
        if row is not None:
            view = host_view(row)
            return HostView(**{**view.__dict__, "provider": provider, "machine_id": machine.machine_id})
        return HostView(
            id=machine.host_id or "", name=machine.name, fqdn=machine.name, app=None, role=None,
            origin=HostOrigin.PROVISIONED, state=HostState.GONE, provider=provider,
            machine_id=machine.machine_id, tags=(), addresses=machine.addresses, classification={},
            registrations={},
        )

    async def _audit(self, kind: str, actor: str, host_id: str | None, detail: dict[str, Any]) -> None:
        async def write() -> None:
            async with self.store.transaction() as conn:
                await self.store.add_event(conn, kind, actor=actor, host_id=host_id, detail=detail)

        # an audit record of something already done must not be lost to a cancellation
        await asyncio.shield(write())
