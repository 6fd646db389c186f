"""Transactional outbox: events written with the data change, published by a relay after COMMIT.

Changes to the catalog tables are queued by triggers (migration 0005), whoever writes them.
Writers of other data call :func:`add_to_outbox` inside their transaction, after the rows it
changes were written (their row locks then order the outbox ids of two writers of one row). A
rolled-back transaction leaves no row, so nothing is published; a committed one always is. The
relay that publishes the rows is the invalidator's (``invalidator/outbox.py``).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from core.events import Event, to_fields

metadata = sa.MetaData()
outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("stream", sa.Text, nullable=True),
    sa.Column("fields", JSONB, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
)


def outbox_insert(event: Event, stream: str | None = None) -> sa.Insert:
    """The INSERT of one event (``stream`` None = the configured event stream)."""
    return sa.insert(outbox).values(stream=stream, fields=to_fields(event))


async def add_to_outbox(
    conn: AsyncConnection | AsyncSession, event: Event, *, stream: str | None = None
) -> None:
    """Queue ``event`` in the caller's open transaction; published only if it commits.

    Changes to the catalog tables need no call: their triggers write the outbox row."""
    await conn.execute(outbox_insert(event, stream))
