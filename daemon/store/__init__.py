"""The durable store, through SQLAlchemy Core: SQLite (WAL) in the state directory by default,
or PostgreSQL (``[store] url``), where several governord processes can share it.

One store with two backends: this module holds the tables' reads and writes (:class:`Store`,
:class:`Transaction`), the same queries for both; what differs lives in a small module per
dialect, :mod:`governord.store.sqlite` and :mod:`governord.store.postgresql`: how engines are
made, how writes are committed and how a decision is kept exact.

Work is claimed with leases: a host row being worked on carries ``lease_owner`` (the instance's
incarnation), ``lease_expires`` and ``lease_token``, a fencing token that every claim increments.
The engine's writes are fenced on both (``WHERE lease_owner = me AND lease_token = mine``), so an
instance that lost its lease (it died, was paused or cut off past the expiry, and another claimed
the host) can never overwrite or redo the work of the one that took over, not even after it
claimed the same host again itself.

Two write paths:

- the engine's many small writes (claims, fenced updates, lease renewals) and the decisions
  (scale, release, approve, retire, adopt: :meth:`Store.decide`, synchronous functions of a
  :class:`Transaction`) go through the backend's writer, a thread that runs them on a
  synchronous connection: on SQLite the group commit (one connection; the writes submitted while
  a batch commits are committed together in the next one, and decisions take turns), on
  PostgreSQL a pool (each its own transaction; decisions serialised per application by advisory
  locks the database holds). Either way a decision is one hop to a thread, not one per statement;
- the rest (operator updates, the sweep's and the callbacks' writes) keep async transactions,
  taken with :meth:`Store.transaction`.

On SQLite the hottest statements run prepared on the DBAPI cursor (:class:`DirectStatement`); on
PostgreSQL psycopg prepares repeated statements itself, and they run through SQLAlchemy Core.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ipaddress
import itertools
import logging
import re
import sqlite3
import string
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import and_, bindparam, case, func, insert, or_, select, text, update
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ClauseElement, ColumnElement

from .. import __version__
from ..errors import GovernordError
from ..models import HostOrigin, HostState, HostView
from . import postgresql, sqlite
from .schema import (
    WORKING,
    address_leases,
    app_certificates,
    events,
    hosts,
    live_counts,
    requests,
    site_revocations,
    state_counts,
)

Row = dict[str, Any]
T = TypeVar("T")

log = logging.getLogger(__name__)

#: seconds the health check waits for the database's answer to ``SELECT 1``
HEALTH_TIMEOUT = 2.0
#: seconds a health check's answer is kept: a storm of ``/healthz`` and ``/metrics`` requests
#: asks the database once in this time
HEALTH_KEPT = 1.0


def unavailable(exc: BaseException) -> str | None:
    """Why the store could not be used, when ``exc`` says it could not be reached (the server
    stopped or unreachable, a connection lost in the middle, no pooled connection free in time,
    SQLite's file locked past its busy timeout): one line. None for every other error (a bug, a
    constraint), which is not the store's state but the caller's."""
    if isinstance(exc, PoolTimeout):
        return f"no database connection free in time: {exc}".splitlines()[0]
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        orig = exc.orig if isinstance(exc, DBAPIError) else None
        return _first_line(orig if orig is not None else exc)
    if isinstance(exc, sqlite3.OperationalError):  # SQLite's prepared statements run on the DBAPI cursor
        return _first_line(exc)
    return None


def log_failed(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """Log that ``what`` failed with ``exc``, for the background loops that go on after it: one
    line when the store could not be reached (they say so every round until it is back), the
    traceback for anything else."""
    reason = unavailable(exc)
    if reason is None:
        logger.error("%s failed", what, exc_info=exc)
    else:
        logger.warning("%s failed, the store is unreachable: %s", what, reason)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'no detail'}"


def _json_text(value: Any) -> str:
    # orjson: the store encodes and decodes JSON columns on every transition; the json module
    # was a tenth of the engine's CPU time (bench/RESULTS.md). Text, as SQLite's JSON type is.
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


#: the JSON columns' encoding, for every engine the store creates
JSON_CODEC = {"json_serializer": _json_text, "json_deserializer": orjson.loads}


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return cfg


def head_revision() -> str:
    """The newest schema revision this governord knows (what :func:`migrate` brings a database to)."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, "the migrations have one head"
    return head


def known_revisions() -> set[str]:
    """Every schema revision this governord has a migration for."""
    return {script.revision for script in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}


class SchemaTooNew(GovernordError):
    """The database was migrated by a newer governord: this one does not know its schema, and
    must not write to it (nor can it migrate it back)."""

    def __init__(self, found: str, head: str) -> None:
        self.found, self.head = found, head
        super().__init__(
            f"the store's schema is revision {found}, which a newer governord made; this one "
            f"({__version__}) knows revisions up to {head}: run the newer governord, or restore the "
            "backup taken before the upgrade (governord-ctl restore)")


def migrate(url: str) -> None:
    """Bring the database at ``url`` (a synchronous SQLAlchemy URL) to the newest schema. On
    PostgreSQL, processes starting at once upgrade one after the other (an advisory lock), and
    the later ones find the work done."""
    cfg = _alembic_config()
    postgres = not url.startswith("sqlite")
    engine = postgresql.migration_engine(url, JSON_CODEC) if postgres else sqlite.sync_engine(url, JSON_CODEC)
    try:
        with engine.connect() as conn:
            if postgres:
                postgresql.take_migration_lock(conn)
            try:
                with conn.begin():
                    current = MigrationContext.configure(conn).get_current_revision()
                    if current is not None and current not in known_revisions():
                        raise SchemaTooNew(current, head_revision())
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
            finally:
                if postgres:
                    postgresql.release_migration_lock(conn)
    finally:
        engine.dispose()


def host_view(row: Row | RowMapping) -> HostView:
    """The read-only snapshot of a host row that plugins are given."""
    return HostView(
        id=row["id"],
        name=row["name"],
        fqdn=row["fqdn"],
        app=row["app"],
        role=row["role"],
        origin=HostOrigin(row["origin"]),
        state=HostState(row["state"]),
        provider=row["provider"],
        machine_id=row["machine_id"],
        tags=tuple(row["tags"]),
        addresses=tuple(row["addresses"]),
        classification=dict(row["classification"]),
        registrations=dict(row["registrations"]),
        failed_step=row["failed_step"],
        error=row["error"],
        address=row.get("address"),
    )


def _sequence_numbers(pattern: str, app: str, role: str, names: Iterable[str]) -> set[int]:
    """The ``seq`` values of those ``names`` that the name pattern could have made."""
    parts = []
    for literal, field, _spec, _conversion in string.Formatter().parse(pattern):
        parts.append(re.escape(literal))
        if field == "seq":
            parts.append(r"(\d+)")
        elif field in ("app", "role"):
            parts.append(re.escape(app if field == "app" else role))
        elif field is not None:
            return set()  # a pattern the config check would refuse; the slow path still works
    if r"(\d+)" not in parts:
        return set()
    shape = re.compile("".join(parts))
    return {int(found.group(1)) for name in names if (found := shape.fullmatch(name))}


class NameTaken(Exception):
    """A live host already has this name."""


class AmbiguousId(LookupError):
    """An id prefix that matches more than one row; the message lists some of them."""


#: what an id prefix an operator types may be: part of a UUID, at least 6 characters
_ID_PREFIX = re.compile(r"[0-9a-f-]{6,36}")


