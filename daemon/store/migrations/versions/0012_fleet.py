"""The fleet: fencing tokens on the hosts' leases, the instances' heartbeats, the leases of the
fleet-wide jobs

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ALTER TABLE ADD COLUMN (no batch copy of the table: that would drop 0007's triggers)
    op.add_column("hosts", sa.Column("lease_token", sa.BigInteger(), nullable=False, server_default=sa.text("0")))
    op.create_table(
        "instances",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("stopped_at", sa.Float()),
        sa.Column("in_flight", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    op.create_table(
        "fleet_leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255)),
        sa.Column("token", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("expires_at", sa.Float()),
        sa.Column("acquired_at", sa.Float()),
    )


def downgrade() -> None:
    op.drop_table("fleet_leases")
    op.drop_table("instances")
    op.drop_column("hosts", "lease_token")
