"""certificate revocations by issuer and serial: app_certificates.issuer, and site_revocations
for certificates a site CA issued

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # every certificate recorded so far was issued by governord's own CA, whose name is always
    # "CN=governord CA" (governord.pki makes it so)
    op.add_column("app_certificates", sa.Column("issuer", sa.Text(), nullable=False,
                                                server_default=sa.text("'CN=governord CA'")))
    op.create_table(
        "site_revocations",
        sa.Column("issuer", sa.Text(), primary_key=True),
        sa.Column("serial", sa.String(64), primary_key=True),
        sa.Column("app", sa.String(255), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=False),
        sa.Column("revoked_by", sa.String(255), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("site_revocations")
    with op.batch_alter_table("app_certificates") as batch:
        batch.drop_column("issuer")
