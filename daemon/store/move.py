"""Moving a store from SQLite to PostgreSQL (``governord-ctl store move``): a site that began
on one host, with ``governord.db`` in its state directory, takes its whole state along when it
grows into several instances on one PostgreSQL database.

Every table of :data:`governord.store.schema.metadata` is copied, so a table added later moves
without a change here; the target's schema comes from the migrations, as any instance's does.
The move:

- never changes what the source holds. It is read inside one SQLite transaction, rolled back,
  taken in exclusive locking mode, which SQLite grants only if no other connection has the file
  open (an idle daemon's included, in this process or another): a source in use is refused,
  and while the move runs no one can open it. (Transactions a killed daemon left in the
  write-ahead log are read with the rest and, as by any SQLite client that closes the file
  last, folded into it.) When the source sits in a state directory, the daemon's own lock
  (``governord.lock``, see governord.daemon) is taken too, so no daemon starts there meanwhile;
- refuses a source whose schema is not this governord's newest (it would be upgraded, which is
  a change: starting the daemon once on it does that), and one made by a newer governord;
- refuses a target in which any of the store's tables holds a row, naming the table: a move
  never merges two states. It looks before bringing the target's schema up to date (the
  migrations run only on an empty database) and again inside the copy's transaction;
- copies in batches inside ONE target transaction, the tables locked against writers, and checks
  that each table holds as many rows as the source's before committing: if anything fails the
  target is left with its tables and no row in them, and the move can simply be run again;
- leaves the tables that triggers keep (:data:`~governord.store.schema.KEPT_BY_TRIGGERS`, the
  live and per-state host counts) to the target's triggers, which count the hosts as they are
  inserted. Copying them as well would count every host twice; the counts derive from the hosts
  and the target's are made by the same triggers that keep them afterwards. They are compared
  with the source's all the same (rows whose counts are all zero aside, as SQLite keeps those
  and PostgreSQL's triggers need not make them): a difference is reported, as it means the
  source's counts had drifted from its hosts, not that the target's are wrong;
- sets every sequence behind a column (``events.id``) past the highest id copied, so the next
  insert gets a fresh id.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Table, create_engine, func, insert, inspect, or_, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import ColumnElement

from . import JSON_CODEC, head_revision, known_revisions, migrate
from .schema import KEPT_BY_TRIGGERS, SLOT, metadata

#: rows read from the source and inserted into the target at a time
BATCH = 1000
#: seconds the source's exclusive lock is waited for (a connection that has the file open never
#: lets go of its claim on it: waiting longer would not help)
BUSY_TIMEOUT = 2.0
#: the daemon's lock in its state directory (governord.daemon.Daemon._lock_state_dir)
DAEMON_LOCK = "governord.lock"

#: progress(table, rows copied so far, rows in all), once before a table and after each batch
Progress = Callable[[str, int, int], None]


class MoveRefused(Exception):
    """The move cannot start as things are (the source in use or on another schema, the target
    not empty, not PostgreSQL, a bad URL). Nothing was written."""


class MoveFailed(Exception):
    """The move failed on the way (a database error, the counts not agreeing). The target's
    transaction was rolled back: it holds no row."""


@dataclass
class TableMoved:
    name: str
    #: rows in the source's table, and now in the target's
    rows: int
    #: kept by the target's triggers, not copied (see the module's docstring)
    derived: bool = False
    #: for a derived table: the keys whose counts differ from the source's (rows whose counts
    #: are all zero count as absent)
    differing: int = 0


@dataclass
class Moved:
    """What a move did."""

    source: Path
    #: the target's URL, its password hidden
    target: str
    revision: str
    tables: list[TableMoved] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(table.rows for table in self.tables if not table.derived)


def postgresql_url(url: str) -> str:
    """``url`` as the store opens it (``postgresql://`` means psycopg 3), if it names a
    PostgreSQL database; :class:`MoveRefused` otherwise."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise MoveRefused("the target is not a database URL (postgresql+psycopg://HOST:PORT/DB)") from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername != "postgresql+psycopg":
        raise MoveRefused(f"the target must be a PostgreSQL database (postgresql+psycopg://HOST:PORT/DB), "
                          f"not {parsed.drivername}")
    if not parsed.host or not parsed.database:
        raise MoveRefused("the target's URL needs a host and a database: postgresql+psycopg://HOST:PORT/DB")
    return parsed.render_as_string(hide_password=False)


def sqlite_path(source: str | Path) -> Path:
    """The file of a SQLite store given as a path or as ``sqlite:///PATH``."""
    text_ = str(source)
    if "://" not in text_:
        return Path(text_)
    try:
        parsed = make_url(text_)
    except ArgumentError:
        raise MoveRefused(f"the source is neither a path nor a database URL: {text_!r}") from None
    if parsed.drivername != "sqlite" or not parsed.database or parsed.database == ":memory:":
        raise MoveRefused(f"the source must be a SQLite store (a path, or sqlite:///PATH), not {parsed.drivername}")
    return Path(parsed.database)


def move(source: str | Path, target_url: str, *, state_dir: Path | None = None, batch: int = BATCH,
         progress: Progress | None = None) -> Moved:
    """Move the SQLite store ``source`` (a path or ``sqlite:///PATH``) into the empty PostgreSQL
    database at ``target_url`` (password included, as the store opens it). ``state_dir``: the
    state directory whose daemon lock is taken as well (default: the source's directory, where
    the daemon keeps its store unless told otherwise).

    :raises MoveRefused: before anything was written.
    :raises MoveFailed: the target's transaction was rolled back.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    target_url = postgresql_url(target_url)
    path = sqlite_path(source)
    if not path.is_file():
        raise MoveRefused(f"no SQLite store at {path}" + (" (not a file)" if path.exists() else ""))
    shown = make_url(target_url).render_as_string(hide_password=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_daemon_lock(state_dir or path.parent))
        source_conn = stack.enter_context(_exclusive_source(path))
        revision = _source_revision(source_conn, path)
        target = postgresql_engine(target_url)
        stack.callback(target.dispose)
        _refuse_rows(target, shown)
        try:
            migrate(target_url)
        except SQLAlchemyError as exc:
            raise MoveFailed(f"bringing the schema of {shown} up to date failed: {_reason(exc)}") from None
        moved = Moved(path, shown, revision)
        try:
            with target.begin() as target_conn:
                _lock_tables(target_conn)
                _refuse_rows(target_conn, shown)  # nothing written while the migrations ran
                # the tables the triggers keep last: they are made as the hosts go in
                for table in sorted(metadata.sorted_tables, key=lambda t: bool(t.info.get(KEPT_BY_TRIGGERS))):
                    moved.tables.append(_move_table(source_conn, target_conn, table, batch, progress))
                _reset_sequences(target_conn)
        except SQLAlchemyError as exc:
            raise MoveFailed(f"the move was rolled back, {shown} holds no row: {_reason(exc)}") from None
        return moved


def postgresql_engine(url: str) -> Engine:
    """An engine without a pool on the target: the move uses one connection at a time."""
    return create_engine(url, poolclass=NullPool, **JSON_CODEC)


def _reason(exc: SQLAlchemyError) -> str:
    """The database's own words for a failure, without SQLAlchemy's statement and parameters (the
    rows of the store, which may be many, and are not the operator's to read in an error)."""
    said = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return f"{type(said).__name__}: {' '.join(str(said).split())}"  # one line: libpq's run over several


@contextlib.contextmanager
def _daemon_lock(state_dir: Path) -> Iterator[None]:
    """Hold the daemon's lock of ``state_dir`` (if there is one: a directory a daemon never ran
    in has none, and none is made) for the whole move: refused while a daemon holds it, and no
    daemon starts there until the move is done."""
    lock = state_dir / DAEMON_LOCK
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    except OSError as exc:
        raise MoveRefused(f"cannot open the daemon's lock {lock}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MoveRefused(f"a governord is running on {state_dir} (it holds {lock}): stop it first, "
                              "then move") from None
        yield
    finally:
        os.close(fd)  # and with it the lock


@contextlib.contextmanager
def _exclusive_source(path: Path) -> Iterator[Connection]:
    """A connection to the SQLite file at ``path`` (never created: ``mode=rw``) inside one
    transaction in exclusive locking mode, rolled back at the end: SQLite grants it only when
    no other connection has the file open, and keeps every other connection out until it
    closes. In WAL mode a connection that merely has the file open keeps a claim on it, so
    even an idle daemon is seen."""
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?mode=rw"

    def connect() -> sqlite3.Connection:
        # autocommit at the driver: the transaction below is begun explicitly, as EXCLUSIVE
        return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None,
                               check_same_thread=False)

    engine = create_engine("sqlite://", creator=connect, poolclass=NullPool, **JSON_CODEC)
    try:
        with engine.connect() as conn:
            try:
                conn.exec_driver_sql("PRAGMA locking_mode=EXCLUSIVE")
                conn.exec_driver_sql("BEGIN EXCLUSIVE")
            except DBAPIError as exc:
                if "locked" in str(exc.orig) or "busy" in str(exc.orig):
                    raise MoveRefused(f"{path} is in use (a governord, or another program, has it open): "
                                      "stop it first, then move") from None
                raise MoveRefused(f"cannot read {path} as a SQLite store: {_reason(exc)}") from None
            try:
                yield conn
            finally:
                conn.rollback()  # read only: nothing to keep
    finally:
        engine.dispose()


def _source_revision(conn: Connection, path: Path) -> str:
    """The source's schema revision, if it is this governord's newest; :class:`MoveRefused`
    otherwise."""
    try:
        found = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
    except DBAPIError as exc:
        if "no such table" in str(exc.orig):
            raise MoveRefused(f"{path} is no governord store (it has no alembic_version table)") from None
        raise MoveRefused(f"cannot read {path} as a SQLite store: {_reason(exc)}") from None
    head = head_revision()
    if found == [head]:
        return head
    if len(found) != 1:
        raise MoveRefused(f"{path} is no governord store (its alembic_version holds {len(found)} rows)")
    if found[0] in known_revisions():
        raise MoveRefused(f"{path} has the schema of revision {found[0]}, this governord's is {head}: start "
                          "this version of governord once on it as it is (still on SQLite) so that it "
                          "upgrades the schema, stop it, then move")
    raise MoveRefused(f"{path} has the schema of revision {found[0]}, which this governord does not know "
                      f"(its newest is {head}): a newer governord made it, move it with that version")


def _counted(table: Table) -> ColumnElement[bool] | None:
    """The rows of ``table`` that count as rows: all of them, but for a table the triggers keep,
    those whose counts are not all zero."""
    if not table.info.get(KEPT_BY_TRIGGERS):
        return None
    return or_(*(column != 0 for column in table.c if not column.primary_key))


def _refuse_rows(bind: Engine | Connection, shown: str) -> None:
    """:class:`MoveRefused` naming the first table of the target that holds a row. Before the
    migrations only the store's tables that already exist are looked at."""

    def look(conn: Connection) -> None:
        existing = set(inspect(conn).get_table_names())
        for table in metadata.sorted_tables:
            if table.name not in existing:
                continue
            query = select(1).select_from(table)
            if (where := _counted(table)) is not None:
                query = query.where(where)
            if conn.execute(query.limit(1)).first() is not None:
                raise MoveRefused(f"{shown} is not empty: table {table.name} holds rows (a move never merges "
                                  "two stores: move into a new, empty database)")

    try:
        if isinstance(bind, Connection):
            look(bind)
        else:
            with bind.connect() as conn:
                look(conn)
    except SQLAlchemyError as exc:
        raise MoveFailed(f"cannot read {shown}, nothing was written: {_reason(exc)}") from None


def _lock_tables(conn: Connection) -> None:
    """Keep every other writer (an instance started on the target meanwhile) out of the store's
    tables until the move commits; readers still see them empty."""
    names = ", ".join(conn.dialect.identifier_preparer.format_table(table) for table in metadata.sorted_tables)
    conn.execute(text(f"LOCK TABLE {names} IN EXCLUSIVE MODE"))


def _count(conn: Connection, table: Table) -> int:
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _derived_rows(conn: Connection, table: Table) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """A table the triggers keep: its counts by key (summed over the slots a count is kept in,
    see :data:`~governord.store.schema.SLOT`), keys whose counts are all zero left out."""
    keys = [column for column in table.primary_key.columns if column.name != SLOT]
    sums = [func.sum(column) for column in table.c if not column.primary_key]
    query = select(*keys, *sums).group_by(*keys).having(or_(*(total != 0 for total in sums)))
    return {tuple(row[:len(keys)]): tuple(row[len(keys):]) for row in conn.execute(query)}


def _move_table(source: Connection, target: Connection, table: Table, batch: int,
                progress: Progress | None) -> TableMoved:
    total = _count(source, table)
    if table.info.get(KEPT_BY_TRIGGERS):
        # made by the target's triggers as the hosts went in: compared, not copied
        ours, theirs = _derived_rows(source, table), _derived_rows(target, table)
        differing = sum(ours.get(key) != theirs.get(key) for key in ours.keys() | theirs.keys())
        if progress is not None:
            progress(table.name, len(theirs), len(theirs))
        return TableMoved(table.name, len(theirs), derived=True, differing=differing)
    if progress is not None:
        progress(table.name, 0, total)
    order = list(table.primary_key.columns) or list(table.c)
    result = source.execute(select(table).order_by(*order).execution_options(yield_per=batch))
    copied = 0
    for rows in result.mappings().partitions():
        target.execute(insert(table), [dict(row) for row in rows])
        copied += len(rows)
        if progress is not None:
            progress(table.name, copied, total)
    arrived = _count(target, table)
    if copied != total or arrived != total:
        # raised inside the target's transaction: rolled back like on any database error
        raise MoveFailed(f"the move was rolled back: table {table.name} has {total} rows in the source, "
                         f"{copied} were read and {arrived} are in the target")
    return TableMoved(table.name, total)


def _reset_sequences(conn: Connection) -> None:
    """Set the sequence behind every serial or identity column past the highest value copied, so
    that the next insert takes a fresh one (``events.id``)."""
    for table in metadata.sorted_tables:
        for column in table.c:
            sequence = conn.execute(text("SELECT pg_get_serial_sequence(:table, :column)"),
                                    {"table": table.name, "column": column.name}).scalar_one()
            if sequence is None:
                continue
            highest = conn.execute(select(func.max(column))).scalar_one()
            # setval(s, n, false): the next value is n itself
            conn.execute(text("SELECT setval(CAST(:sequence AS regclass), :next, false)"),
                         {"sequence": sequence, "next": (highest or 0) + 1})

