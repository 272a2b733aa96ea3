"""governord as a fleet: several instances on one store, any of which may die.

Each instance has a name (``[fleet] instance``, by default the host name) and, for each run, an
incarnation: ``NAME/<random>``, the owner of the leases its engine holds on hosts. Three things
are shared through the store, guarded by what the database guarantees:

- **Membership** (table ``instances``): an instance writes its row at start, at every heartbeat
  (when, its version, how many steps it runs) and at a clean stop. ``governord-ctl status``
  lists the rows. At start an instance frees the host leases of its own earlier incarnation (a
  restart after ``kill -9`` resumes at once instead of after the lease time); it refuses to
  start while another live process runs under its name, since the two would free each other's
  leases.
- **Host leases** (the engine's, on ``hosts``): see :mod:`governord.store`. A dead instance's
  steps are claimed by another when their lease runs out.
- **Named leases** (table ``fleet_leases``, :class:`Lease`): the ``leader`` lease, held and
  renewed at every heartbeat by one instance, which alone runs the fleet-wide periodic jobs
  (sweep, callback delivery, approval expiry and retention) and reports the fleet-wide metrics;
  and one lease per job that must never run twice at once (``sweep``, ``retention``), taken by
  whichever instance runs it, periodic or asked for by hand. Each new holder increments the
  lease's token.

A lease is judged by the database's rows and each instance's wall clock (the hosts must keep
time with NTP: skew eats into the lease). The holder trusts its own lease only for two thirds
of its length after it asked, measured on the monotonic clock: an instance paused (``SIGSTOP``,
a long GC, a VM migration) past that stops acting on it at once when it runs again, before
another instance can have taken it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, func, null, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from .. import __version__
from ..store.schema import fleet_leases, instances

if TYPE_CHECKING:
    from ..config import Config
    from ..store import Row, Store

log = logging.getLogger(__name__)

#: the leases of the jobs that run on one instance at a time
LEADER = "leader"
SWEEP = "sweep"
RETENTION = "retention"
AUTOSCALE = "autoscale"
#: the part of a lease's length its holder trusts it for, from the moment it asked
TRUSTED = 2 / 3


class DuplicateInstance(Exception):
    """Another live process runs under this instance's name."""


class Busy(Exception):
    """A job lease is held by another holder."""

    def __init__(self, name: str, holder: str | None) -> None:
        self.name = name
        self.holder = holder
        super().__init__(f"a {name} is running on {holder or 'another instance'}")


def _upsert(dialect: str) -> Any:
    return pg_insert if dialect == "postgresql" else sqlite_insert


