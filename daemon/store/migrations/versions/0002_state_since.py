"""hosts.state_since: when a host entered its current state

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("state_since", sa.Float))
    op.execute("UPDATE hosts SET state_since = updated_at")


def downgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("state_since")
