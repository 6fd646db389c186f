"""The outbox relay: publishes the events that writers queued in PostgreSQL, after COMMIT.

Writers queue events with :func:`core.outbox.add_to_outbox`; the relay (:class:`OutboxRelay`),
any number of copies:

* takes ``pg_try_advisory_xact_lock(LOCK_KEY)``; a copy that does not get it stands by. One
  publisher at a time is what keeps per-product order: with SKIP LOCKED alone, relay B could
  publish row 2 while relay A still holds row 1 of the same product.
* selects unsent rows ``ORDER BY id ... FOR UPDATE SKIP LOCKED`` (the row locks are a second guard
  should an older relay without the advisory lock run), XADDs them in id order in one pipeline,
  marks them sent and commits. A crash between XADD and COMMIT republishes those rows: delivery
  is at-least-once, and invalidation is idempotent.
* never skips a row: it selects ``sent_at IS NULL``, not "ids after the last one sent", so a row
  whose transaction commits late (lower id, visible later) is published on the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import sqlalchemy as sa
from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from core import tracing
from core.outbox import outbox
from core.publisher import Publisher
from invalidator import metrics

log = logging.getLogger(__name__)

# pg_advisory lock id of the relay ("catalog outbox" as a bigint); same in every copy.
LOCK_KEY = 0x6F7574626F78

# Longest pause between relay attempts while PostgreSQL or Redis keeps failing.
MAX_BACKOFF_S = 1.0


class OutboxRelay:
    def __init__(
        self,
        engine: AsyncEngine,
        publisher: Publisher,
        *,
        batch_size: int,
        poll_s: float,
        retention_s: float,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.retention_s = retention_s
        self.published = 0

    async def relay_once(self) -> int | None:
        """Publish up to ``batch_size`` rows; None when another relay holds the lock."""
        async with self.engine.begin() as conn:
            if not await conn.scalar(sa.select(sa.func.pg_try_advisory_xact_lock(LOCK_KEY))):
                return None
            rows = (
                await conn.execute(
                    sa.select(outbox.c.id, outbox.c.stream, outbox.c.fields)
                    .where(outbox.c.sent_at.is_(None))
                    .order_by(outbox.c.id)
                    .limit(self.batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            # A row's trace continues in a PRODUCER span; its entry carries that span onward.
            parents = [r.fields.get("traceparent", "") for r in rows]
            with tracing.continued(
                "catalog.outbox.relay", parents, kind=SpanKind.PRODUCER
            ) as carried:
                entries = [
                    r.fields if tp == parent else {**r.fields, "traceparent": tp}
                    for r, parent, tp in zip(rows, parents, carried, strict=True)
                ]
                # Consecutive rows of one stream go in one pipeline; order is kept across streams.
                start = 0
                for i in range(1, len(rows) + 1):
                    if i == len(rows) or rows[i].stream != rows[start].stream:
                        await self.publisher.publish_fields(
                            entries[start:i], rows[start].stream or ""
                        )
                        start = i
                await conn.execute(
                    sa.update(outbox)
                    .where(outbox.c.id.in_([r.id for r in rows]))
                    .values(sent_at=sa.func.now())
                )
        self.published += len(rows)
        metrics.OUTBOX_PUBLISHED.inc(len(rows))
        return len(rows)

    async def purge_sent(self) -> int:
        """Delete rows sent longer than ``retention_s`` ago (kept for audits and replays)."""
        age = self.retention_s
        async with self.engine.begin() as conn:
            result = await conn.execute(
                sa.delete(outbox).where(
                    outbox.c.sent_at < sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, age)
                )
            )
        return int(result.rowcount)

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; a failing database or Redis is retried, never fatal.

        While they fail, retries back off (doubling, up to MAX_BACKOFF_S) and only the first
        failure and the recovery are logged as warnings, so an outage is not a log flood."""
        passes = 0
        pause = self.poll_s
        failing = False
        while not stop.is_set():
            try:
                n = await self.relay_once()
                passes += 1
                if passes % 10_000 == 1:
                    await self.purge_sent()
            except (RedisError, SQLAlchemyError, OSError) as exc:  # down: keep rows, retry later
                metrics.OUTBOX_ERRORS.inc()
                (log.debug if failing else log.warning)("outbox relay pass failed: %s", exc)
                failing, n = True, None
                pause = min(max(pause * 2, self.poll_s), MAX_BACKOFF_S)
            else:
                if failing:
                    log.warning("outbox relay recovered")
                failing, pause = False, self.poll_s
            if n != self.batch_size:  # a full batch means more are waiting: no pause
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
