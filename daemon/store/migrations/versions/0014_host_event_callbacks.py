"""callbacks.host_id and callbacks.payload: the outbox also carries host events (a host drains,
its drain was cancelled), each under a delivery id of its own in ``request_id``

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ALTER TABLE ADD COLUMN: nullable columns, no copy of the table
    op.add_column("callbacks", sa.Column("host_id", sa.String(36)))
    op.add_column("callbacks", sa.Column("payload", sa.JSON()))


def downgrade() -> None:
    # host events mean nothing to the older outbox, which would look for their request
    op.execute("DELETE FROM callbacks WHERE payload IS NOT NULL")
    op.drop_column("callbacks", "payload")
    op.drop_column("callbacks", "host_id")
