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


# PostgreSQL's, as schema.STATE_COUNT_FUNCTIONS_PG and STATE_COUNT_TRIGGERS_PG have them at this
# revision: the two rows of a move touched in the order of their keys
FUNCTIONS_PG = {
    "hosts_state_count_add(text, integer)": """CREATE FUNCTION hosts_state_count_add(k_state text, delta integer) RETURNS void LANGUAGE sql AS $$
INSERT INTO state_counts (state, hosts) VALUES (k_state, delta)
ON CONFLICT (state) DO UPDATE SET hosts = state_counts.hosts + excluded.hosts
$$""",
    "hosts_state_count()": """CREATE FUNCTION hosts_state_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    PERFORM hosts_state_count_add(NEW.state, 1);
  ELSIF TG_OP = 'DELETE' THEN
    PERFORM hosts_state_count_add(OLD.state, -1);
  ELSIF OLD.state < NEW.state THEN
    PERFORM hosts_state_count_add(OLD.state, -1);
    PERFORM hosts_state_count_add(NEW.state, 1);
  ELSE
    PERFORM hosts_state_count_add(NEW.state, 1);
    PERFORM hosts_state_count_add(OLD.state, -1);
  END IF;
  RETURN NULL;
END
$$""",
}
TRIGGERS_PG = {
    "hosts_state_count_insert":
        "CREATE TRIGGER hosts_state_count_insert AFTER INSERT ON hosts FOR EACH ROW EXECUTE FUNCTION hosts_state_count()",
    "hosts_state_count_delete":
        "CREATE TRIGGER hosts_state_count_delete AFTER DELETE ON hosts FOR EACH ROW EXECUTE FUNCTION hosts_state_count()",
    "hosts_state_count_update": (
        "CREATE TRIGGER hosts_state_count_update AFTER UPDATE OF state ON hosts FOR EACH ROW "
        "WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION hosts_state_count()"),
}


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
