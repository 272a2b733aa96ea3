"""decisions without reading every host: live host counts kept by triggers, each host's name
sequence number with an index of the live ones, the requests by application and age

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

LIVE = "state != 'gone'"

# the triggers as schema.LIVE_COUNT_TRIGGERS has them at this revision (a migration does not
# import the schema module: it must keep building this revision whatever the schema becomes)
_KEY = "app, role, provider"


def _count(row: str, delta: int) -> str:
    key = f"{row}.app, coalesce({row}.role, ''), coalesce({row}.provider, '')"
    return (f"INSERT INTO live_counts ({_KEY}, hosts) SELECT {key}, {delta} "
            f"WHERE {row}.app IS NOT NULL AND {row}.state != 'gone' "
            f"ON CONFLICT ({_KEY}) DO UPDATE SET hosts = hosts + excluded.hosts;")


TRIGGERS = {
    "hosts_live_count_insert": f"CREATE TRIGGER hosts_live_count_insert AFTER INSERT ON hosts BEGIN {_count('NEW', 1)} END",
    "hosts_live_count_delete": f"CREATE TRIGGER hosts_live_count_delete AFTER DELETE ON hosts BEGIN {_count('OLD', -1)} END",
    "hosts_live_count_update": (
        "CREATE TRIGGER hosts_live_count_update AFTER UPDATE OF state, app, role, provider ON hosts "
        "WHEN (OLD.state = 'gone') != (NEW.state = 'gone') OR OLD.app IS NOT NEW.app OR OLD.role IS NOT NEW.role "
        f"OR OLD.provider IS NOT NEW.provider BEGIN {_count('OLD', -1)} {_count('NEW', 1)} END"),
}


# PostgreSQL's, as schema.LIVE_COUNT_FUNCTIONS_PG and LIVE_COUNT_TRIGGERS_PG have them at this
# revision: the same counts by plpgsql, the two rows of a move touched in the order of their keys
FUNCTIONS_PG = {
    "hosts_live_count_add(text, text, text, integer)": """CREATE FUNCTION hosts_live_count_add(k_app text, k_role text, k_provider text, delta integer)
RETURNS void LANGUAGE sql AS $$
INSERT INTO live_counts (app, role, provider, hosts) VALUES (k_app, coalesce(k_role, ''), coalesce(k_provider, ''), delta)
ON CONFLICT (app, role, provider) DO UPDATE SET hosts = live_counts.hosts + excluded.hosts
$$""",
    "hosts_live_count()": """CREATE FUNCTION hosts_live_count() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  was_live boolean;
  is_live boolean;
BEGIN
  IF TG_OP = 'INSERT' THEN
    was_live = false;
  ELSE
    was_live = OLD.app IS NOT NULL AND OLD.state <> 'gone';
  END IF;
  IF TG_OP = 'DELETE' THEN
    is_live = false;
  ELSE
    is_live = NEW.app IS NOT NULL AND NEW.state <> 'gone';
  END IF;
  IF was_live AND is_live AND (ARRAY[OLD.app, coalesce(OLD.role, ''), coalesce(OLD.provider, '')]
                               > ARRAY[NEW.app, coalesce(NEW.role, ''), coalesce(NEW.provider, '')]) THEN
    PERFORM hosts_live_count_add(NEW.app, NEW.role, NEW.provider, 1);
    PERFORM hosts_live_count_add(OLD.app, OLD.role, OLD.provider, -1);
  ELSE
    IF was_live THEN
      PERFORM hosts_live_count_add(OLD.app, OLD.role, OLD.provider, -1);
    END IF;
    IF is_live THEN
      PERFORM hosts_live_count_add(NEW.app, NEW.role, NEW.provider, 1);
    END IF;
  END IF;
  RETURN NULL;
END
$$""",
}
TRIGGERS_PG = {
    "hosts_live_count_insert":
        "CREATE TRIGGER hosts_live_count_insert AFTER INSERT ON hosts FOR EACH ROW EXECUTE FUNCTION hosts_live_count()",
    "hosts_live_count_delete":
        "CREATE TRIGGER hosts_live_count_delete AFTER DELETE ON hosts FOR EACH ROW EXECUTE FUNCTION hosts_live_count()",
    "hosts_live_count_update": (
        "CREATE TRIGGER hosts_live_count_update AFTER UPDATE OF state, app, role, provider ON hosts FOR EACH ROW "
        "WHEN ((OLD.state = 'gone') IS DISTINCT FROM (NEW.state = 'gone') OR OLD.app IS DISTINCT FROM NEW.app "
        "OR OLD.role IS DISTINCT FROM NEW.role OR OLD.provider IS DISTINCT FROM NEW.provider) "
        "EXECUTE FUNCTION hosts_live_count()"),
}


def _postgres() -> bool:
    dialect = op.get_bind().dialect.name
    if dialect not in ("sqlite", "postgresql"):
        raise NotImplementedError(f"revision 0007 keeps live_counts with triggers of SQLite and PostgreSQL, not {dialect}")
    return dialect == "postgresql"


def upgrade() -> None:
    postgres = _postgres()
    # plain ADD COLUMN (no batch copy of the table): the new column is NULL for every host so
    # far; the daemon fills in the live ones' numbers from their names at start
    op.add_column("hosts", sa.Column("seq", sa.Integer()))
    op.create_index("ix_hosts_live_seq", "hosts", ["app", "role", "seq"], sqlite_where=sa.text(LIVE),
                    postgresql_where=sa.text(LIVE))
    op.create_table(
        "live_counts",
        sa.Column("app", sa.String(255), primary_key=True),
        sa.Column("role", sa.String(255), primary_key=True),
        sa.Column("provider", sa.String(255), primary_key=True),
        sa.Column("hosts", sa.Integer(), nullable=False),
    )
    op.execute(
        f"INSERT INTO live_counts ({_KEY}, hosts) SELECT app, coalesce(role, ''), coalesce(provider, ''), count(*) "
        f"FROM hosts WHERE app IS NOT NULL AND {LIVE} GROUP BY 1, 2, 3")
    for statement in (*FUNCTIONS_PG.values(), *TRIGGERS_PG.values()) if postgres else TRIGGERS.values():
        op.execute(statement)
    op.create_index("ix_requests_app_updated", "requests", ["app", "updated_at"])


def downgrade() -> None:
    postgres = _postgres()
    op.drop_index("ix_requests_app_updated", "requests")
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER {name} ON hosts" if postgres else f"DROP TRIGGER {name}")
    for signature in FUNCTIONS_PG if postgres else ():
        op.execute(f"DROP FUNCTION {signature}")
    op.drop_table("live_counts")
    op.drop_index("ix_hosts_live_seq", "hosts")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("seq")