async def _by_prefix(conn: AsyncConnection, table: Any, key: str, what: str) -> Row | None:
    """The one row of ``table`` whose id starts with ``key``; None if none, AmbiguousId if several."""
    if not _ID_PREFIX.fullmatch(key):
        return None
    found = (await conn.execute(select(table).where(table.c.id.startswith(key, autoescape=True))
                                .order_by(table.c.id).limit(4))).mappings().all()
    if len(found) > 1:
        shown = ", ".join(r["id"] for r in found[:3]) + (", ..." if len(found) > 3 else "")
        raise AmbiguousId(f"{what} id prefix {key!r} matches more than one {what} ({shown}): give more of it")
    return dict(found[0]) if found else None


def app_lock(app: str) -> str:
    """The lock a decision about ``app`` holds (its hosts, counts, names, requests)."""
    return f"app:{app}"


def network_lock(network: str) -> str:
    """The lock a decision leasing addresses of ``network`` holds (networks are shared by applications)."""
    return f"network:{network}"


_DEFERRED = "governord.deferred"


def defer(conn: Connection, statement: Any, params: Row) -> None:
    """Have ``statement`` run with ``params`` at the end of this job's transaction, together
    with every other job's rows for it (one executemany: audit events are most writes)."""
    conn.info.setdefault(_DEFERRED, {}).setdefault(statement, []).append(params)


def run_deferred(conn: Connection) -> None:
    """The writers' last act in every transaction: the writes :func:`defer` put off."""
    for statement, rows in conn.info.pop(_DEFERRED, {}).items():
        insert_rows(conn, statement, rows)


def discard_deferred(conn: Connection) -> None:
    """A transaction failed: what it put off goes with it."""
    conn.info.pop(_DEFERRED, None)


class GroupCommit(sqlite.GroupCommit):
    """SQLite's writer (see :mod:`governord.store.sqlite`); ``GroupCommit.defer`` is :func:`defer`."""

    defer = staticmethod(defer)