class Lease:
    """A named lease in ``fleet_leases``, taken and renewed by :meth:`acquire`.

    ``held`` is this holder's own, conservative view: true from a successful :meth:`acquire`
    until ``TRUSTED`` of the lease's length after that call began, on the monotonic clock."""

    def __init__(self, store: Store, name: str, holder: str, ttl: float) -> None:
        self.store = store
        self.name = name
        self.holder = holder
        self.ttl = ttl
        #: the fencing token of this holder's tenure; None when not held
        self.token: int | None = None
        self._trusted_until = 0.0

    @property
    def held(self) -> bool:
        return self.token is not None and time.monotonic() < self._trusted_until

    async def acquire(self) -> bool:
        """Take the lease if it is free, run out, or already this holder's (then renewed, with
        the same token). True if held now."""
        asked = time.monotonic()
        now = time.time()
        name, holder, ttl, dialect = self.name, self.holder, self.ttl, self.store.dialect

        def job(conn: Connection) -> int | None:
            conn.execute(_upsert(dialect)(fleet_leases).values(name=name, token=0)
                         .on_conflict_do_nothing(index_elements=["name"]))
            ours = and_(fleet_leases.c.holder == holder, fleet_leases.c.expires_at >= now)
            row = conn.execute(
                update(fleet_leases)
                .where(fleet_leases.c.name == name,
                       or_(fleet_leases.c.holder.is_(None), fleet_leases.c.expires_at < now,
                           fleet_leases.c.holder == holder))
                .values(token=func.coalesce(_same_tenure(ours), fleet_leases.c.token + 1),
                        holder=holder, expires_at=now + ttl,
                        acquired_at=func.coalesce(_same_tenure(ours, fleet_leases.c.acquired_at), now))
                .returning(fleet_leases.c.token)).first()
            return None if row is None else int(row[0])

        token = await self.store.writer.run(job)
        if token is None:
            if self.token is not None:
                log.warning("lost the %s lease", self.name)
            self.token = None
            return False
        if self.token != token:
            log.info("took the %s lease (token %d)", self.name, token, extra={"lease": self.name, "token": token})
        self.token = token
        self._trusted_until = asked + self.ttl * TRUSTED
        return True

    async def release(self) -> None:
        """Give the lease up (if this holder still has it, with this tenure's token)."""
        token, self.token = self.token, None
        if token is None:
            return
        statement = (update(fleet_leases)
                     .where(fleet_leases.c.name == self.name, fleet_leases.c.holder == self.holder,
                            fleet_leases.c.token == token)
                     .values(holder=None, expires_at=None))
        await self.store.writer.run(lambda conn: conn.execute(statement))

    async def holder_now(self) -> str | None:
        """Who holds the lease now, by the database (None: nobody)."""
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(select(fleet_leases.c.holder, fleet_leases.c.expires_at)
                                      .where(fleet_leases.c.name == self.name))).first()
        if row is None or row[0] is None or (row[1] or 0) < time.time():
            return None
        return str(row[0])


def _same_tenure(ours: Any, value: Any = None) -> Any:
    """``value`` (the token by default) when the row is this holder's live lease, else NULL."""
    return case((ours, value if value is not None else fleet_leases.c.token), else_=null())


