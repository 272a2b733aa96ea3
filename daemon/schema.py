"""The store's tables (SQLAlchemy Core). Changes go through an Alembic migration in
``governord/migrations/versions``; tests/unit/test_store.py checks the two agree."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

#: One row per host governord manages or managed: the persisted state machine.
hosts = Table(
    "hosts",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("fqdn", String(255), nullable=False),
    Column("app", String(255)),
    Column("role", String(255)),
    Column("origin", String(16), nullable=False),
    Column("state", String(32), nullable=False),
    Column("failed_step", String(32)),
    Column("error", Text),
    Column("provider", String(255)),
    Column("machine_id", String(255)),
    Column("tags", JSON, nullable=False),
    #: bumped whenever an operator changes the tags; registration commits only if unchanged
    Column("tags_rev", Integer, nullable=False, server_default=text("0")),
    Column("addresses", JSON, nullable=False),
    Column("classification", JSON, nullable=False),
    Column("registrations", JSON, nullable=False),
    Column("network", String(255)),
    Column("address", String(64)),
    Column("profile", JSON, nullable=False),
    Column("request_id", String(36)),
    #: the deployed component (NAMESPACE/NAME) whose webhook rule made the host, if one did
    Column("component", String(255)),
    #: set by a retirement that arrives while a step is running; acted on after it
    Column("retire_requested", Boolean, nullable=False, server_default=text("0")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", Float, nullable=False, server_default=text("0")),
    Column("lease_owner", String(255)),
    Column("lease_expires", Float),
    #: when the host entered its current state (readiness timeouts count from here)
    Column("state_since", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)
# A name is unique among hosts that still exist; gone hosts keep theirs for the audit trail.
Index(
    "ix_hosts_live_name",
    hosts.c.name,
    unique=True,
    sqlite_where=text("state != 'gone'"),
    postgresql_where=text("state != 'gone'"),
)
Index("ix_hosts_work", hosts.c.state, hosts.c.next_attempt_at)
#: Hosts with work to do (every state but the resting ones): the engine's queue. Written out
#: literally because SQLite uses a partial index only for a query that repeats its WHERE term,
#: so the engine's claim says exactly this.
WORKING = text("state NOT IN ('ready', 'failed', 'gone')")
# The engine's claim walks this in order and stops at its limit, however many hosts rest.
Index("ix_hosts_due", hosts.c.next_attempt_at, hosts.c.updated_at, sqlite_where=WORKING, postgresql_where=WORKING)
Index("ix_hosts_app", hosts.c.app, hosts.c.role)

#: Every request an application or an operator made, with its idempotency key and outcome.
requests = Table(
    "requests",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("app", String(255)),
    Column("actor", String(255), nullable=False),
    Column("idempotency_key", String(255)),
    Column("kind", String(32), nullable=False),
    Column("params", JSON, nullable=False),
    Column("state", String(32), nullable=False),
    Column("reason", Text),
    Column("host_ids", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("app", "idempotency_key", name="uq_requests_idempotency"),
)

#: Append-only audit trail: transitions, step starts and failures, decisions.
events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("host_id", String(36)),
    Column("request_id", String(36)),
    Column("kind", String(64), nullable=False),
    Column("actor", String(255)),
    Column("detail", JSON, nullable=False),
)
Index("ix_events_host", events.c.host_id, events.c.id)

#: Static addresses handed out from configured networks.
address_leases = Table(
    "address_leases",
    metadata,
    Column("network", String(255), primary_key=True),
    Column("address", String(64), primary_key=True),
    Column("host_id", String(36), nullable=False),
)

#: Client certificates governord issued to applications; a revoked one is refused at once.
app_certificates = Table(
    "app_certificates",
    metadata,
    Column("serial", String(64), primary_key=True),
    Column("app", String(255), nullable=False),
    Column("common_name", String(255), nullable=False),
    Column("issued_at", Float, nullable=False),
    Column("not_after", Float, nullable=False),
    Column("revoked_at", Float),
    Column("revoked_by", String(255)),
)
Index("ix_app_certificates_app", app_certificates.c.app)

#: Signed notifications owed to applications (their request's callback_url): a durable outbox.
callbacks = Table(
    "callbacks",
    metadata,
    Column("request_id", String(36), primary_key=True),
    Column("app", String(255), nullable=False),
    Column("url", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_at", Float, nullable=False),
    Column("delivered_at", Float),
    Column("gave_up_at", Float),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
)
