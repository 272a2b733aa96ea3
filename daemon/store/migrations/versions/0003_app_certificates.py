"""app_certificates: client certificates issued to applications, and their revocation

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "app_certificates",
        sa.Column("serial", sa.String(64), primary_key=True),
        sa.Column("app", sa.String(255), nullable=False),
        sa.Column("common_name", sa.String(255), nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
        sa.Column("not_after", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
        sa.Column("revoked_by", sa.String(255)),
    )
    op.create_index("ix_app_certificates_app", "app_certificates", ["app"])


def downgrade() -> None:
    op.drop_table("app_certificates")
