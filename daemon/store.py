"""The durable store: SQLite (WAL) in the state directory by default, through SQLAlchemy Core
so that PostgreSQL can serve several governord instances later.

Every write is its own committed transaction. Work is claimed with leases: a host row being
worked on carries ``lease_owner`` and ``lease_expires``; the engine's writes are fenced on the
lease (``WHERE lease_owner = me``), so a process that lost its lease can never overwrite the
work of the one that took over.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import and_, create_engine, event, func, insert, or_, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .models import ACTIVE_STATES, LIVE_STATES, HostOrigin, HostState, HostView
from .schema import address_leases, app_certificates, events, hosts, requests

Row = dict[str, Any]

_ACTIVE = [s.value for s in ACTIVE_STATES]
_LIVE = [s.value for s in LIVE_STATES]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (the API) run while the engine writes; NORMAL sync is durable in WAL
    # mode except for the last transactions on power loss, never corrupting.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def migrate(url: str) -> None:
    """Bring the database at ``url`` (a synchronous SQLAlchemy URL) to the newest schema."""
    engine = create_engine(url)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
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
    )


class NameTaken(Exception):
    """A live host already has this name."""


class Store:
    """All reads and writes of governord's state."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @classmethod
    async def open_sqlite(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        migrate(f"sqlite:///{path}")
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()

    # -- hosts: reads ---------------------------------------------------------------------

    async def get_host(self, key: str) -> Row | None:
        """A host by id, or by name (the live one, else the newest gone one)."""
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
            return dict(row) if row else None

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
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(hosts.c.state, func.count()).group_by(hosts.c.state))
            return {state: n for state, n in rows}

    async def live_count(self, conn: AsyncConnection, app: str) -> int:
        query = select(func.count()).where(hosts.c.app == app, hosts.c.state.in_(_LIVE))
        return int((await conn.execute(query)).scalar_one())

    # -- hosts: creation ------------------------------------------------------------------

    async def next_names(self, conn: AsyncConnection, pattern: str, app: str, role: str, count: int) -> list[int]:
        """The ``count`` smallest sequence numbers whose name no live host carries."""
        live = set(
            (await conn.execute(select(hosts.c.name).where(hosts.c.state.in_(_LIVE)))).scalars()
        )
        seqs: list[int] = []
        seq = 1
        while len(seqs) < count:
            if pattern.format(app=app, role=role, seq=seq) not in live:
                seqs.append(seq)
            seq += 1
        return seqs

    async def allocate_address(
        self,
        conn: AsyncConnection,
        network: str,
        first: ipaddress.IPv4Address,
        last: ipaddress.IPv4Address,
        host_id: str,
        skip: Iterable[ipaddress.IPv4Address] = (),
    ) -> ipaddress.IPv4Address | None:
        taken = set(
            (
                await conn.execute(select(address_leases.c.address).where(address_leases.c.network == network))
            ).scalars()
        ) | {str(a) for a in skip}
        candidate = first
        while candidate <= last:
            if str(candidate) not in taken:
                await conn.execute(
                    insert(address_leases).values(network=network, address=str(candidate), host_id=host_id)
                )
                return candidate
            candidate += 1
        return None

    async def insert_host(self, conn: AsyncConnection, **values: Any) -> Row:
        now = time.time()
        row: Row = {
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
        try:
            await conn.execute(insert(hosts).values(**row))
        except IntegrityError as exc:
            raise NameTaken(row["name"]) from exc
        return {column.name: None for column in hosts.c} | row

    # -- hosts: the engine's leased work --------------------------------------------------

    async def claim_due(self, owner: str, limit: int, lease_seconds: float) -> list[Row]:
        """Lease up to ``limit`` hosts that have work due and no live lease."""
        now = time.time()
        due = (
            select(hosts.c.id)
            .where(
                hosts.c.state.in_(_ACTIVE),
                hosts.c.next_attempt_at <= now,
                or_(hosts.c.lease_owner.is_(None), hosts.c.lease_expires < now),
            )
            .order_by(hosts.c.next_attempt_at, hosts.c.updated_at)
            .limit(limit)
            .scalar_subquery()
        )
        stmt = (
            update(hosts)
            .where(hosts.c.id.in_(due))
            .values(lease_owner=owner, lease_expires=now + lease_seconds)
            .returning(*hosts.c)
        )
        async with self.engine.begin() as conn:
            return [dict(r) for r in (await conn.execute(stmt)).mappings()]

    async def next_due_at(self) -> float | None:
        """When the earliest not-yet-due active host becomes due (for the engine's sleep)."""
        async with self.engine.connect() as conn:
            query = select(func.min(hosts.c.next_attempt_at)).where(hosts.c.state.in_(_ACTIVE))
            value = (await conn.execute(query)).scalar_one_or_none()
            return float(value) if value is not None else None

    async def renew_leases(self, owner: str, ids: Sequence[str], lease_seconds: float) -> None:
        if not ids:
            return
        async with self.engine.begin() as conn:
            await conn.execute(
                update(hosts)
                .where(hosts.c.id.in_(list(ids)), hosts.c.lease_owner == owner)
                .values(lease_expires=time.time() + lease_seconds)
            )

    async def release_leases_of(self, owner_prefix: str) -> int:
        """Free the leases a previous, dead process of this node held (its steps resume)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(hosts)
                .where(hosts.c.lease_owner.like(owner_prefix + "%"))
                .values(lease_owner=None, lease_expires=None)
            )
            return result.rowcount or 0

    async def fenced_update(
        self,
        host_id: str,
        owner: str,
        values: Row,
        *,
        event_kind: str | None = None,
        detail: Row | None = None,
        release: bool = False,
        extra_where: Any = None,
    ) -> Row | None:
        """Update a host this process holds the lease of, with an audit event, in one
        transaction. Returns the new row, or None when the lease was lost.

        Shielded: a step cancelled at shutdown still finishes (commits or rolls back) the write it
        started, so it can never leave the database locked or half an outcome recorded."""
        return await asyncio.shield(
            self._fenced_update(host_id, owner, values, event_kind=event_kind, detail=detail, release=release,
                                extra_where=extra_where)
        )

    async def _fenced_update(
        self,
        host_id: str,
        owner: str,
        values: Row,
        *,
        event_kind: str | None,
        detail: Row | None,
        release: bool,
        extra_where: Any,
    ) -> Row | None:
        now = time.time()
        values = {**values, "updated_at": now}
        if "state" in values:
            values["state_since"] = now
        if release:
            values.update(lease_owner=None, lease_expires=None)
        where = and_(hosts.c.id == host_id, hosts.c.lease_owner == owner)
        async with self.engine.begin() as conn:
            result = await conn.execute(update(hosts).where(where).values(**values).returning(*hosts.c))
            row = result.mappings().first()
            if row is None:
                return None
            if event_kind:
                await conn.execute(
                    insert(events).values(
                        ts=now, host_id=host_id, request_id=row["request_id"], kind=event_kind,
                        actor="engine", detail=detail or {},
                    )
                )
            if extra_where is not None:
                await extra_where(conn, row)
            return dict(row)

    async def release_address(self, conn: AsyncConnection, host_id: str) -> None:
        await conn.execute(address_leases.delete().where(address_leases.c.host_id == host_id))

    # -- hosts: operator changes ----------------------------------------------------------

    async def operator_update(self, host_id: str, values: Row, *, actor: str, kind: str, detail: Row) -> Row:
        now = time.time()
        if "state" in values:
            values = {**values, "state_since": now}
        async with self.engine.begin() as conn:
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

    async def find_request(self, conn: AsyncConnection, app: str | None, key: str) -> Row | None:
        query = select(requests).where(requests.c.idempotency_key == key)
        query = query.where(requests.c.app.is_(None) if app is None else requests.c.app == app)
        row = (await conn.execute(query)).mappings().first()
        return dict(row) if row else None

    async def insert_request(self, conn: AsyncConnection, **values: Any) -> Row:
        now = time.time()
        row: Row = {"id": str(uuid.uuid4()), "host_ids": [], "created_at": now, "updated_at": now, **values}
        await conn.execute(insert(requests).values(**row))
        return row

    async def last_scale_up(self, conn: AsyncConnection, app: str) -> float | None:
        """When the application's newest accepted request that added hosts was accepted."""
        rows = await conn.execute(
            select(requests.c.updated_at, requests.c.params, requests.c.host_ids)
            .where(requests.c.app == app, requests.c.kind == "scale", requests.c.state == "accepted")
            .order_by(requests.c.updated_at.desc()).limit(50)
        )
        for updated_at, params, host_ids in rows:
            if host_ids and (params.get("add") or params.get("count")):
                return float(updated_at)
        return None

    async def live_count_by_provider(self, conn: AsyncConnection, app: str) -> dict[str, int]:
        query = (select(hosts.c.provider, func.count()).where(hosts.c.app == app, hosts.c.state.in_(_LIVE))
                 .group_by(hosts.c.provider))
        return {provider: n for provider, n in await conn.execute(query) if provider}

    async def pending_requests(self, conn: AsyncConnection, app: str | None) -> list[Row]:
        query = select(requests).where(requests.c.state == "pending")
        if app is not None:
            query = query.where(requests.c.app == app)
        return [dict(r) for r in (await conn.execute(query)).mappings()]

    async def find_request_by_id(self, conn: AsyncConnection, request_id: str) -> Row | None:
        row = (await conn.execute(select(requests).where(requests.c.id == request_id))).mappings().first()
        return dict(row) if row else None

    async def set_request_state(self, conn: AsyncConnection, request_id: str, state: str, reason: str | None) -> None:
        await conn.execute(update(requests).where(requests.c.id == request_id)
                           .values(state=state, reason=reason, updated_at=time.time()))

    async def set_request_hosts(self, conn: AsyncConnection, request_id: str, host_ids: list[str]) -> None:
        await conn.execute(update(requests).where(requests.c.id == request_id).values(host_ids=host_ids))

    async def get_request(self, request_id: str) -> Row | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(requests).where(requests.c.id == request_id))).mappings().first()
            return dict(row) if row else None

    async def list_requests(self, *, app: str | None = None, limit: int = 100) -> list[Row]:
        query = select(requests).order_by(requests.c.created_at.desc()).limit(limit)
        if app is not None:
            query = query.where(requests.c.app == app)
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]

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
        async with self.engine.begin() as conn:
            row = (await conn.execute(update(hosts).where(where).values(**changes).returning(*hosts.c))).mappings().first()
            if row is None:
                return None
            await conn.execute(insert(events).values(ts=now, host_id=host_id, request_id=row["request_id"], kind=kind,
                                                     actor=actor, detail=detail))
            return dict(row)



class CertificateStore:
    """The application certificates governord issued (a mixin-free helper over the store's engine)."""

    def __init__(self, store: Store) -> None:
        self.engine = store.engine

    async def record(self, *, serial: str, app: str, common_name: str, not_after: float) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(app_certificates).values(
                serial=serial, app=app, common_name=common_name, issued_at=time.time(), not_after=not_after))

    async def list(self, app: str | None = None) -> list[Row]:
        query = select(app_certificates).order_by(app_certificates.c.issued_at)
        if app is not None:
            query = query.where(app_certificates.c.app == app)
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings()]

    async def revoke(self, app: str, *, actor: str, serial: str | None = None) -> list[str]:
        where = and_(app_certificates.c.app == app, app_certificates.c.revoked_at.is_(None))
        if serial is not None:
            where = and_(where, app_certificates.c.serial == serial)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(app_certificates).where(where).values(revoked_at=time.time(), revoked_by=actor)
                .returning(app_certificates.c.serial))
            return [r[0] for r in result]

    async def revoked(self, serial: str) -> bool:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(app_certificates.c.revoked_at)
                                      .where(app_certificates.c.serial == serial))).first()
        return row is not None and row[0] is not None
