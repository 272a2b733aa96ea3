"""the engine's queue: a partial index of hosts with work to do, in the order they are claimed

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

WORKING = "state NOT IN ('ready', 'failed', 'gone')"


def upgrade() -> None:
    op.create_index("ix_hosts_due", "hosts", ["next_attempt_at", "updated_at"],
                    sqlite_where=sa.text(WORKING), postgresql_where=sa.text(WORKING))


def downgrade() -> None:
    op.drop_index("ix_hosts_due", "hosts")
