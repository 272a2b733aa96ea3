"""hosts.component: the deployed component whose webhook rule made a host

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # hosts made before this revision belong to no component: NULL, as the column's default
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("component", sa.String(255)))


def downgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("component")
