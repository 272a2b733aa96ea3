"""hosts, requests, events, address leases

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("fqdn", sa.String(255), nullable=False),
        sa.Column("app", sa.String(255)),
        sa.Column("role", sa.String(255)),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("failed_step", sa.String(32)),
        sa.Column("error", sa.Text),
        sa.Column("provider", sa.String(255)),
        sa.Column("machine_id", sa.String(255)),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("tags_rev", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("addresses", sa.JSON, nullable=False),
        sa.Column("classification", sa.JSON, nullable=False),
        sa.Column("registrations", sa.JSON, nullable=False),
        sa.Column("network", sa.String(255)),
        sa.Column("address", sa.String(64)),
        sa.Column("profile", sa.JSON, nullable=False),
        sa.Column("request_id", sa.String(36)),
        # false(): DEFAULT 0 on SQLite as before, DEFAULT false on PostgreSQL (which refuses 0)
        sa.Column("retire_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("lease_expires", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index(
        "ix_hosts_live_name",
        "hosts",
        ["name"],
        unique=True,
        sqlite_where=sa.text("state != 'gone'"),
        postgresql_where=sa.text("state != 'gone'"),
    )
    op.create_index("ix_hosts_work", "hosts", ["state", "next_attempt_at"])
    op.create_index("ix_hosts_app", "hosts", ["app", "role"])
    op.create_table(
        "requests",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("app", sa.String(255)),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("host_ids", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("app", "idempotency_key", name="uq_requests_idempotency"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("host_id", sa.String(36)),
        sa.Column("request_id", sa.String(36)),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(255)),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_events_host", "events", ["host_id", "id"])
    op.create_table(
        "address_leases",
        sa.Column("network", sa.String(255), primary_key=True),
        sa.Column("address", sa.String(64), primary_key=True),
        sa.Column("host_id", sa.String(36), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("address_leases")
    op.drop_table("events")
    op.drop_table("requests")
    op.drop_table("hosts")
