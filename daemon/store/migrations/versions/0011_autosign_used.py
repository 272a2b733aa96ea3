"""hosts.autosign_used_at: a host's one-time Puppet autosign token is spent by the transaction
that signs with it (before, the newest audit events were read, and enough refusals since hid
the signing)

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ALTER TABLE ADD COLUMN (no batch copy of the table: that would drop 0007's triggers)
    op.add_column("hosts", sa.Column("autosign_used_at", sa.Float()))
    # a token spent before this revision left an autosign-signed event: keep it spent
    op.execute("UPDATE hosts SET autosign_used_at = (SELECT max(ts) FROM events WHERE events.host_id = hosts.id "
               "AND events.kind = 'autosign-signed') WHERE EXISTS (SELECT 1 FROM events WHERE "
               "events.host_id = hosts.id AND events.kind = 'autosign-signed')")


def downgrade() -> None:
    op.drop_column("hosts", "autosign_used_at")
