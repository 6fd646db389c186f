"""The outbox is a queue: vacuum it by row count, not by a fraction of its size.

Every captured commit inserts an outbox row and the relay updates it (``sent_at``) a moment
later, so the partial index of unsent rows collects one dead entry per event. The relay's pass
scans that index; with PostgreSQL's default trigger (20% of the table dead) a day's retention of
sent rows lets millions of dead entries build up between vacuums, and a pass that skips them
costs milliseconds instead of microseconds. Vacuuming after every 10,000 dead rows (and without
the cost delay, the table being small and hot) keeps the index a few pages wide.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0
)
"""
DOWNGRADE = """
ALTER TABLE outbox RESET (
    autovacuum_vacuum_scale_factor,
    autovacuum_vacuum_threshold,
    autovacuum_vacuum_insert_scale_factor,
    autovacuum_vacuum_insert_threshold,
    autovacuum_vacuum_cost_delay
)
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
