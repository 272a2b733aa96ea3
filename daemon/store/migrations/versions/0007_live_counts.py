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


FUNCTIONS_PG = {"hosts_live_count()": _pg_function("hosts_live_count", "live_counts", "app, role, provider", live=True)}
TRIGGERS_PG = _pg_triggers("hosts_live_count")


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
