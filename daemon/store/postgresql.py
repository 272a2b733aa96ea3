"""The store on PostgreSQL: what PostgreSQL does well instead of SQLite's one writer.

- A pool of connections for reads (SQLAlchemy's async engine on psycopg 3) and another for the
  writes: each decision and each of the engine's writes is its own transaction on a pooled
  synchronous connection in a thread (:class:`PooledWriter`), committed alone, so writes of
  different applications run side by side.
- Decisions that read and then write (a count under a cap, a free name, an idempotency key) are
  made exact by transaction-scoped advisory locks (:func:`lock`: ``pg_advisory_xact_lock`` on
  the application, on a network whose addresses are leased), which the database holds until the
  commit: exact across every process on the database, not only within this one.
- The engine's claim locks the rows it takes with ``FOR UPDATE SKIP LOCKED`` (the same statement
  as on SQLite, where the clause compiles to nothing) and returns them with ``RETURNING``.
- Migrations are serialised by a session advisory lock (:data:`MIGRATION_LOCK`), so instances
  starting at once never race each other's upgrade.

A transaction that PostgreSQL aborts for a deadlock or a serialisation failure is run again (a
job is a plain function of its connection, and runs again from the start).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from .groups import Queued, commit_group, each_alone_on_failure

T = TypeVar("T")
log = logging.getLogger(__name__)

#: the session advisory lock every instance takes around its schema upgrade (an arbitrary
#: constant: "governor" in ASCII)
MIGRATION_LOCK = 0x676F7665726E6F72
#: SQLSTATEs after which a transaction may simply be run again
_RETRYABLE = {"40P01", "40001"}  # deadlock_detected, serialization_failure
_ATTEMPTS = 5


#: seconds a new connection may take (libpq's connect_timeout): a server that cannot be reached
#: (a host down, packets dropped) fails the operation in this time, not in TCP's minutes
CONNECT_TIMEOUT = 10

#: seconds one of governord's transactions may sit idle before the server ends its session
#: (``idle_in_transaction_session_timeout``). governord never waits on anything but the database
#: inside a transaction, so a transaction idle this long belongs to a process that was paused
#: (SIGSTOP, a VM frozen), hung, or cut off from the database: what it holds (an application's
#: decision lock, claimed rows, the leader row) is then freed for the rest of the fleet in this
#: time, instead of blocking every other instance until that process comes back. Well under the
#: leases (``[engine] lease_seconds``, ``[fleet] leader_lease``), so takeover is never held up
#: by it; the paused process, when it resumes, finds its session gone and its writes undone.
IDLE_TRANSACTION_TIMEOUT = 10

#: what every connection of the writers and readers is opened with
_CONNECT_ARGS = {
    "connect_timeout": CONNECT_TIMEOUT,
    "options": f"-c idle_in_transaction_session_timeout={IDLE_TRANSACTION_TIMEOUT * 1000}",
}


def sync_engine(url: str, codec: dict[str, Any], pool_size: int) -> Engine:
    # pool_pre_ping: a pooled connection the server closed (a restart, an outage) is replaced at
    # checkout instead of failing the first statement after the server is back
    return create_engine(url, pool_size=pool_size, max_overflow=0, pool_pre_ping=True,
                         connect_args=dict(_CONNECT_ARGS), **codec)


def async_engine(url: str, codec: dict[str, Any], pool_size: int) -> AsyncEngine:
    return create_async_engine(url, pool_size=pool_size, max_overflow=0, pool_pre_ping=True,
                               connect_args=dict(_CONNECT_ARGS), **codec)


def probe_engine(url: str, timeout: float) -> AsyncEngine:
    """One connection of its own for the health check (:meth:`Store.health
    <governord.store.Store.health>`): a busy pool must not make a reachable database look
    unreachable, nor the check wait behind the API's queries."""
    return create_async_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True, pool_timeout=timeout,
                               connect_args={"connect_timeout": max(2, round(timeout))})


def migration_engine(url: str, codec: dict[str, Any]) -> Engine:
    # no pool: the session lock must go with the connection, never stay on a pooled one
    return create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT}, **codec)


def take_migration_lock(conn: Connection) -> None:
    conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
    conn.commit()


def release_migration_lock(conn: Connection) -> None:
    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
    conn.commit()


_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")


def lock(conn: Connection, keys: list[str]) -> None:
    """Hold the advisory locks named by ``keys`` until this transaction ends (taken in sorted
    order, so two decisions that need the same ones cannot deadlock)."""
    for key in sorted(set(keys)):
        conn.execute(_LOCK, {"key": key})


