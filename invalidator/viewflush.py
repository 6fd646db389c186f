"""Write-behind flusher of view counters: the Redis hash of pending views -> ``product_stats``.

One flush, whatever the number of flusher copies running:

1. **claim**: ``MULTI; SADD <registry> <id>; RENAME <live hash> <flush key>; EXEC``. The RENAME is
   the atomic swap: every ``HINCRBY`` lands either in the renamed hash or in a fresh live hash,
   so nothing is lost between read and clear (no HGETALL-then-HDEL window). The id enters the
   registry in the same step, so a crash right after it leaves the key findable. Flush ids are
   unique, so two copies never claim the same counts; the loser of a race for the live hash
   gets "no such key" and takes its id back.
2. **apply**: ``HGETALL`` the flush key (nothing writes to it any more), sort by product id and cut
   it into chunks; per chunk ONE statement, in its own transaction, inserts the chunk's record
   ``<flush id>/<n>`` into ``view_flushes`` (``ON CONFLICT DO NOTHING``) and, only if that row
   is new, upserts ``product_stats`` from ``unnest`` arrays (bound parameters) joined with
   ``products``: views of unknown or deleted ids are dropped and counted.
3. **release**: ``MULTI; DEL <flush key>; SREM <registry> <id>; EXEC``.

Every cycle first finishes every id in the registry (flushes of this or another copy that failed
or crashed), then claims the live hash. Exactly-once comes from PostgreSQL: a chunk's record and
its upsert commit together, so a retry after a crash between COMMIT and release finds the
record and adds nothing, and a second copy applying the same chunk concurrently waits on the
first one's uncommitted record and then does nothing. The chunk size is written into the flush
id, so every retry cuts the same chunks. Records older than ``RECORD_RETENTION_S`` are purged:
a flush key is normally released within a cycle of its commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from core.keys import Keys
from core.redisclient import RedisClient, transaction
from invalidator import metrics

log = logging.getLogger(__name__)

CHUNK = 5000  # product ids per upsert statement (and per transaction)
RECORD_RETENTION_S = 7 * 86400
PURGE_EVERY_S = 3600.0

_APPLY = sa.text(
    """
    WITH claimed AS (
        INSERT INTO view_flushes (flush_id) VALUES (:record_id)
        ON CONFLICT (flush_id) DO NOTHING
        RETURNING flush_id
    ), known AS (
        SELECT u.product_id, u.views
        FROM unnest(CAST(:ids AS text[]), CAST(:counts AS bigint[])) AS u (product_id, views)
        JOIN products AS p ON p.id = u.product_id
        WHERE EXISTS (SELECT FROM claimed)
        ORDER BY u.product_id
    ), upserted AS (
        INSERT INTO product_stats (product_id, views, updated_at)
        SELECT product_id, views, now() FROM known
        ON CONFLICT (product_id) DO UPDATE
        SET views = product_stats.views + EXCLUDED.views, updated_at = EXCLUDED.updated_at
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM claimed) AS claimed,
           (SELECT coalesce(sum(views), 0) FROM known) AS applied,
           (SELECT count(*) FROM upserted) AS upserted
    """
)
_PURGE = sa.text(
    "DELETE FROM view_flushes WHERE flushed_at < now() - make_interval(secs => :age_s)"
)


@dataclass
class Flushed:
    """What one copy did: flushes finished, views it added, views of unknown ids it dropped.

    A chunk another copy had already applied counts in neither."""

    flushes: int = 0
    views: int = 0
    dropped: int = 0

    def __iadd__(self, other: Flushed) -> Flushed:
        self.flushes += other.flushes
        self.views += other.views
        self.dropped += other.dropped
        return self


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def chunk_of(flush_id: str) -> int | None:
    """The chunk size a flush id was claimed with; None for a malformed id."""
    _, _, size = flush_id.rpartition("-")
    return int(size) if size.isdigit() and int(size) > 0 else None


class ViewFlusher:
    def __init__(
        self,
        redis: RedisClient,
        engine: AsyncEngine,
        keys: Keys,
        *,
        interval_s: float,
        chunk: int = CHUNK,
    ) -> None:
        self.redis = redis
        self.engine = engine
        self.keys = keys
        self.interval_s = interval_s
        self.chunk = chunk
        self._purged_at = 0.0

    def new_flush_id(self) -> str:
        return f"{time.time_ns() // 1_000_000}-{secrets.token_hex(6)}-{self.chunk}"

    async def claim(self) -> str | None:
        """Swap the live hash out under a new flush id; None when no views are pending."""
        pending = await self.redis.hlen(self.keys.views_pending)
        metrics.VIEWS_PENDING.set(pending)
        if not pending:
            return None
        flush_id = self.new_flush_id()
        async with transaction(self.redis) as pipe:  # one slot: {views}
            pipe.sadd(self.keys.views_flushes, flush_id)
            pipe.rename(self.keys.views_pending, self.keys.views_flush(flush_id))
            _, renamed = await pipe.execute(raise_on_error=False)
        if isinstance(renamed, ResponseError):  # another copy swapped it out since HLEN
            await self.redis.srem(self.keys.views_flushes, flush_id)
            return None
        return flush_id

    async def apply(self, flush_id: str) -> Flushed:
        """Write a claimed flush to PostgreSQL; chunks already applied are skipped."""
        size = chunk_of(flush_id)
        if size is None:
            raise ValueError(f"malformed view flush id {flush_id!r}")
        raw = await self.redis.hgetall(self.keys.views_flush(flush_id))
        items = sorted((_text(k), int(v)) for k, v in raw.items())
        done = Flushed(flushes=1)
        for n, start in enumerate(range(0, len(items), size)):
            part = items[start : start + size]
            params = {
                "record_id": f"{flush_id}/{n}",
                "ids": [product_id for product_id, _ in part],
                "counts": [count for _, count in part],
            }
            async with self.engine.begin() as conn:
                row = (await conn.execute(_APPLY, params)).one()
            if row.claimed:
                applied = int(row.applied)
                done.views += applied
                done.dropped += sum(count for _, count in part) - applied
        metrics.VIEWS_FLUSHED.inc(done.views)
        metrics.VIEWS_DROPPED.inc(done.dropped)
        return done

    async def release(self, flush_id: str) -> None:
        """Forget an applied flush (idempotent)."""
        async with transaction(self.redis) as pipe:
            pipe.delete(self.keys.views_flush(flush_id))
            pipe.srem(self.keys.views_flushes, flush_id)
            await pipe.execute()

    async def finish(self, flush_id: str) -> Flushed:
        done = await self.apply(flush_id)
        await self.release(flush_id)
        return done

    async def flush_once(self) -> Flushed:
        """Finish leftover flushes (any copy's), then flush the live hash."""
        done = Flushed()
        try:
            for flush_id in sorted(map(_text, await self.redis.smembers(self.keys.views_flushes))):
                if chunk_of(flush_id) is None:
                    log.warning("ignoring malformed view flush id %r", flush_id)
                    continue
                done += await self.finish(flush_id)
            claimed = await self.claim()
            if claimed is not None:
                done += await self.finish(claimed)
        finally:
            with contextlib.suppress(RedisError, OSError):
                metrics.VIEW_FLUSHES_PENDING.set(await self.redis.scard(self.keys.views_flushes))
        if done.flushes and time.monotonic() - self._purged_at > PURGE_EVERY_S:
            async with self.engine.begin() as conn:
                await conn.execute(_PURGE, {"age_s": RECORD_RETENTION_S})
            self._purged_at = time.monotonic()
        return done

    async def run(self, stop: asyncio.Event) -> None:
        """Flush every ``interval_s`` until ``stop``, then once more; failures are retried."""
        while True:
            try:
                await self.flush_once()
            except (RedisError, SQLAlchemyError, OSError) as exc:
                metrics.VIEW_FLUSH_FAILURES.inc()
                log.warning("view flush failed, retried next cycle: %s", exc)
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