class Fleet:
    """This instance's membership and leases: joined at start, a heartbeat that also holds or
    seeks the leader lease, and the job leases."""

    def __init__(self, store: Store, config: Config, *, in_flight: Callable[[], int] = lambda: 0) -> None:
        self.store = store
        self.config = config
        self.name = config.fleet.instance
        #: this run's incarnation: the lease owner of its host steps, the holder of its leases
        self.owner = f"{self.name}/{uuid.uuid4().hex[:12]}"
        self.hostname = socket.gethostname()
        self.in_flight = in_flight
        self.leader = Lease(store, LEADER, self.owner, config.fleet.leader_lease)
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        return self.leader.held

    # -- membership -----------------------------------------------------------------------

    async def join(self) -> int:
        """Write this instance's row and free its earlier incarnation's host leases (returns
        how many). Raises DuplicateInstance if a live process runs under this name (waiting up
        to three heartbeats for one that may be dead on another host to fall silent)."""
        patience = time.monotonic() + 3 * self.config.fleet.heartbeat
        while True:
            other = await self._live_namesake()
            if other is None:
                break
            same_host = other["hostname"] == self.hostname
            if same_host or time.monotonic() > patience:
                where = f"pid {other['pid']} on {other['hostname']}"
                raise DuplicateInstance(
                    f"instance name {self.name!r} is in use by {where} (heartbeat "
                    f"{time.time() - other['heartbeat_at']:.0f}s ago): give each instance its own "
                    "[fleet] instance name")
            await asyncio.sleep(self.config.fleet.heartbeat / 2)
        now = time.time()
        values = {"owner": self.owner, "hostname": self.hostname, "pid": os.getpid(), "version": __version__,
                  "started_at": now, "heartbeat_at": now, "stopped_at": None, "in_flight": 0}
        statement = (_upsert(self.store.dialect)(instances).values(name=self.name, **values)
                     .on_conflict_do_update(index_elements=["name"], set_=values))
        await self.store.writer.run(lambda conn: conn.execute(statement))
        freed = await self.store.release_earlier_leases(self.name, keep=self.owner)
        if freed:
            log.info("resuming the interrupted steps of this instance's previous run", extra={"hosts": freed})
        return freed

    async def _live_namesake(self) -> Row | None:
        """The row of another process under this name that may be alive: not stopped, a
        heartbeat within three heartbeats, and (on this host) its pid still running."""
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(select(instances).where(instances.c.name == self.name))).mappings().first()
        if row is None or row["stopped_at"] is not None or row["owner"] == self.owner:
            return None
        if row["heartbeat_at"] < time.time() - 3 * self.config.fleet.heartbeat:
            return None
        if row["hostname"] == self.hostname and not _running(row["pid"]):
            return None
        return dict(row)

    async def beat(self) -> None:
        """One heartbeat: this instance's row, then the leader lease held or sought."""
        statement = (update(instances).where(instances.c.name == self.name, instances.c.owner == self.owner)
                     .values(heartbeat_at=time.time(), in_flight=self.in_flight(), version=__version__,
                             stopped_at=None))
        await self.store.writer.run(lambda conn: conn.execute(statement))
        await self.leader.acquire()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="fleet-heartbeat")

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception as exc:  # noqa: BLE001 - the store may be away: beat again later
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.config.fleet.heartbeat)

    async def stop(self) -> None:
        """Stop beating, hand the leader lease back, and mark this instance stopped."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.leader.release()
            statement = (update(instances).where(instances.c.name == self.name, instances.c.owner == self.owner)
                         .values(stopped_at=time.time(), in_flight=0))
            await self.store.writer.run(lambda conn: conn.execute(statement))

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config (the heartbeat and the leader lease's length; the instance
        name takes a restart)."""
        self.config = config
        self.leader.ttl = config.fleet.leader_lease

    # -- the job leases -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str, ttl: float = 60.0) -> AsyncIterator[Lease]:
        """Hold the lease ``name`` for the block, renewed every third of ``ttl``; raises Busy
        if another holder has it. The block should check ``lease.held`` before each action."""
        lease = Lease(self.store, name, self.owner, ttl)
        if not await lease.acquire():
            raise Busy(name, await lease.holder_now())

        async def renew() -> None:
            while True:
                await asyncio.sleep(ttl / 3)
                with contextlib.suppress(Exception):
                    await lease.acquire()

        renewer = asyncio.create_task(renew(), name=f"lease-{name}")
        try:
            yield lease
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            with contextlib.suppress(Exception):
                await lease.release()

    # -- what operators see ---------------------------------------------------------------

    async def members(self) -> list[dict[str, Any]]:
        """Every instance the store knows, with its state (``up``, ``stopped``, or ``lost``:
        no heartbeat for three), whether it leads, and the host steps it ran at its last
        heartbeat (a lost instance's are taken over when their leases run out). Reads the
        instances and the leader lease, never the hosts: it is scraped."""
        now = time.time()
        async with self.store.engine.connect() as conn:
            rows = [dict(r) for r in (await conn.execute(select(instances).order_by(instances.c.name))).mappings()]
            leader = (await conn.execute(select(fleet_leases.c.holder, fleet_leases.c.expires_at)
                                         .where(fleet_leases.c.name == LEADER))).first()
        leader_owner = leader[0] if leader is not None and (leader[1] or 0) >= now else None
        stale = 3 * self.config.fleet.heartbeat
        for row in rows:
            if row["stopped_at"] is not None:
                row["status"] = "stopped"
            elif row["heartbeat_at"] < now - stale:
                row["status"] = "lost"
            else:
                row["status"] = "up"
            row["leader"] = row["owner"] == leader_owner
            row["heartbeat_age"] = round(max(0.0, now - row["heartbeat_at"]), 3)
            row["this"] = row["owner"] == self.owner
        return rows


def _running(pid: int) -> bool:
    """Is a process with this pid running on this host (a namesake's, or reused)?"""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["LEADER", "RETENTION", "SWEEP", "Busy", "DuplicateInstance", "Fleet", "Lease"]
