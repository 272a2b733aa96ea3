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


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        raise NotImplementedError("revision 0007 keeps live_counts with SQLite triggers; write them for this database")
    # plain ADD COLUMN (no batch copy of the table): the new column is NULL for every host so
    # far; the daemon fills in the live ones' numbers from their names at start
    op.add_column("hosts", sa.Column("seq", sa.Integer()))
    op.create_index("ix_hosts_live_seq", "hosts", ["app", "role", "seq"], sqlite_where=sa.text(LIVE))
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
    for statement in TRIGGERS.values():
        op.execute(statement)
    op.create_index("ix_requests_app_updated", "requests", ["app", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_requests_app_updated", "requests")
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER {name}")
    op.drop_table("live_counts")
    op.drop_index("ix_hosts_live_seq", "hosts")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("seq")