# The engine's statements, built once: building a statement (and its cache key) costs more than
# SQLite running it.
_EVENT_INSERT = insert(events)
_CLAIM = (
    update(hosts)
    .where(hosts.c.id.in_(
        select(hosts.c.id)
        .where(
            WORKING,
            hosts.c.next_attempt_at <= bindparam("now"),
            or_(hosts.c.lease_owner.is_(None), hosts.c.lease_expires < bindparam("now")),
        )
        .order_by(hosts.c.next_attempt_at, hosts.c.updated_at)
        .limit(bindparam("limit"))
        # PostgreSQL: rows another instance is claiming right now are skipped, not waited for;
        # SQLite compiles no locking clause (its one writer claims alone)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    ))
    .values(lease_owner=bindparam("owner"), lease_expires=bindparam("expires"), lease_token=hosts.c.lease_token + 1)
    .returning(*hosts.c)
)
_RENEW = (
    update(hosts)
    .where(hosts.c.id.in_(bindparam("ids", expanding=True)), hosts.c.lease_owner == bindparam("owner"))
    .values(lease_expires=bindparam("expires"))
    .returning(hosts.c.id)
)
_RECLAIM = (
    update(hosts)
    .where(hosts.c.id == bindparam("host_id"), hosts.c.lease_owner.is_(None), hosts.c.lease_token == bindparam("token"))
    .values(lease_owner=bindparam("owner"), lease_expires=bindparam("expires"), lease_token=hosts.c.lease_token + 1)
    .returning(*hosts.c)
)
_LEASES_OF = select(hosts.c.id, hosts.c.lease_owner, hosts.c.lease_token).where(
    hosts.c.id.in_(bindparam("ids", expanding=True)))
_NEXT_DUE = (
    select(hosts.c.next_attempt_at)
    .where(WORKING, or_(hosts.c.lease_owner.is_(None), hosts.c.lease_expires < bindparam("now")))
    .order_by(hosts.c.next_attempt_at)
    .limit(1)
)
_RELEASE_ADDRESS = address_leases.delete().where(address_leases.c.host_id == bindparam("host_id"))
_FENCE = and_(hosts.c.id == bindparam("fence_id"), hosts.c.lease_owner == bindparam("fence_owner"),
              hosts.c.lease_token == bindparam("fence_token"))
_FIRST_TRY_UNLESS_RETIRING = case((hosts.c.retire_requested, 0), else_=1)
def _driver_connection(conn: Connection) -> Any:
    """The DBAPI driver's own connection under a SQLAlchemy connection (open: it is in use)."""
    driver = conn.connection.driver_connection
    assert driver is not None, "the connection is closed"
    return driver


class DirectStatement:
    """A statement compiled once for a dialect and run straight on the DBAPI cursor.

    For the hottest statements: the engine's fenced update, and the few a scale decision runs.
    SQLAlchemy's bookkeeping per execution costs several times SQLite's own work for them
    (bench/RESULTS.md). Parameters and returned rows still go through the column types' own
    processors for the dialect, so values come back exactly as SQLAlchemy would return them (a
    unit test compares). Use :func:`direct` to get the one for a statement and connection.
    """

    def __init__(self, statement: Any, dialect: Any, column_keys: Sequence[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        if not compiled.positional:
            raise NotImplementedError("DirectStatement needs a positional DBAPI parameter style")
        self.sql = compiled.string
        if any(bind.expanding for bind in compiled.binds.values()):
            raise NotImplementedError("DirectStatement runs no expanding (IN list) parameters")
        # per position: the parameter's name, whether the caller must give it, its value in the
        # statement otherwise, the type's processor (what construct_params does, without its
        # general machinery: a test compares the outcome with SQLAlchemy's)
        self._slots = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            self._slots.append((name, bind.required, None if bind.required else bind.effective_value, processor))
        if isinstance(statement, Select):
            described = statement.column_descriptions
        else:
            described = statement.returning_column_descriptions
        self._columns = [column["name"] for column in described]
        self._result_processors = [column["type"].dialect_impl(dialect).result_processor(dialect, None)
                                   for column in described]

    def _positional(self, params: Row) -> list[Any]:
        positional = []
        for name, required, default, processor in self._slots:
            value = params[name] if required or name in params else default
            positional.append(processor(value) if processor is not None and value is not None else value)
        return positional

    def _row(self, raw: Sequence[Any]) -> Row:
        return {
            name: processor(value) if processor is not None else value
            for name, processor, value in zip(self._columns, self._result_processors, raw, strict=True)
        }

    def all(self, conn: Connection, params: Row) -> list[Row]:
        """The rows, each a dict of the statement's columns."""
        cursor = _driver_connection(conn).cursor()
        try:
            cursor.execute(self.sql, self._positional(params))
            return [self._row(raw) for raw in cursor.fetchall()]
        finally:
            cursor.close()

    def first(self, conn: Connection, params: Row) -> Row | None:
        rows = self.all(conn, params)
        return rows[0] if rows else None

    def run(self, conn: Connection, many: Sequence[Row]) -> None:
        """Execute once per parameter set (a statement that returns nothing, e.g. an insert)."""
        cursor = _driver_connection(conn).cursor()
        try:
            cursor.executemany(self.sql, [self._positional(params) for params in many])
        finally:
            cursor.close()


def insert_rows(conn: Connection, statement: Any, rows: Sequence[Row]) -> None:
    """Run an insert for ``rows`` as one prepared executemany; a column a row lacks is NULL."""
    keys = set().union(*rows)
    direct(conn, statement, keys).run(conn, [{key: row.get(key) for key in keys} for row in rows])


_direct_statements: dict[tuple[str, int, frozenset[str] | None], DirectStatement] = {}


class CoreStatement:
    """A statement run through SQLAlchemy Core, with :class:`DirectStatement`'s interface: what
    :func:`direct` gives on PostgreSQL, where psycopg prepares the statements it sees repeated
    and SQLAlchemy's overhead is small beside a round trip to the server."""

    def __init__(self, statement: Any) -> None:
        self.statement = statement

    def all(self, conn: Connection, params: Row) -> list[Row]:
        return [dict(row) for row in conn.execute(self.statement, params).mappings()]

    def first(self, conn: Connection, params: Row) -> Row | None:
        row = conn.execute(self.statement, params).mappings().first()
        return dict(row) if row is not None else None

    def run(self, conn: Connection, many: Sequence[Row]) -> None:
        conn.execute(self.statement, list(many))


def direct(conn: Connection, statement: Any, column_keys: Iterable[str] | None = None) -> DirectStatement | CoreStatement:
    """The :class:`DirectStatement` of ``statement`` (a module-level constant: it is kept by its
    identity) for the connection's dialect; an insert is compiled for ``column_keys``. On
    PostgreSQL, the statement as it is (:class:`CoreStatement`)."""
    if conn.dialect.name != "sqlite":
        return CoreStatement(statement)
    keys = frozenset(column_keys) if column_keys is not None else None
    key = (conn.dialect.name, id(statement), keys)
    prepared = _direct_statements.get(key)
    if prepared is None:
        prepared = _direct_statements[key] = DirectStatement(statement, conn.dialect,
                                                             sorted(keys) if keys is not None else None)
    return prepared


@dataclass
class Page:
    """One page of a list: its rows, and the sort key of the last one if more may follow
    (None on the last page)."""

    rows: list[Row]
    next: tuple[Any, ...] | None


def beyond(key: Sequence[ColumnElement[Any]], after: Sequence[Any], descending: bool) -> ColumnElement[bool]:
    """Rows strictly past ``after`` in the order of ``key`` (one or two columns): the row
    comparison ``(a, b) > (x, y)`` written as ``a >= x AND (a > x OR b > y)``, whose first term
    an index on (a, b) serves as a range in SQLite and PostgreSQL alike."""
    first, value = key[0], after[0]
    if len(key) == 1:
        return first < value if descending else first > value
    second, tie = key[1], after[1]
    if descending:
        return and_(first <= value, or_(first < value, second < tie))
    return and_(first >= value, or_(first > value, second > tie))


_fenced_statements: dict[tuple[Any, tuple[tuple[str, int], ...]], DirectStatement | CoreStatement] = {}


def _fenced_statement(dialect: Any, values: Row) -> tuple[DirectStatement | CoreStatement, Row]:
    """The prepared ``UPDATE hosts ... WHERE id AND lease_owner AND lease_token RETURNING *`` for this set of
    columns, and its parameters. A value may be an SQL expression (a module-level constant, so
    the statement can be kept); its own bind parameters come in through ``binds``."""
    shape = tuple(sorted((name, id(value) if isinstance(value, ClauseElement) else 0) for name, value in values.items()))
    statement = _fenced_statements.get((dialect.name, shape))
    if statement is None:
        fenced = (update(hosts).where(_FENCE)
                  .values({name: value if isinstance(value, ClauseElement) else bindparam(f"v_{name}")
                           for name, value in values.items()})
                  .returning(*hosts.c))
        statement = DirectStatement(fenced, dialect) if dialect.name == "sqlite" else CoreStatement(fenced)
        _fenced_statements[(dialect.name, shape)] = statement
    params = {f"v_{name}": value for name, value in values.items() if not isinstance(value, ClauseElement)}
    return statement, params


class Store:
    """All reads and writes of governord's state."""

    def __init__(self, engine: AsyncEngine, writer_engine: Engine, *, pool_size: int = 10,
                 probe: AsyncEngine | None = None) -> None:
        self.engine = engine
        self.dialect = writer_engine.dialect.name
        #: what the health check asks on (PostgreSQL: a connection of its own; SQLite: the readers')
        self._probe = probe or engine
        #: the last health check: when it began (monotonic) and its answer
        self._health: tuple[float, str | None] | None = None
        self._checking = asyncio.Lock()
        self.writer: sqlite.GroupCommit | postgresql.PooledWriter
        if self.dialect == "sqlite":
            #: SQLite's one writer, taken in turns by the group commit and the async transactions
            self._turn: asyncio.Lock | None = asyncio.Lock()
            self.writer = GroupCommit(writer_engine, self._turn, run_deferred, discard_deferred)
            self._lock: Callable[[Connection, list[str]], None] = sqlite.lock
        else:
            self._turn = None  # PostgreSQL: row locks and advisory locks, held by the database
            self.writer = postgresql.PooledWriter(writer_engine, pool_size, run_deferred, discard_deferred)
            self._lock = postgresql.lock

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 10) -> Store:
        """The store at ``url`` (``sqlite:///PATH`` or ``postgresql+psycopg://...``), its schema
        brought up to date first."""
        await asyncio.get_running_loop().run_in_executor(None, migrate, url)
        if url.startswith("sqlite"):
            return cls(sqlite.async_engine(url, JSON_CODEC), sqlite.sync_engine(url, JSON_CODEC))
        return cls(postgresql.async_engine(url, JSON_CODEC, pool_size),
                   postgresql.sync_engine(url, JSON_CODEC, pool_size), pool_size=pool_size,
                   probe=postgresql.probe_engine(url, HEALTH_TIMEOUT))

    @classmethod
    async def open_sqlite(cls, path: Path) -> Store:
        return await cls.open(f"sqlite:///{path}")

    async def close(self) -> None:
        await self.writer.close()
        await self.engine.dispose()
        if self._probe is not self.engine:
            await self._probe.dispose()

    async def health(self) -> str | None:
        """None when the database answers ``SELECT 1`` within :data:`HEALTH_TIMEOUT` seconds,
        else why not (one line). The answer is kept :data:`HEALTH_KEPT` seconds, and callers
        that ask while a check runs share it: ``/healthz`` and ``/metrics`` may be asked as often
        as anyone likes, the database is asked at most about once a second."""
        kept = self._health
        if kept is not None and time.monotonic() - kept[0] < HEALTH_KEPT:
            return kept[1]
        arrived = time.monotonic()
        async with self._checking:
            kept = self._health
            if kept is not None and kept[0] >= arrived - HEALTH_KEPT:
                return kept[1]  # checked while this caller waited for its turn
            began = time.monotonic()
            problem = await self._check()
            was_up = kept is None or kept[1] is None
            self._health = (began, problem)
            if problem is not None and was_up:
                log.warning("the store is unreachable: %s", problem)
            elif problem is None and not was_up:
                log.info("the store is reachable again")
            return problem

    async def _check(self) -> str | None:
        async def select_one() -> None:
            async with self._probe.connect() as conn:
                await conn.execute(text("SELECT 1"))

        try:
            await asyncio.wait_for(select_one(), HEALTH_TIMEOUT)
        except TimeoutError:
            if self._probe is not self.engine:
                # its one connection may be left mid-way: the next check starts on a new one
                with contextlib.suppress(Exception):
                    await self._probe.dispose()
            return f"no answer to SELECT 1 within {HEALTH_TIMEOUT:g} s"
        except Exception as exc:  # noqa: BLE001 - reported as the store's state, whatever it is
            return unavailable(exc) or _first_line(exc)
        return None

    async def decide(self, decision: Callable[[Transaction], T], *, locks: Iterable[str] = ()) -> T:
        """Run ``decision`` (a synchronous function of a :class:`Transaction`) on a writer
        connection, in a transaction, and return what it returned once that is durable. If it
        raises, nothing it wrote stays.

        What a decision reads (a count under a cap, a free name, an idempotency key) cannot
        change before it has written: on SQLite, decisions run one at a time, after and before
        the engine's writes (committed together with the writes queued with them); on
        PostgreSQL, the decision runs holding the advisory locks named by ``locks`` (see
        :func:`app_lock`), held by the database until it commits, so concurrent decisions about
        one application wait for each other in every process that shares the database; the
        decisions queued for the same locks meanwhile are committed together, under one taking
        of the locks (see :class:`~governord.store.postgresql.PooledWriter`). The whole decision
        is one hop to a writer thread, not one round trip per statement."""
        def job(conn: Connection) -> T:
            return decision(Transaction(conn, self._lock))

        return await self.writer.run(job, locks=locks)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """An asynchronous read-write transaction (for writes outside the decisions, e.g. the
        sweep's and the callbacks'), committed at the end of the block. On SQLite it waits for
        its turn with the writer's batches, so neither waits inside SQLite."""
        async with contextlib.AsyncExitStack() as stack:
            if self._turn is not None:
                await stack.enter_async_context(self._turn)
            conn = await stack.enter_async_context(self.engine.begin())
            yield conn

    # -- hosts: reads ---------------------------------------------------------------------

    async def get_host(self, key: str, *, prefix: bool = False) -> Row | None:
        """A host by id, or by name (the live one, else the newest gone one); with ``prefix``
        (an operator's lookup), else by a unique prefix of its id (AmbiguousId if not unique)."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(hosts).where(hosts.c.id == key))).mappings().first()
            if row is None:
                row = (
                    await conn.execute(
                        select(hosts)
                        .where(or_(hosts.c.name == key, hosts.c.fqdn == key))
                        .order_by((hosts.c.state == HostState.GONE.value).asc(), hosts.c.created_at.desc())
                        .limit(1)
                    )
                ).mappings().first()
            if row is None and prefix:
                return await _by_prefix(conn, hosts, key, "host")
            return dict(row) if row else None

    async def live_names(self) -> list[str]:
        """The names and fully qualified names of the hosts that are not gone (for suggestions)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(hosts.c.name, hosts.c.fqdn).where(hosts.c.state != HostState.GONE.value))
            return sorted({n for row in rows for n in row})

    async def list_hosts(
        self,
        *,
        app: str | None = None,
        role: str | None = None,
        states: Iterable[str] | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[Row]:
        query = select(hosts).order_by(hosts.c.created_at, hosts.c.name)
        if app is not None:
            query = query.where(hosts.c.app == app)
        if role is not None:
            query = query.where(hosts.c.role == role)
        if states is not None:
            query = query.where(hosts.c.state.in_(list(states)))
        if ids is not None:
            query = query.where(hosts.c.id.in_(list(ids)))
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]

    async def count_by_state(self) -> dict[str, int]:
        """Hosts per state (states with none left out), from the counts the triggers keep: a few
        rows, however many hosts there are (every ``/metrics`` scrape asks)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(_STATE_COUNTS)
            return {state: n for state, n in rows}

    async def count_live_hosts(self) -> list[tuple[str, str, str, str, int]]:
        """Live hosts (not gone) by (app, role, provider, state), for ``/metrics``. One grouped
        read of the live hosts (both databases walk the partial index ``ix_hosts_live_seq``,
        never the gone ones): as many rows as the applications' caps allow, not the history
        (bench/metrics_scrape.py)."""
        async with self.engine.connect() as conn:
            return [(app or "", role or "", provider or "", state, int(n))
                    for app, role, provider, state, n in await conn.execute(_LIVE_HOSTS_GROUPED)]

    async def pending_by_app(self) -> dict[str, tuple[int, float]]:
        """Per application, its requests waiting for approval: how many, and when the oldest was
        made. One read of the requests (those the retention keeps)."""
        async with self.engine.connect() as conn:
            return {app or "": (int(n), float(oldest)) for app, n, oldest in await conn.execute(_PENDING_BY_APP)}

    async def live_count(self, app: str) -> int:
        """The application's live hosts (from the counts the triggers keep)."""
        async with self.engine.connect() as conn:
            return int((await conn.execute(_APP_LIVE_COUNT, {"app": app})).scalar_one())

    async def page_hosts(self, *, limit: int, after: Sequence[Any] | None = None, app: str | None = None,
                         state: str | None = None, live: bool = False) -> Page:
        """Hosts in the order they were made (``created_at``, then ``id``), ``limit`` at most,
        starting after the host whose (created_at, id) is ``after``; ``live``: not gone."""
        query = select(hosts)
        if app is not None:
            query = query.where(hosts.c.app == app)
        if state is not None:
            query = query.where(hosts.c.state == state)
        if live:
            query = query.where(_LIVE)
        return await self._page(query, (hosts.c.created_at, hosts.c.id), after, limit, descending=False)

    async def page_requests(self, *, limit: int, after: Sequence[Any] | None = None,
                            app: str | None = None) -> Page:
        """Requests newest first (``created_at``, then ``id``, descending), ``limit`` at most,
        starting after the request whose (created_at, id) is ``after``."""
        query = select(requests)
        if app is not None:
            query = query.where(requests.c.app == app)
        return await self._page(query, (requests.c.created_at, requests.c.id), after, limit, descending=True)

    async def page_events(self, *, limit: int, after: Sequence[Any] | None = None, host_id: str | None = None,
                          kind_prefix: str | None = None, newest_first: bool = True, host: str | None = None,
                          app: str | None = None, actor_prefix: str | None = None, since: float | None = None,
                          until: float | None = None) -> Page:
        """Audit events by ``id`` (newest first, or oldest first), ``limit`` at most, starting
        after the event whose id is ``after``, each with its host's FQDN (``host``, None for an
        event of no host). Filters: ``host`` (a name, FQDN or id: every host that had it, gone
        ones included), ``app`` (events of its hosts and its requests), ``kind_prefix``,
        ``actor_prefix`` (``operator`` matches every operator), ``since``/``until`` (Unix time)."""
        query = (select(events, hosts.c.fqdn.label("host"))
                 .select_from(events.outerjoin(hosts, hosts.c.id == events.c.host_id)))
        if host_id is not None:
            query = query.where(events.c.host_id == host_id)
        if host is not None:
            query = query.where(events.c.host_id.in_(
                select(hosts.c.id).where(or_(hosts.c.id == host, hosts.c.name == host, hosts.c.fqdn == host))))
        if app is not None:
            query = query.where(or_(hosts.c.app == app, events.c.request_id.in_(
                select(requests.c.id).where(requests.c.app == app))))
        if kind_prefix:
            query = query.where(events.c.kind.startswith(kind_prefix, autoescape=True))
        if actor_prefix:
            query = query.where(events.c.actor.startswith(actor_prefix, autoescape=True))
        if since is not None:
            query = query.where(events.c.ts >= since)
        if until is not None:
            query = query.where(events.c.ts < until)
        return await self._page(query, (events.c.id,), after, limit, descending=newest_first)

    async def _page(self, query: Select[Any], key: Sequence[ColumnElement[Any]], after: Sequence[Any] | None,
                    limit: int, *, descending: bool) -> Page:
        if after is not None:
            query = query.where(beyond(key, after, descending))
        order = [column.desc() if descending else column.asc() for column in key]
        async with self.engine.connect() as conn:
            rows = [dict(r) for r in (await conn.execute(query.order_by(*order).limit(limit + 1))).mappings()]
        if len(rows) <= limit:
            return Page(rows, None)
        rows = rows[:limit]
        return Page(rows, tuple(rows[-1][column.name] for column in key))

    # -- hosts: the engine's leased work --------------------------------------------------

    async def claim_due(self, owner: str, limit: int, lease_seconds: float) -> list[Row]:
        """Lease up to ``limit`` hosts that have work due and no live lease."""
        now = time.time()
        params = {"now": now, "limit": limit, "owner": owner, "expires": now + lease_seconds}
        return await self.writer.run(lambda conn: direct(conn, _CLAIM).all(conn, params))

    async def next_due_at(self) -> float | None:
        """When the earliest host with work and no live lease becomes due (for the engine's
        sleep; hosts in flight are the engine's own, it hears when they finish)."""
        async with self.engine.connect() as conn:
            value = (await conn.execute(_NEXT_DUE, {"now": time.time()})).scalar_one_or_none()
            return float(value) if value is not None else None

    async def renew_leases(self, owner: str, tokens: Mapping[str, int],
                           lease_seconds: float) -> dict[str, str | None]:
        """Extend the leases ``owner`` holds on the hosts of ``tokens`` (host id -> the fencing
        token it claimed the host with). Returns the hosts among them that were claimed again
        since (their leases ran out): the holder now, or None when the one that took the host
        over has released it already (the host rests, or waits for its next try). A host
        ``owner`` released itself (same token, no holder) is not lost."""
        if not tokens:
            return {}
        params = {"ids": list(tokens), "owner": owner, "expires": time.time() + lease_seconds}

        def job(conn: Connection) -> dict[str, str | None]:
            renewed = {row[0] for row in conn.execute(_RENEW, params)}
            missing = [host_id for host_id in tokens if host_id not in renewed]
            if not missing:
                return {}
            return {row[0]: row[1] for row in conn.execute(_LEASES_OF, {"ids": missing})
                    if row[2] != tokens[row[0]]}

        return await self.writer.run(job)

    async def reclaim(self, host_id: str, owner: str, token: int, lease_seconds: float) -> Row | None:
        """Lease again a host ``owner`` released itself (it was claimed with ``token``), unless
        it was claimed since: the new row (its token incremented, as by every claim), or None."""
        params = {"host_id": host_id, "owner": owner, "token": token, "expires": time.time() + lease_seconds}
        return await self.writer.run(lambda conn: direct(conn, _RECLAIM).first(conn, params))

    async def release_leases_of(self, owner: str) -> int:
        """Free the leases ``owner`` holds (its parked steps, at a clean stop)."""
        statement = update(hosts).where(hosts.c.lease_owner == owner).values(lease_owner=None, lease_expires=None)
        return await self.writer.run(lambda conn: conn.execute(statement).rowcount or 0)

    async def release_earlier_leases(self, instance: str, *, keep: str) -> int:
        """Free the leases held by earlier incarnations of the instance ``instance`` (owners
        ``instance/...`` but ``keep``, the running one): their steps resume at once."""
        where = and_(hosts.c.lease_owner.startswith(instance + "/", autoescape=True), hosts.c.lease_owner != keep)
        statement = update(hosts).where(where).values(lease_owner=None, lease_expires=None)
        return await self.writer.run(lambda conn: conn.execute(statement).rowcount or 0)

    async def release_leases(self, owner: str, ids: Sequence[str]) -> int:
        """Give back the leases ``owner`` still holds on hosts ``ids`` (fenced: a lease another
        instance took meanwhile stays its own); how many were given back."""
        if not ids:
            return 0
        statement = (update(hosts).where(hosts.c.id.in_(list(ids)), hosts.c.lease_owner == owner)
                     .values(lease_owner=None, lease_expires=None))
        return await self.writer.run(lambda conn: conn.execute(statement).rowcount or 0)

    async def fenced_update(
        self,
        host_id: str,
        owner: str,
        values: Row,
        *,
        token: int,
        event_kind: str | None = None,
        detail: Row | None = None,
        release: bool = False,
        binds: Row | None = None,
        after: Callable[[Connection, Row], None] | None = None,
        start_step: str | None = None,
    ) -> Row | None:
        """Update a host this instance holds the lease of, claimed with fencing token ``token``,
        with an audit event, in one transaction (shared with whatever else is committed in the
        same batch). Returns the new row, or None when the lease was lost: held by another owner,
        or claimed again since (a larger token), so a write from a stale claim changes nothing. ``after`` runs in the same transaction, given the
        new row (e.g. to free the host's address once it is gone).

        ``start_step``: the same commit also starts the host's next step (its first try counted,
        a ``step-started`` event), unless the host was asked to retire meanwhile; the engine
        then need not commit again before the step's external call.

        A write once submitted is committed even if the caller is cancelled (see GroupCommit),
        so a step cancelled at shutdown can never leave half an outcome recorded."""
        now = time.time()
        values = {**values, "updated_at": now}
        if "state" in values:
            values["state_since"] = now
        if release:
            values.update(lease_owner=None, lease_expires=None)
        if start_step is not None:
            values["attempts"] = _FIRST_TRY_UNLESS_RETIRING
        def job(conn: Connection) -> Row | None:
            statement, params = _fenced_statement(conn.dialect, values)
            params.update(binds or {}, fence_id=host_id, fence_owner=owner, fence_token=token)
            row = statement.first(conn, params)
            if row is None:
                return None
            if event_kind:
                defer(conn, _EVENT_INSERT, {
                    "ts": now, "host_id": host_id, "request_id": row["request_id"], "kind": event_kind,
                    "actor": "engine", "detail": detail or {}})
            if start_step is not None and not row["retire_requested"]:
                defer(conn, _EVENT_INSERT, {
                    "ts": now, "host_id": host_id, "request_id": row["request_id"], "kind": "step-started",
                    "actor": "engine", "detail": {"step": start_step, "attempt": 1}})
            if after is not None:
                after(conn, dict(row))
            return row

        return await self.writer.run(job)

    @staticmethod
    def release_address(conn: Connection, host_id: str) -> None:
        """Free the host's leased address (inside a fenced update's transaction)."""
        direct(conn, _RELEASE_ADDRESS).run(conn, [{"host_id": host_id}])

    # -- hosts: operator changes ----------------------------------------------------------

    async def operator_update(self, host_id: str, values: Row, *, actor: str, kind: str, detail: Row) -> Row:
        now = time.time()
        if "state" in values:
            values = {**values, "state_since": now}
        async with self.transaction() as conn:
            row = (
                await conn.execute(
                    update(hosts).where(hosts.c.id == host_id).values(**values, updated_at=now).returning(*hosts.c)
                )
            ).mappings().one()
            await conn.execute(
                insert(events).values(ts=now, host_id=host_id, request_id=None, kind=kind, actor=actor, detail=detail)
            )
            return dict(row)

    # -- requests and events --------------------------------------------------------------

    async def get_request(self, request_id: str, *, prefix: bool = False) -> Row | None:
        """A request by id; with ``prefix`` (an operator's lookup), else by a unique prefix of it."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(requests).where(requests.c.id == request_id))).mappings().first()
            if row is None and prefix:
                return await _by_prefix(conn, requests, request_id, "request")
            return dict(row) if row else None

    async def list_requests(self, *, app: str | None = None, limit: int = 100) -> list[Row]:
        query = select(requests).order_by(requests.c.created_at.desc()).limit(limit)
        if app is not None:
            query = query.where(requests.c.app == app)
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]

    async def pending_requests(self, app: str, *, actor: str | None = None) -> list[Row]:
        """The application's requests waiting for an operator's approval (made by ``actor``)."""
        query = select(requests).where(requests.c.state == "pending", requests.c.app == app)
        if actor is not None:
            query = query.where(requests.c.actor == actor)
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query.order_by(requests.c.created_at))).mappings()]

    async def add_event(
        self,
        conn: AsyncConnection,
        kind: str,
        *,
        actor: str,
        detail: Row,
        host_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        await conn.execute(
            insert(events).values(
                ts=time.time(), host_id=host_id, request_id=request_id, kind=kind, actor=actor, detail=detail
            )
        )

    async def list_events(self, *, host_id: str | None = None, limit: int = 200,
                          kind_prefix: str | None = None) -> list[Row]:
        query = select(events).order_by(events.c.id.desc()).limit(limit)
        if host_id is not None:
            query = query.where(events.c.host_id == host_id)
        if kind_prefix:
            query = query.where(events.c.kind.startswith(kind_prefix, autoescape=True))
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()][::-1]

    # -- the sweep ------------------------------------------------------------------------

    async def sweep_update_host(self, host_id: str, *, expect_state: str, expect_since: float | None, values: Row,
                                kind: str, actor: str, detail: Row) -> Row | None:
        """Change a resting host the sweep judged, only if it is still as judged: in
        ``expect_state`` since ``expect_since``, and not leased by the engine. One transaction
        with its audit event. Returns the new row, or None when the host had changed."""
        return await asyncio.shield(self._sweep_update_host(host_id, expect_state, expect_since, values, kind,
                                                            actor, detail))

    async def _sweep_update_host(self, host_id: str, expect_state: str, expect_since: float | None, values: Row,
                                 kind: str, actor: str, detail: Row) -> Row | None:
        now = time.time()
        since = hosts.c.state_since.is_(None) if expect_since is None else hosts.c.state_since == expect_since
        where = and_(hosts.c.id == host_id, hosts.c.state == expect_state, since, hosts.c.lease_owner.is_(None))
        changes = {**values, "updated_at": now}
        if "state" in values:
            changes["state_since"] = now
        async with self.transaction() as conn:
            row = (await conn.execute(update(hosts).where(where).values(**changes).returning(*hosts.c))).mappings().first()
            if row is None:
                return None
            await conn.execute(insert(events).values(ts=now, host_id=host_id, request_id=row["request_id"], kind=kind,
                                                     actor=actor, detail=detail))
            return dict(row)



# The decisions' statements, built once (see _CLAIM).
_FIND_REQUEST = select(requests).where(requests.c.app == bindparam("app"),
                                       requests.c.idempotency_key == bindparam("key"))
_FIND_OPERATOR_REQUEST = select(requests).where(requests.c.app.is_(None),
                                                requests.c.idempotency_key == bindparam("key"))
_REQUEST_BY_ID = select(requests).where(requests.c.id == bindparam("id"))
#: (the counts are kept in slots: see schema.SLOT)
_STATE_COUNTS = (select(state_counts.c.state, func.sum(state_counts.c.hosts).label("hosts")).group_by(state_counts.c.state)
                 .having(func.sum(state_counts.c.hosts) != 0))
_APP_LIVE_COUNT = select(func.coalesce(func.sum(live_counts.c.hosts), 0)).where(live_counts.c.app == bindparam("app"))
#: the live hosts' exact term of the partial index ``ix_hosts_live_seq`` (SQLite uses a partial
#: index only for a query that repeats its WHERE term)
_LIVE_HOSTS_GROUPED = (
    select(hosts.c.app, hosts.c.role, hosts.c.provider, hosts.c.state, func.count())
    .where(text("state != 'gone'")).group_by(hosts.c.app, hosts.c.role, hosts.c.provider, hosts.c.state)
)
_PENDING_BY_APP = (select(requests.c.app, func.count(), func.min(requests.c.created_at))
                   .where(requests.c.state == "pending").group_by(requests.c.app))
_INSERT_REQUEST = insert(requests)
_LIVE_COUNTS = (select(live_counts.c.provider, func.sum(live_counts.c.hosts).label("hosts")).where(live_counts.c.app == bindparam("app"))
                .group_by(live_counts.c.provider))
_RECENT_SCALE_UPS = (
    select(requests.c.updated_at, requests.c.params, requests.c.host_ids)
    .where(requests.c.app == bindparam("app"), requests.c.kind == "scale", requests.c.state == "accepted")
    .order_by(requests.c.updated_at.desc()).limit(50)
)
#: literally as ix_hosts_live_seq and ix_hosts_live_name say it (a bound 'gone' would keep
#: SQLite from using those partial indexes)
_LIVE = text("state != 'gone'")
_ROLE_LIVE = and_(hosts.c.app == bindparam("app"), hosts.c.role == bindparam("role"), _LIVE)
_ROLE_LIVE_COUNT = select(func.coalesce(func.sum(live_counts.c.hosts), 0)).where(
    live_counts.c.app == bindparam("app"), live_counts.c.role == bindparam("role"))
#: the highest number a live host of the role carries, and how many live hosts it has
_ROLE_NUMBERING = select(
    select(func.max(hosts.c.seq)).where(_ROLE_LIVE).scalar_subquery().label("highest"),
    _ROLE_LIVE_COUNT.scalar_subquery().label("live"),
)
_ROLE_SEQS = select(hosts.c.seq).where(_ROLE_LIVE, hosts.c.seq.is_not(None)).order_by(hosts.c.seq)
_LIVE_NAME = select(hosts.c.id).where(hosts.c.name == bindparam("name"), _LIVE)
_INSERT_HOST = insert(hosts)


class Transaction:
    """A decision's reads and writes, synchronous, in one transaction on the writer connection
    (see :meth:`Store.decide`). Audit events are written at the end of the transaction,
    together with those of every other write committed with it."""

    def __init__(self, conn: Connection, lock: Callable[[Connection, list[str]], None] = sqlite.lock) -> None:
        self.conn = conn
        self._lock = lock

    def lock(self, *keys: str) -> None:
        """Hold these locks (see :func:`app_lock`, :func:`network_lock`) until the transaction
        ends: advisory locks on PostgreSQL, nothing on SQLite (decisions take turns there).
        Take them before reading what they guard, and several at once in one call."""
        if keys:
            self._lock(self.conn, list(keys))

    # -- requests ---------------------------------------------------------------------------

    def find_request(self, app: str | None, key: str) -> Row | None:
        """The request made under this idempotency key (by ``app``; None: by an operator)."""
        if app is None:
            return direct(self.conn, _FIND_OPERATOR_REQUEST).first(self.conn, {"key": key})
        return direct(self.conn, _FIND_REQUEST).first(self.conn, {"app": app, "key": key})

    def request(self, request_id: str) -> Row | None:
        row = self.conn.execute(_REQUEST_BY_ID, {"id": request_id}).mappings().first()
        return dict(row) if row else None

    @staticmethod
    def new_request(**values: Any) -> Row:
        """A request row, not yet written (see :meth:`insert_request`)."""
        now = time.time()
        return {"id": str(uuid.uuid4()), "host_ids": [], "created_at": now, "updated_at": now, **values}

    def insert_request(self, row: Row) -> Row:
        direct(self.conn, _INSERT_REQUEST, row).run(self.conn, [row])
        return row

    def pending_requests(self, app: str | None) -> list[Row]:
        query = select(requests).where(requests.c.state == "pending")
        if app is not None:
            query = query.where(requests.c.app == app)
        return [dict(r) for r in self.conn.execute(query).mappings()]

    def update_request(self, request_id: str, **values: Any) -> None:
        self.conn.execute(update(requests).where(requests.c.id == request_id).values(**values))

    def last_scale_up(self, app: str) -> float | None:
        """When the application's newest accepted request that added hosts was accepted."""
        for updated_at, params, host_ids in self.conn.execute(_RECENT_SCALE_UPS, {"app": app}):
            # (a negative add, the threshold autoscaler's scale-down, released hosts)
            if host_ids and ((params.get("add") or 0) > 0 or params.get("count")):
                return float(updated_at)
        return None

    # -- counts -----------------------------------------------------------------------------

    def live_count_by_provider(self, app: str) -> dict[str, int]:
        """The application's live hosts on each provider (from the counts the triggers keep)."""
        counts: dict[str, int] = {}
        for row in direct(self.conn, _LIVE_COUNTS).all(self.conn, {"app": app}):
            counts[row["provider"]] = counts.get(row["provider"], 0) + row["hosts"]
        return {provider: n for provider, n in counts.items() if n}

    # -- hosts ------------------------------------------------------------------------------

    def hosts(self, *, ids: Sequence[str] | None = None, app: str | None = None, role: str | None = None,
              component: str | None = None, live: bool = False) -> list[Row]:
        query = select(hosts).order_by(hosts.c.created_at, hosts.c.name)
        if ids is not None:
            query = query.where(hosts.c.id.in_(list(ids)))
        if app is not None:
            query = query.where(hosts.c.app == app)
        if role is not None:
            query = query.where(hosts.c.role == role)
        if component is not None:
            query = query.where(hosts.c.component == component)
        if live:
            query = query.where(_LIVE)
        return [dict(r) for r in self.conn.execute(query).mappings()]

    def free_sequence_numbers(self, pattern: str, app: str, role: str, count: int) -> list[int]:
        """The ``count`` smallest numbers that, put into the role's name pattern, make a name no
        live host has. When the role's live hosts are numbered 1..n without a gap (the usual
        case) this reads two index entries, not the role's hosts; otherwise it walks the
        numbers in order only up to the gaps it fills."""
        if count <= 0:
            return []
        params = {"app": app, "role": role}
        numbered = direct(self.conn, _ROLE_NUMBERING).first(self.conn, params)
        assert numbered is not None
        highest = numbered["highest"] or 0
        if highest == numbered["live"]:
            candidates: Iterable[int] = itertools.count(highest + 1)
        else:
            candidates = self._unused_numbers(params)
        chosen: list[int] = []
        for batch in _batched(candidates, count):
            names = {pattern.format(app=app, role=role, seq=seq): seq for seq in batch}
            # a name can also be taken by a host this role did not number (adopted, renamed role)
            taken = {name for name in names if direct(self.conn, _LIVE_NAME).first(self.conn, {"name": name})}
            chosen += [seq for name, seq in names.items() if name not in taken][:count - len(chosen)]
            if len(chosen) == count:
                return chosen
        raise AssertionError("unreachable: the candidates are endless")

    def _unused_numbers(self, params: Row) -> Iterator[int]:
        """1, 2, 3 ... skipping the numbers live hosts of the role carry, read lazily in order."""
        expected = 1
        for (seq,) in self.conn.execute(_ROLE_SEQS, params):
            while expected < seq:
                yield expected
                expected += 1
            expected = max(expected, seq + 1)
        yield from itertools.count(expected)

    def number_unnumbered_hosts(self, pattern: str, app: str, role: str) -> int:
        """Fill in ``seq`` for the role's live hosts made before it was kept (read off their
        names); returns how many were filled."""
        rows = self.conn.execute(select(hosts.c.id, hosts.c.name).where(
            _ROLE_LIVE, hosts.c.seq.is_(None)), {"app": app, "role": role}).all()
        numbered = []
        for host_id, name in rows:
            found = _sequence_numbers(pattern, app, role, [name])
            if found:
                numbered.append({"host": host_id, "seq": found.pop()})
        if numbered:
            self.conn.execute(update(hosts).where(hosts.c.id == bindparam("host")).values(seq=bindparam("seq")),
                              numbered)
        return len(numbered)

    def allocate_addresses(
        self,
        network: str,
        first: ipaddress.IPv4Address,
        last: ipaddress.IPv4Address,
        host_ids: Sequence[str],
        skip: Iterable[ipaddress.IPv4Address] = (),
    ) -> list[ipaddress.IPv4Address] | None:
        """Lease the lowest free addresses of the range to ``host_ids``, one each, or none at all
        (None) when there are not enough."""
        taken = set(self.conn.execute(
            select(address_leases.c.address).where(address_leases.c.network == network)).scalars())
        taken |= {str(a) for a in skip}
        chosen: list[ipaddress.IPv4Address] = []
        candidate = first
        while len(chosen) < len(host_ids) and candidate <= last:
            if str(candidate) not in taken:
                chosen.append(candidate)
            candidate += 1
        if len(chosen) < len(host_ids):
            return None
        if chosen:
            self.conn.execute(insert(address_leases), [
                {"network": network, "address": str(address), "host_id": host_id}
                for address, host_id in zip(chosen, host_ids, strict=True)])
        return chosen

    def insert_hosts(self, many: Sequence[Row]) -> list[Row]:
        """Insert new host rows (one statement); NameTaken if a live host has one of the names."""
        rows = [_new_host_row(dict(values)) for values in many]
        if not rows:
            return []
        try:
            insert_rows(self.conn, _INSERT_HOST, rows)
        except (self.conn.dialect.loaded_dbapi.IntegrityError, IntegrityError) as exc:
            raise NameTaken(", ".join(r["name"] for r in rows)) from exc
        blank = {column.name: None for column in hosts.c}
        return [blank | row for row in rows]

    def host_by_fqdn(self, fqdn: str) -> Row | None:
        """The host of that FQDN: the live one, else the newest gone one."""
        row = self.conn.execute(
            select(hosts).where(hosts.c.fqdn == fqdn)
            .order_by((hosts.c.state == HostState.GONE.value).asc(), hosts.c.created_at.desc()).limit(1)
        ).mappings().first()
        return dict(row) if row else None

    def spend_autosign_token(self, host_id: str) -> bool:
        """Mark the host's one-time autosign token used, unless it was: True if this call spent
        it. One conditional UPDATE, so of two decisions only one can spend it."""
        result = self.conn.execute(
            update(hosts).where(hosts.c.id == host_id, hosts.c.autosign_used_at.is_(None))
            .values(autosign_used_at=time.time()))
        return bool(result.rowcount == 1)

    def retire(self, host_ids: Sequence[str]) -> dict[str, Row]:
        """Retire hosts, each according to the state it is in now (the caller's rows may be
        older): a resting one (ready, failed) moves straight on to ``retiring``; one in flight is
        flagged, and the engine retires it after its step. Returns, by host, the columns this
        changed, as they are now."""
        result = self.conn.execute(_RETIRE, {"ids": list(host_ids), "now": time.time()}).mappings()
        return {row["id"]: dict(row) for row in result}

    def drain(self, host_ids: Sequence[str]) -> dict[str, Row]:
        """Move hosts that are ready (and not asked to retire) to ``draining``, due at once (the
        engine asks the drain hooks, then waits); the others are left as they are. Returns, by
        host, the columns this changed, as they are now."""
        result = self.conn.execute(_DRAIN, {"ids": list(host_ids), "now": time.time()}).mappings()
        return {row["id"]: dict(row) for row in result}

    def has_event(self, host_id: str, kind: str) -> bool:
        """Whether the host's audit trail has an event of ``kind``."""
        return self.conn.execute(select(events.c.id).where(events.c.host_id == host_id, events.c.kind == kind)
                                 .limit(1)).first() is not None

    # -- events -----------------------------------------------------------------------------

    def add_event(self, kind: str, *, actor: str, detail: Row, host_id: str | None = None,
                  request_id: str | None = None) -> None:
        defer(self.conn, _EVENT_INSERT, {"ts": time.time(), "host_id": host_id,
                                                      "request_id": request_id, "kind": kind, "actor": actor,
                                                      "detail": detail})

    def add_events(self, rows: Sequence[Row]) -> None:
        """Several audit events; each row has kind, actor, detail and optionally host_id and
        request_id."""
        now = time.time()
        for row in rows:
            defer(self.conn, _EVENT_INSERT, {"ts": now, "host_id": None, "request_id": None, **row})


_RESTING = hosts.c.state.in_([HostState.READY.value, HostState.FAILED.value])


def _when_resting(value: Any, otherwise: Any) -> Any:
    return case((_RESTING, value), else_=otherwise)


_RETIRE = (
    update(hosts).where(hosts.c.id.in_(bindparam("ids", expanding=True))).values(
        state=_when_resting(HostState.RETIRING.value, hosts.c.state),
        retire_requested=_when_resting(False, True),
        attempts=_when_resting(0, hosts.c.attempts),
        failed_step=_when_resting(None, hosts.c.failed_step),
        error=_when_resting(None, hosts.c.error),
        state_since=_when_resting(bindparam("now"), hosts.c.state_since),
        next_attempt_at=0.0,
        updated_at=bindparam("now"),
    ).returning(hosts.c.id, hosts.c.state, hosts.c.retire_requested, hosts.c.attempts, hosts.c.failed_step,
                hosts.c.error, hosts.c.state_since, hosts.c.next_attempt_at, hosts.c.updated_at)
)


_DRAIN = (
    update(hosts).where(hosts.c.id.in_(bindparam("ids", expanding=True)), hosts.c.state == HostState.READY.value,
                        hosts.c.retire_requested.is_(False))
    .values(state=HostState.DRAINING.value, attempts=0, state_since=bindparam("now"), next_attempt_at=0.0,
            updated_at=bindparam("now"))
    .returning(hosts.c.id, hosts.c.state, hosts.c.retire_requested, hosts.c.attempts, hosts.c.failed_step,
               hosts.c.error, hosts.c.state_since, hosts.c.next_attempt_at, hosts.c.updated_at)
)


def _new_host_row(values: Row) -> Row:
    now = time.time()
    return {
        "id": values.pop("id", None) or str(uuid.uuid4()),
        "tags": [],
        "addresses": [],
        "classification": {},
        "registrations": {},
        "profile": {},
        "tags_rev": 0,
        "retire_requested": False,
        "attempts": 0,
        "next_attempt_at": 0.0,
        "created_at": now,
        "updated_at": now,
        "state_since": now,
        **values,
    }


def _batched(items: Iterable[int], size: int) -> Iterator[tuple[int, ...]]:
    """``items`` in tuples of ``size`` (itertools.batched from Python 3.12)."""
    iterator = iter(items)
    while batch := tuple(itertools.islice(iterator, size)):
        yield batch


class CertificateStore:
    """The application certificates governord issued, and revocations of certificates a site CA
    issued (a mixin-free helper over the store's engine). A revocation is of an issuer and a
    serial: one CA's serial never revokes another CA's certificate.

    Every request of the applications' API asks whether its certificate is revoked, so the
    revoked (issuer, serial) pairs are kept in memory, and read again from the database once the
    copy is ``refresh`` seconds old: several instances may share the database, and any of them
    may revoke. The bound: a certificate revoked through any instance is refused by every
    instance for each request checked more than ``refresh`` seconds after the revocation was
    committed (a check uses a copy whose read began less than ``refresh`` seconds before it,
    and a read sees every revocation committed before it began), and by the instance that
    revoked it at once (:meth:`revoke` and :meth:`revoke_site` drop the copy). A request that
    finds the copy too old waits for the next read; requests arriving meanwhile share it.

    The check costs a clock reading and a set lookup; the read, once per ``refresh`` seconds,
    is two small queries (bench/RESULTS.md, "Revocations": a plain re-read costs about what a
    query for a version of the set would, for the sets a site has). When the read fails (the
    database unreachable) the check raises: an unverifiable certificate is never let through."""

    def __init__(self, store: Store, *, refresh: float = 2.0) -> None:
        self.store = store
        self.engine = store.engine
        #: seconds a read of the revocations is used for (``[store] revocation_refresh``)
        self.refresh = refresh
        self._revoked: set[tuple[str, str]] | None = None
        #: when the read of ``_revoked`` began (monotonic)
        self._read_at = 0.0
        #: bumped by every revocation through this instance: a read begun before one is not kept
        self._revocations = 0
        self._reading = asyncio.Lock()
        #: the last read, if it failed: when it ended (monotonic) and why
        self._failure: tuple[float, Exception] | None = None

    async def record(self, *, serial: str, app: str, common_name: str, not_after: float, issuer: str) -> None:
        async with self.store.transaction() as conn:
            await conn.execute(insert(app_certificates).values(
                serial=serial, app=app, common_name=common_name, issued_at=time.time(), not_after=not_after,
                issuer=issuer))

    async def list(self, app: str | None = None) -> list[Row]:
        query = select(app_certificates).order_by(app_certificates.c.issued_at)
        if app is not None:
            query = query.where(app_certificates.c.app == app)
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]

    async def list_site(self, app: str | None = None) -> builtins.list[Row]:
        """Revocations of site-CA certificates, oldest first."""
        query = select(site_revocations).order_by(site_revocations.c.revoked_at)
        if app is not None:
            query = query.where(site_revocations.c.app == app)
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]

    def _changed(self) -> None:
        # once committed (a revocation that failed refuses nothing); read afresh at next use
        self._revocations += 1
        self._revoked = None

    async def revoke(self, app: str, *, actor: str, serial: str | None = None) -> builtins.list[str]:
        where = and_(app_certificates.c.app == app, app_certificates.c.revoked_at.is_(None))
        if serial is not None:
            where = and_(where, app_certificates.c.serial == serial)
        async with self.store.transaction() as conn:
            result = await conn.execute(
                update(app_certificates).where(where).values(revoked_at=time.time(), revoked_by=actor)
                .returning(app_certificates.c.serial))
            serials = [r[0] for r in result]
        self._changed()
        return serials

    async def revoke_site(self, app: str, *, issuer: str, serial: str, actor: str) -> bool:
        """Revoke the certificate ``serial`` of the site CA ``issuer`` (for ``app``); False if it
        was revoked before."""
        async with self.store.transaction() as conn:
            known = await conn.execute(select(site_revocations.c.app).where(
                and_(site_revocations.c.issuer == issuer, site_revocations.c.serial == serial)))
            if known.first() is not None:
                return False
            await conn.execute(insert(site_revocations).values(
                issuer=issuer, serial=serial, app=app, revoked_at=time.time(), revoked_by=actor))
        self._changed()
        return True

    async def revoked(self, issuer: str, serial: str) -> bool:
        """Whether the certificate ``serial`` of ``issuer`` (RFC 4514 name) is revoked."""
        now = time.monotonic()
        known = self._revoked
        if known is None or now - self._read_at >= self.refresh:
            known = await self._read(now)
        return (issuer, serial) in known

    async def _read(self, arrived: float) -> set[tuple[str, str]]:
        """The revocations as read after ``arrived - refresh``: one read at a time; a caller
        that waited for another's read uses it if it began late enough, and shares its failure
        (the database unreachable: callers do not queue up to fail one after the other)."""
        async with self._reading:
            known = self._revoked
            if known is not None and arrived - self._read_at < self.refresh:
                return known
            if self._failure is not None and self._failure[0] > arrived:
                raise self._failure[1].with_traceback(None)
            revocations, began = self._revocations, time.monotonic()
            try:
                async with self.engine.connect() as conn:
                    own = await conn.execute(select(app_certificates.c.issuer, app_certificates.c.serial)
                                             .where(app_certificates.c.revoked_at.is_not(None)))
                    known = {(row[0], row[1]) for row in own}
                    site = await conn.execute(select(site_revocations.c.issuer, site_revocations.c.serial))
                    known |= {(row[0], row[1]) for row in site}
            except Exception as exc:
                self._failure = (time.monotonic(), exc)
                raise
            self._failure = None
            if revocations == self._revocations:
                self._revoked, self._read_at = known, began
            return known