class PooledWriter:
    """Each write in a transaction on a pooled connection, in a thread of a pool as large as the
    connection pool. ``finish`` runs at the end of every transaction (the store's deferred
    writes), ``discard`` when one fails.

    A write without locks (the engine's: a claim, a fenced update, a lease) is its own
    transaction, and such writes run side by side. Writes that name advisory locks (the
    decisions: :meth:`Store.decide <governord.store.Store.decide>`) are committed in groups,
    as SQLite's group commit does (:class:`governord.store.sqlite.GroupCommit`): the decisions
    queued for the same locks while a group is being committed form the next group, one
    transaction that takes the locks once and runs them one after the other, each seeing what
    the ones before it wrote. Every process on the database still waits for the locks, so the
    decisions stay exact across the fleet; but one application's decisions no longer pay a lock
    hand-over, a hop to a thread and a commit each (the order of a few milliseconds under load,
    which bounded an application to about a hundred decisions a second). If one decision of a
    group fails, the group is rolled back and each of its decisions runs again alone, so a bad
    one sinks only itself.

    A write, once submitted, is committed (or rolled back) even if its caller is cancelled, as
    with SQLite's group commit: a shutdown never leaves half an outcome."""

    #: the most decisions committed in one transaction (bounds how long a group holds its locks)
    MAX_GROUP = 200

    def __init__(self, engine: Engine, pool_size: int, finish: Callable[[Connection], None],
                 discard: Callable[[Connection], None]) -> None:
        self._engine = engine
        self._finish = finish
        self._discard = discard
        self._threads = ThreadPoolExecutor(pool_size, thread_name_prefix="governord-writer")
        #: decisions waiting for their group, by the locks they need (sorted)
        self._queues: dict[tuple[str, ...], list[Queued]] = {}
        self._flushers: dict[tuple[str, ...], asyncio.Task[None]] = {}

    async def run(self, job: Callable[[Connection], T], *, locks: Iterable[str] = ()) -> T:
        """Commit ``job`` (a plain function of a connection), holding the advisory locks
        ``locks`` (see :func:`lock`) while it runs, and return what it returned."""
        keys = tuple(sorted(set(locks)))
        loop = asyncio.get_running_loop()
        if not keys:
            results = await asyncio.shield(loop.run_in_executor(self._threads, self._commit, (), [job]))
            return results[0]
        future: asyncio.Future[T] = loop.create_future()
        self._queues.setdefault(keys, []).append((job, future))
        flusher = self._flushers.get(keys)
        if flusher is None or flusher.done():
            self._flushers[keys] = asyncio.create_task(self._flush(keys), name="governord-decisions")
        return await future

    async def _flush(self, keys: tuple[str, ...]) -> None:
        loop = asyncio.get_running_loop()

        async def commit(jobs: list[Callable[[Connection], Any]]) -> list[tuple[bool, Any]]:
            return await loop.run_in_executor(self._threads, self._commit_group, keys, jobs)

        while queue := self._queues.get(keys):
            batch = queue[:self.MAX_GROUP]
            del queue[:self.MAX_GROUP]
            await commit_group(batch, commit)
        self._queues.pop(keys, None)
        self._flushers.pop(keys, None)

    def _commit_group(self, keys: tuple[str, ...], jobs: list[Callable[[Connection], Any]]) -> list[tuple[bool, Any]]:
        return each_alone_on_failure(jobs, lambda group: self._commit(keys, group))

    def _commit(self, keys: tuple[str, ...], jobs: list[Callable[[Connection], Any]]) -> list[Any]:
        """``jobs`` in one transaction under the locks ``keys``, run again from the start after a
        deadlock or a serialisation failure; what each returned."""
        for attempt in range(1, _ATTEMPTS + 1):
            with self._engine.connect() as conn:
                try:
                    with conn.begin():
                        lock(conn, list(keys))
                        results = [job(conn) for job in jobs]
                        self._finish(conn)
                    return results
                except DBAPIError as exc:
                    self._discard(conn)
                    state = getattr(exc.orig, "sqlstate", None)
                    if state not in _RETRYABLE or attempt == _ATTEMPTS:
                        raise
                    log.debug("transaction aborted (%s), running it again: %s", state, exc.orig)
                except BaseException:
                    self._discard(conn)
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._threads.shutdown, True)
        await loop.run_in_executor(None, self._engine.dispose)
