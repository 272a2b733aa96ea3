"""The store's tables (SQLAlchemy Core). Changes go through an Alembic migration in
``governord/migrations/versions``; tests/unit/test_store.py checks the two agree."""

from __future__ import annotations

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
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
    event,
    false,
    text,
)

metadata = MetaData()

#: ``Table.info`` key of a table whose rows triggers on another table keep (counts of ``hosts``):
#: derived, never written by the code, so a copy of the store (governord.store.move) leaves them
#: to the target's own triggers instead of copying them.
KEPT_BY_TRIGGERS = "kept_by_triggers"

#: The count tables' ``slot`` column: part of their key, so that one count is kept in several
#: rows whose sum is the count. On PostgreSQL each connection adds to the rows of its own slot
#: (its backend's pid modulo :data:`COUNT_SLOTS`), so transactions that move hosts at once, in
#: one instance or several, do not wait for each other's commit on one row per state (a row
#: lock every change of state took, which made every writer of the fleet take turns). SQLite
#: has one writer and keeps every count in slot 0. Readers sum over the slots.
SLOT = "slot"
COUNT_SLOTS = 16

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
    #: the number its role's name pattern was filled with ({seq}); NULL for adopted hosts
    Column("seq", Integer),
    #: set by a retirement that arrives while a step is running; acted on after it
    Column("retire_requested", Boolean, nullable=False, server_default=false()),
    #: when the host's one-time Puppet autosign token was spent (a CSR signed with it); NULL: not yet
    Column("autosign_used_at", Float),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", Float, nullable=False, server_default=text("0")),
    #: the instance working on the host now (``INSTANCE/<incarnation>``) and until when
    Column("lease_owner", String(255)),
    Column("lease_expires", Float),
    #: the fencing token: grows by one with every claim of the host and is kept when the lease
    #: is released; every write of a step names the token it claimed with, so a write from an
    #: earlier claim (an instance paused past its lease) changes nothing
    Column("lease_token", BigInteger, nullable=False, server_default=text("0")),
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
#: The host lists' order (keyset paging, see governord.api.paging), overall and per application;
#: the retention's walk over old hosts uses the first too.
Index("ix_hosts_created", hosts.c.created_at, hosts.c.id)
Index("ix_hosts_app_created", hosts.c.app, hosts.c.created_at, hosts.c.id)
#: The live sequence numbers of each role, in order: the next free name is found without
#: reading the role's other hosts.
Index("ix_hosts_live_seq", hosts.c.app, hosts.c.role, hosts.c.seq,
      sqlite_where=text("state != 'gone'"), postgresql_where=text("state != 'gone'"))

#: How many live hosts (not gone) each application has of each role on each provider, kept by
#: triggers on ``hosts`` (LIVE_COUNT_TRIGGERS) in the same transaction as the change: caps are
#: decided from a few rows instead of counting every host of the application.
live_counts = Table(
    "live_counts",
    metadata,
    Column("app", String(255), primary_key=True),
    Column("role", String(255), primary_key=True),
    Column("provider", String(255), primary_key=True),
    Column(SLOT, Integer, primary_key=True, server_default=text("0")),
    Column("hosts", Integer, nullable=False),
    info={KEPT_BY_TRIGGERS: True},
)

_COUNT_KEY = "app, role, provider"


def _count(row: str, delta: int) -> str:
    """The statement that adds ``delta`` to the count of ``row`` (OLD or NEW), if it is live."""
    key = f"{row}.app, coalesce({row}.role, ''), coalesce({row}.provider, '')"
    return (f"INSERT INTO live_counts ({_COUNT_KEY}, hosts) SELECT {key}, {delta} "
            f"WHERE {row}.app IS NOT NULL AND {row}.state != 'gone' "
            f"ON CONFLICT ({_COUNT_KEY}, {SLOT}) DO UPDATE SET hosts = hosts + excluded.hosts;")


