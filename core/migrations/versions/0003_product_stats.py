"""View counters written behind Redis: ``product_stats`` and the record of applied flushes.

``product_stats`` holds one row per product that was ever viewed; deleting the product deletes
it. ``view_flushes`` records every flush batch applied, in the same transaction as its upsert,
so a flush retried after a crash (committed in PostgreSQL, still present in Redis) adds nothing
twice. See service/views.py.

Revision ID: 0003
Revises: 0002
Create Date: 2024-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "product_stats",
        sa.Column(
            "product_id",
            sa.Text,
            sa.ForeignKey("products.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("views", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
        sa.CheckConstraint("views >= 0", name="product_stats_views_non_negative"),
    )
    op.create_table(
        "view_flushes",
        sa.Column("flush_id", sa.Text, primary_key=True),
        sa.Column("flushed_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    )


def downgrade() -> None:
    op.drop_table("view_flushes")
    op.drop_table("product_stats")
