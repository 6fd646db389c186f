"""Outbox rows the relay cannot publish are set aside: ``failed_at`` and the ``error`` saying why.

A row whose fields are not a flat map of bounded strings (say, a JSON object where an id belongs)
or whose XADD Redis refuses would otherwise be retried forever and hold back every row behind
it. The relay marks it instead (invalidator/outbox.py); ``catalog outbox failed`` lists such
rows and ``catalog outbox retry`` queues them again once fixed. The relay's index now leaves them
out; a second partial index serves the listing.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("outbox", sa.Column("error", sa.Text, nullable=True))
    op.drop_index("outbox_unsent", table_name="outbox")
    op.create_index(
        "outbox_unsent",
        "outbox",
        ["id"],
        postgresql_where=sa.text("sent_at IS NULL AND failed_at IS NULL"),
    )
    op.create_index(
        "outbox_failed",
        "outbox",
        ["id"],
        postgresql_where=sa.text("failed_at IS NOT NULL AND sent_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("outbox_failed", table_name="outbox")
    op.drop_index("outbox_unsent", table_name="outbox")
    op.create_index("outbox_unsent", "outbox", ["id"], postgresql_where=sa.text("sent_at IS NULL"))
    op.drop_column("outbox", "error")
    op.drop_column("outbox", "failed_at")