#: SQLite's triggers keeping ``live_counts``; the migration that made the table creates them
#: too. (A batch migration that copies ``hosts`` drops its triggers: create them again after.)
LIVE_COUNT_TRIGGERS = (
    f"CREATE TRIGGER hosts_live_count_insert AFTER INSERT ON hosts BEGIN {_count('NEW', 1)} END",
    f"CREATE TRIGGER hosts_live_count_delete AFTER DELETE ON hosts BEGIN {_count('OLD', -1)} END",
    # only the updates that move a host in or out of a count: most transitions change neither
    "CREATE TRIGGER hosts_live_count_update AFTER UPDATE OF state, app, role, provider ON hosts "
    "WHEN (OLD.state = 'gone') != (NEW.state = 'gone') OR OLD.app IS NOT NEW.app OR OLD.role IS NOT NEW.role "
    f"OR OLD.provider IS NOT NEW.provider BEGIN {_count('OLD', -1)} {_count('NEW', 1)} END",
)
for _trigger in LIVE_COUNT_TRIGGERS:
    event.listen(live_counts, "after_create", DDL(_trigger).execute_if(dialect="sqlite"))

def _pg_moves(table: str, sign: int, live: bool) -> str:
    if live:
        return (f"SELECT app, coalesce(role, '') AS role, coalesce(provider, '') AS provider, {sign} AS delta "
                f"FROM {table} WHERE app IS NOT NULL AND state <> 'gone'")
    return f"SELECT state, {sign} AS delta FROM {table}"


def _pg_function(name: str, target: str, key: str, live: bool) -> str:
    """A statement-level trigger function: the statement's changed rows (its transition tables)
    summed into one delta per key, added to the rows of this connection's slot (see
    :data:`SLOT`) in the order of the keys (so that two statements moving hosts in opposite
    directions cannot deadlock on the count rows)."""
    def apply(moves: str) -> str:
        return (f"INSERT INTO {target} ({key}, {SLOT}, hosts) "
                f"SELECT {key}, mod(pg_backend_pid(), {COUNT_SLOTS}), sum(delta) FROM ({moves}) AS moves "
                f"GROUP BY {key} HAVING sum(delta) <> 0 ORDER BY {key} "
                f"ON CONFLICT ({key}, {SLOT}) DO UPDATE SET hosts = {target}.hosts + excluded.hosts;")
    return (f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n"
            f"  IF TG_OP = 'INSERT' THEN\n    {apply(_pg_moves('new_rows', 1, live))}\n"
            f"  ELSIF TG_OP = 'DELETE' THEN\n    {apply(_pg_moves('old_rows', -1, live))}\n"
            f"  ELSE\n    {apply(_pg_moves('old_rows', -1, live) + ' UNION ALL ' + _pg_moves('new_rows', 1, live))}\n"
            "  END IF;\n  RETURN NULL;\nEND\n$$")


def _pg_triggers(prefix: str) -> dict[str, str]:
    """The statement-level triggers on ``hosts`` that run function ``prefix``."""
    return {
        f"{prefix}_insert": f"CREATE TRIGGER {prefix}_insert AFTER INSERT ON hosts REFERENCING NEW TABLE AS new_rows "
                            f"FOR EACH STATEMENT EXECUTE FUNCTION {prefix}()",
        f"{prefix}_delete": f"CREATE TRIGGER {prefix}_delete AFTER DELETE ON hosts REFERENCING OLD TABLE AS old_rows "
                            f"FOR EACH STATEMENT EXECUTE FUNCTION {prefix}()",
        f"{prefix}_update": f"CREATE TRIGGER {prefix}_update AFTER UPDATE ON hosts "
                            "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
                            f"FOR EACH STATEMENT EXECUTE FUNCTION {prefix}()",
    }


#: PostgreSQL's: the same counts, kept by a plpgsql function run once per statement on
#: ``hosts`` (see _pg_function); migration 0007 creates them too.
LIVE_COUNT_FUNCTIONS_PG = (_pg_function("hosts_live_count", "live_counts", "app, role, provider", live=True),)
LIVE_COUNT_TRIGGERS_PG = tuple(_pg_triggers("hosts_live_count").values())
for _trigger in (*LIVE_COUNT_FUNCTIONS_PG, *LIVE_COUNT_TRIGGERS_PG):
    event.listen(live_counts, "after_create", DDL(_trigger).execute_if(dialect="postgresql"))

#: How many hosts are in each state, kept by triggers on ``hosts`` (STATE_COUNT_TRIGGERS) in the
#: same transaction as the change: ``/metrics`` and ``/v1/status`` read these few rows instead of
#: counting every host per scrape. Kept by the database, not in the daemon's memory, so it stays
#: right whoever writes (several instances on one database, a restore, a hand-made fix).
state_counts = Table(
    "state_counts",
    metadata,
    Column("state", String(32), primary_key=True),
    Column(SLOT, Integer, primary_key=True, server_default=text("0")),
    Column("hosts", Integer, nullable=False),
    info={KEPT_BY_TRIGGERS: True},
)


