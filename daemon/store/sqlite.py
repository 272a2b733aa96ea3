"""The store on SQLite: one file in WAL mode, one writer at a time, taking turns in-process.

SQLite has one writer; taking turns in-process (:class:`GroupCommit`'s batches and
:meth:`Store.transaction <governord.store.Store.transaction>` share one :class:`asyncio.Lock`)
means no connection ever sleeps in SQLite's busy handler. The engine's many small writes and the
decisions go through :class:`GroupCommit`: one connection in one thread, and every write
submitted while a batch is being committed is committed together in the next one. Each caller
still gets its own result only once its write is durable, so "commit before and after every
external call" holds, but a thousand hosts moving at once cost tens of commits, not thousands.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .groups import commit_group, each_alone_on_failure

T = TypeVar("T")


def pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (the API) run while the engine writes; NORMAL sync is durable in WAL
    # mode except for the last transactions on power loss, never corrupting.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def private_database(path: Path) -> None:
    """Make the SQLite file 0600 before SQLite opens it (its -wal and -shm files are made with
    the database's mode), and take group and other bits off files an older version made."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)


def sync_engine(url: str, codec: dict[str, Any]) -> Engine:
    """The engine of the SQLite file at ``url``, made (0600, see :func:`private_database`) with
    its directory if need be."""
    path = make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        private_database(Path(path))
    engine = create_engine(url, **codec)
    event.listen(engine, "connect", pragmas)
    return engine


def async_engine(url: str, codec: dict[str, Any]) -> AsyncEngine:
    engine = create_async_engine(make_url(url).set(drivername="sqlite+aiosqlite"), **codec)
    event.listen(engine.sync_engine, "connect", pragmas)
    return engine


class GroupCommit:
    """Writes from many coroutines, committed together: one connection, used only by one thread.

    :meth:`run` queues a job (a plain function of a synchronous connection) and waits for the
    commit that contains it. A batch starts as soon as the first job arrives; jobs that come
    while it runs form the next batch. If one job of a batch fails, the batch is rolled back and
    its jobs are run again one transaction each, so a bad write sinks only itself. ``finish``
    runs at the end of every transaction (the store's deferred writes, e.g. audit events).

    A job, once queued, is committed (or rolled back) even if its caller is cancelled: like the
    engine's shielded writes, a shutdown never leaves half an outcome.
    """

    def __init__(self, engine: Engine, turn: asyncio.Lock, finish: Callable[[Connection], None],
                 discard: Callable[[Connection], None]) -> None:
        self._engine = engine
        self._turn = turn
        self._finish = finish
        self._discard = discard
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="governord-writer")
        self._conn: Connection | None = None
        self._queue: list[tuple[Callable[[Connection], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def run(self, job: Callable[[Connection], T], *, locks: Iterable[str] = ()) -> T:
        """Commit ``job`` (a plain function of the connection) and return what it returned.
        ``locks`` are for PostgreSQL's writer: here every write takes its turn anyway."""
        del locks
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((job, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="governord-group-commit")
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()

        async def commit(jobs: list[Callable[[Connection], Any]]) -> list[tuple[bool, Any]]:
            async with self._turn:
                return await loop.run_in_executor(self._thread, self._commit, jobs)

        while self._queue:
            batch, self._queue = self._queue, []
            await commit_group(batch, commit)

    def _commit(self, jobs: list[Callable[[Connection], Any]]) -> list[tuple[bool, Any]]:
        if self._conn is None:
            self._conn = self._engine.connect()
        conn = self._conn

        def transaction(group: list[Callable[[Connection], Any]]) -> list[Any]:
            try:
                with conn.begin():
                    results = [job(conn) for job in group]
                    self._finish(conn)
                    return results
            except Exception:
                self._discard(conn)
                raise

        return each_alone_on_failure(jobs, transaction)

    async def close(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher

        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
            self._engine.dispose()

        await asyncio.get_running_loop().run_in_executor(self._thread, _close)
        self._thread.shutdown(wait=True)


def lock(_conn: Connection, _keys: list[str]) -> None:
    """Nothing to lock: decisions take turns on the one writer connection (see GroupCommit)."""
