"""Retention: what governord records is deleted once it is old and nothing live needs it, so the
database does not grow for ever.

``[retention]`` sets how long each kind is kept (0: for ever):

gone hosts (``gone_hosts_days``)
    a host's row once it has been ``gone`` that long (by its last change), and only once the
    request that made it has been deleted: a kept request still shows its hosts as they ended.
    Hosts that are not gone are never deleted, however old.
requests (``requests_days``)
    a request (with its idempotency key, and its callback) once its last change is that old,
    and only if it is not pending approval, every host it names is at rest (ready, failed or
    gone, or deleted), and its callback, if it has one, was delivered or given up. A request the
    application's cooldown still counts is kept too.
audit events (``events_days``)
    an event that old, unless it belongs to a host that is not gone (a live host's trail is kept
    whole: the engine reads it, e.g. whether the host was ever ready).

**Idempotency keys** live in the request row: a key is honoured (a repeat returns the first
outcome) for as long as its request is kept, at least ``requests_days`` after the request last
changed. Once the request is deleted its key is free, and a request under it is a new request,
decided afresh by the rules, as with any key never used (as Stripe's idempotency keys expire
after 24 hours). ``requests_days`` must therefore be longer than any client retries; a webhook
delivery cannot be replayed that late anyway, its signature's timestamp is refused after
minutes.

Pruning runs in the background every ``interval`` seconds (and once at start), in batches of at
most ``batch`` rows, each its own short transaction on the store's writer, so the engine's and
the APIs' writes take turns with it and never wait for a whole round. A batch reads its rows,
checks the conditions and deletes in that one transaction, so nothing that changed in between
(a host retried, a callback owed again) is deleted. A round that deleted something leaves one audit event, ``retention-pruned``, with how
many of each kind it deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, exists, func, select
from sqlalchemy.engine import Connection

from ..fleet import RETENTION, Busy, Fleet
from ..models import HostState
from ..store import Store, beyond, log_failed
from ..store.schema import address_leases, callbacks, events, hosts, requests

if TYPE_CHECKING:
    from ..config import Config
    from ..rules import Governor

log = logging.getLogger(__name__)

DAY = 86400.0
ACTOR = "governord"
#: host ids asked about per statement (well under any database's limit of bound parameters)
_CHUNK = 500
_AT_REST = [HostState.READY.value, HostState.FAILED.value, HostState.GONE.value]


@dataclass
class PruneReport:
    """How many rows of each kind one round deleted."""

    hosts: int = 0
    requests: int = 0
    callbacks: int = 0
    events: int = 0

    @property
    def total(self) -> int:
        return self.hosts + self.requests + self.callbacks + self.events


def _chunks(items: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), _CHUNK):
        yield list(items[start:start + _CHUNK])


def _prune_requests(conn: Connection, cutoff: float, after: Sequence[Any] | None,
                    batch: int) -> tuple[tuple[Any, ...] | None, int, int]:
    """One batch of requests older than ``cutoff``, oldest first, from after ``after``: delete
    those nothing live needs. Returns the key of the last one looked at (None: no more), and how
    many requests and callbacks were deleted."""
    query = (select(requests.c.id, requests.c.created_at, requests.c.updated_at, requests.c.state,
                    requests.c.host_ids)
             .where(requests.c.created_at < cutoff).order_by(requests.c.created_at, requests.c.id).limit(batch))
    if after is not None:
        query = query.where(beyond((requests.c.created_at, requests.c.id), after, False))
    rows = conn.execute(query).all()
    if not rows:
        return None, 0, 0
    old = [r for r in rows if r.updated_at < cutoff and r.state != "pending"]
    named = sorted({host for r in old for host in r.host_ids})
    busy: set[str] = set()
    for chunk in _chunks(named):
        busy |= set(conn.execute(select(hosts.c.id).where(
            hosts.c.id.in_(chunk), hosts.c.state.not_in(_AT_REST))).scalars())
    owed: set[str] = set()
    for chunk in _chunks([r.id for r in old]):
        owed |= set(conn.execute(select(callbacks.c.request_id).where(
            callbacks.c.request_id.in_(chunk), callbacks.c.delivered_at.is_(None),
            callbacks.c.gave_up_at.is_(None))).scalars())
    victims = [r.id for r in old if r.id not in owed and not busy.intersection(r.host_ids)]
    gone_callbacks = gone_requests = 0
    for chunk in _chunks(victims):
        gone_callbacks += conn.execute(delete(callbacks).where(callbacks.c.request_id.in_(chunk))).rowcount or 0
        gone_requests += conn.execute(delete(requests).where(requests.c.id.in_(chunk))).rowcount or 0
    return (rows[-1].created_at, rows[-1].id), gone_requests, gone_callbacks


def _prune_host_events(conn: Connection, cutoff: float, after: Sequence[Any] | None,
                       batch: int) -> tuple[tuple[Any, ...] | None, int]:
    """One batch of host-event callbacks (a draining host's notifications) delivered or given up
    before ``cutoff``: delete them. Returns the key of the last one looked at, and how many."""
    done = func.coalesce(callbacks.c.delivered_at, callbacks.c.gave_up_at)
    query = (select(callbacks.c.request_id).where(callbacks.c.payload.is_not(None), done < cutoff)
             .order_by(callbacks.c.request_id).limit(batch))
    if after is not None:
        query = query.where(callbacks.c.request_id > after[0])
    ids = list(conn.execute(query).scalars())
    if not ids:
        return None, 0
    deleted = conn.execute(delete(callbacks).where(callbacks.c.request_id.in_(ids))).rowcount or 0
    return (ids[-1],), deleted


def _prune_hosts(conn: Connection, cutoff: float, after: Sequence[Any] | None,
                 batch: int) -> tuple[tuple[Any, ...] | None, int]:
    """One batch of hosts made before ``cutoff``, oldest first: delete those gone since before
    ``cutoff`` whose request is deleted. Returns the key of the last one looked at, and how many
    were deleted."""
    query = (select(hosts.c.id, hosts.c.created_at).where(hosts.c.created_at < cutoff)
             .order_by(hosts.c.created_at, hosts.c.id).limit(batch))
    if after is not None:
        query = query.where(beyond((hosts.c.created_at, hosts.c.id), after, False))
    rows = conn.execute(query).all()
    if not rows:
        return None, 0
    candidates = [r.id for r in rows]
    victims = list(conn.execute(select(hosts.c.id).where(
        hosts.c.id.in_(candidates), hosts.c.state == HostState.GONE.value, hosts.c.updated_at < cutoff,
        hosts.c.lease_owner.is_(None),
        hosts.c.request_id.is_(None) | ~exists().where(requests.c.id == hosts.c.request_id))).scalars())
    deleted = 0
    if victims:
        # a gone host's address was freed when it went; a lease left behind goes with it
        conn.execute(delete(address_leases).where(address_leases.c.host_id.in_(victims)))
        deleted = conn.execute(delete(hosts).where(hosts.c.id.in_(victims))).rowcount or 0
    return (rows[-1].created_at, rows[-1].id), deleted


def _prune_events(conn: Connection, cutoff: float, after: int | None, batch: int) -> tuple[int | None, int]:
    """One batch of events in the order they were written: delete those older than ``cutoff``
    that belong to no live host. Returns the id of the last one looked at (None: the batch
    reached events newer than ``cutoff``, or the end), and how many were deleted."""
    query = select(events.c.id, events.c.ts).order_by(events.c.id).limit(batch)
    if after is not None:
        query = query.where(events.c.id > after)
    rows = conn.execute(query).all()
    if not rows:
        return None, 0
    live_host = exists().where(hosts.c.id == events.c.host_id, hosts.c.state != HostState.GONE.value)
    deleted = conn.execute(delete(events).where(
        events.c.id.in_([r.id for r in rows]), events.c.ts < cutoff, ~live_host)).rowcount or 0
    # ids follow time: past the first newer event, the rest are newer too (the few written out
    # of order by a moment are deleted in the next round)
    if any(r.ts >= cutoff for r in rows):
        return None, deleted
    return rows[-1].id, deleted


class Pruner:
    """Deletes what ``[retention]`` no longer keeps, in the background (one task, started and
    stopped with the runtime) or when asked (:meth:`prune`)."""

    def __init__(self, store: Store, governor: Governor, config: Config, fleet: Fleet) -> None:
        self.store = store
        #: periodic rounds run on the fleet's leader; every round holds the retention lease
        self.fleet = fleet
        self.governor = governor
        self.config = config
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._periodic(), name="retention")

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config: the next round runs now, with the new retention."""
        self.config = config
        self._wake.set()

    async def stop(self) -> None:
        """Stop: a round under way ends after its current batch (and audits what it deleted)."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self._stopping = False  # rounds asked for by hand (prune()) run whole again

    async def _periodic(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if self.config.retention.interval > 0 and self.fleet.is_leader:
                try:
                    await self.prune()
                except Busy as busy:
                    log.info("pruning skipped: %s", busy)
                except Exception as exc:  # noqa: BLE001 - a failed round must not end the later ones
                    log_failed(log, "pruning", exc)
            interval = self.config.retention.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval if interval > 0 else None)

    async def prune(self, now: float | None = None) -> PruneReport:
        """One round: delete what is older than the retention and not needed by live work, in
        batches; audit it. ``now``: the time the ages are counted from (tests)."""
        async with self._lock, self.fleet.exclusive(RETENTION):
            now = time.time() if now is None else now
            retention = self.config.retention
            report = PruneReport()
            # a request left pending past its expiry is expired first, so it can age out
            await self.governor.expire_pending()
            if retention.requests_days > 0:
                cooldown = max((a.cooldown for a in self.config.applications.values()), default=0.0)
                cutoff = min(now - retention.requests_days * DAY, now - cooldown)
                report.requests, report.callbacks = await self._batches(_prune_requests, cutoff, retention.batch, 2)
                [host_events] = await self._batches(_prune_host_events, cutoff, retention.batch, 1)
                report.callbacks += host_events
            if retention.gone_hosts_days > 0:
                cutoff = now - retention.gone_hosts_days * DAY
                [report.hosts] = await self._batches(_prune_hosts, cutoff, retention.batch, 1)
            if retention.events_days > 0:
                cutoff = now - retention.events_days * DAY
                [report.events] = await self._batches(_prune_events, cutoff, retention.batch, 1)
            if report.total:
                counts = asdict(report)
                await self.store.decide(lambda tx: tx.add_event("retention-pruned", actor=ACTOR, detail={
                    **counts, "kept_days": {"gone_hosts": retention.gone_hosts_days,
                                            "requests": retention.requests_days, "events": retention.events_days}}))
                log.info("retention: deleted %d gone hosts, %d requests, %d callbacks, %d events",
                         report.hosts, report.requests, report.callbacks, report.events, extra=counts)
            return report

    async def _batches(self, prune: Any, cutoff: float, batch: int, counts: int) -> list[int]:
        """Run ``prune`` batch after batch, each from where the one before ended, until it says
        there is no more (or the pruner is stopping); the sums of the ``counts`` numbers each
        batch returns after its key."""
        totals = [0] * counts
        key: Any = None
        while not self._stopping:
            key, *deleted = await self._write(prune, cutoff, key, batch)
            totals = [total + n for total, n in zip(totals, deleted, strict=True)]
            if key is None:
                break
        return totals

    async def _write(self, job: Any, *args: Any) -> Any:
        """One batch, its own transaction on the writer; then the others' writes get their turn."""
        result = await self.store.writer.run(lambda conn: job(conn, *args))
        await asyncio.sleep(0)
        return result