def _state_count(row: str, delta: int) -> str:
    return (f"INSERT INTO state_counts (state, hosts) VALUES ({row}.state, {delta}) "
            f"ON CONFLICT (state, {SLOT}) DO UPDATE SET hosts = hosts + excluded.hosts;")


#: SQLite's triggers keeping ``state_counts`` (the migration that made the table creates them too).
STATE_COUNT_TRIGGERS = (
    f"CREATE TRIGGER hosts_state_count_insert AFTER INSERT ON hosts BEGIN {_state_count('NEW', 1)} END",
    f"CREATE TRIGGER hosts_state_count_delete AFTER DELETE ON hosts BEGIN {_state_count('OLD', -1)} END",
    ("CREATE TRIGGER hosts_state_count_update AFTER UPDATE OF state ON hosts WHEN OLD.state != NEW.state "
     f"BEGIN {_state_count('OLD', -1)} {_state_count('NEW', 1)} END"),
)
for _trigger in STATE_COUNT_TRIGGERS:
    event.listen(state_counts, "after_create", DDL(_trigger).execute_if(dialect="sqlite"))

#: PostgreSQL's, as for live_counts (migration 0009 creates them too).
STATE_COUNT_FUNCTIONS_PG = (_pg_function("hosts_state_count", "state_counts", "state", live=False),)
STATE_COUNT_TRIGGERS_PG = tuple(_pg_triggers("hosts_state_count").values())
for _trigger in (*STATE_COUNT_FUNCTIONS_PG, *STATE_COUNT_TRIGGERS_PG):
    event.listen(state_counts, "after_create", DDL(_trigger).execute_if(dialect="postgresql"))


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
#: An application's newest requests first (the cooldown looks at its latest scale-up).
Index("ix_requests_app_updated", requests.c.app, requests.c.updated_at)
#: The request lists' order (newest first, keyset paging), overall and per application; the
#: retention walks the first from the oldest.
Index("ix_requests_created", requests.c.created_at, requests.c.id)
Index("ix_requests_app_created", requests.c.app, requests.c.created_at, requests.c.id)

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
    #: the issuing CA's name (RFC 4514): a revocation is of an issuer and a serial
    Column("issuer", Text, nullable=False, server_default=text("'CN=governord CA'")),
)
Index("ix_app_certificates_app", app_certificates.c.app)

#: Certificates a site CA issued (api.tls.client_ca) that an operator revoked with
#: `governord-ctl apps revoke APP --serial S`: refused like governord's own revoked ones.
site_revocations = Table(
    "site_revocations",
    metadata,
    Column("issuer", Text, primary_key=True),
    Column("serial", String(64), primary_key=True),
    Column("app", String(255), nullable=False),
    Column("revoked_at", Float, nullable=False),
    Column("revoked_by", String(255), nullable=False),
)

#: Signed notifications owed to applications: a durable outbox. A request's outcome (its
#: callback_url), keyed by the request's id; or a host event (``payload`` set: the body to send,
#: e.g. a host that drains), keyed by a delivery id of its own, with the host in ``host_id``.
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
    Column("host_id", String(36)),
    Column("payload", JSON),
)

#: The instances sharing this store (see governord.fleet): one row per instance name, written
#: by the instance itself at start, at each heartbeat and at a clean stop.
instances = Table(
    "instances",
    metadata,
    Column("name", String(128), primary_key=True),
    #: the running incarnation (``NAME/<random>``): the lease owner of its steps
    Column("owner", String(255), nullable=False),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("version", String(64), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    #: when it stopped cleanly; NULL while it runs (or since it died)
    Column("stopped_at", Float),
    #: host steps running on it at its last heartbeat
    Column("in_flight", Integer, nullable=False, server_default=text("0")),
)

#: Named leases of the fleet-wide jobs (``leader``: the periodic jobs; ``sweep`` and
#: ``retention``: one run at a time, whoever asked). The token grows with every new holder.
fleet_leases = Table(
    "fleet_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(255)),
    Column("token", BigInteger, nullable=False, server_default=text("0")),
    Column("expires_at", Float),
    Column("acquired_at", Float),
)
