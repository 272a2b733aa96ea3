"""bounded growth: host counts by state kept by triggers (metrics without a scan), and the
indexes the paged lists and the retention walk in order

Revision ID: 0009
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0007"
branch_labels = None
depends_on = None


# the triggers as schema.STATE_COUNT_TRIGGERS has them at this revision (a migration does not
# import the schema module: it must keep building this revision whatever the schema becomes)
def _count(row: str, delta: int) -> str:
    return (f"INSERT INTO state_counts (state, hosts) VALUES ({row}.state, {delta}) "
            "ON CONFLICT (state) DO UPDATE SET hosts = hosts + excluded.hosts;")


TRIGGERS = {
    "hosts_state_count_insert": f"CREATE TRIGGER hosts_state_count_insert AFTER INSERT ON hosts BEGIN {_count('NEW', 1)} END",
    "hosts_state_count_delete": f"CREATE TRIGGER hosts_state_count_delete AFTER DELETE ON hosts BEGIN {_count('OLD', -1)} END",
    "hosts_state_count_update": (
        "CREATE TRIGGER hosts_state_count_update AFTER UPDATE OF state ON hosts WHEN OLD.state != NEW.state "
        f"BEGIN {_count('OLD', -1)} {_count('NEW', 1)} END"),
}

INDEXES = {
    "ix_hosts_created": ("hosts", ["created_at", "id"]),
    "ix_hosts_app_created": ("hosts", ["app", "created_at", "id"]),
    "ix_requests_created": ("requests", ["created_at", "id"]),
    "ix_requests_app_created": ("requests", ["app", "created_at", "id"]),
}


# PostgreSQL's, as schema.py has them at this revision: one plpgsql function run once per
# statement on hosts, the statement's changed rows summed into one delta per key, applied in key
# order (two statements moving hosts in opposite directions cannot deadlock on the count rows)
def _pg_moves(table: str, sign: int, live: bool) -> str:
    if live:
        return (f"SELECT app, coalesce(role, '') AS role, coalesce(provider, '') AS provider, {sign} AS delta "
                f"FROM {table} WHERE app IS NOT NULL AND state <> 'gone'")
    return f"SELECT state, {sign} AS delta FROM {table}"


def _pg_function(name: str, target: str, key: str, live: bool) -> str:
    """A statement-level trigger function: the statement's changed rows (its transition tables)
    summed into one delta per key, applied in the order of the keys (so that two statements
    moving hosts in opposite directions cannot deadlock on the count rows)."""
    def apply(moves: str) -> str:
        return (f"INSERT INTO {target} ({key}, hosts) SELECT {key}, sum(delta) FROM ({moves}) AS moves "
                f"GROUP BY {key} HAVING sum(delta) <> 0 ORDER BY {key} "
                f"ON CONFLICT ({key}) DO UPDATE SET hosts = {target}.hosts + excluded.hosts;")
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


FUNCTIONS_PG = {"hosts_state_count()": _pg_function("hosts_state_count", "state_counts", "state", live=False)}
TRIGGERS_PG = _pg_triggers("hosts_state_count")


def _postgres() -> bool:
    dialect = op.get_bind().dialect.name
    if dialect not in ("sqlite", "postgresql"):
        raise NotImplementedError(f"revision 0009 keeps state_counts with triggers of SQLite and PostgreSQL, not {dialect}")
    return dialect == "postgresql"


def upgrade() -> None:
    postgres = _postgres()
    op.create_table(
        "state_counts",
        sa.Column("state", sa.String(32), primary_key=True),
        sa.Column("hosts", sa.Integer(), nullable=False),
    )
    op.execute("INSERT INTO state_counts (state, hosts) SELECT state, count(*) FROM hosts GROUP BY state")
    for statement in (*FUNCTIONS_PG.values(), *TRIGGERS_PG.values()) if postgres else TRIGGERS.values():
        op.execute(statement)
    for name, (table, columns) in INDEXES.items():
        op.create_index(name, table, columns)


def downgrade() -> None:
    postgres = _postgres()
    for name, (table, _columns) in INDEXES.items():
        op.drop_index(name, table)
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER {name} ON hosts" if postgres else f"DROP TRIGGER {name}")
    for signature in FUNCTIONS_PG if postgres else ():
        op.execute(f"DROP FUNCTION {signature}")
    op.drop_table("state_counts")
