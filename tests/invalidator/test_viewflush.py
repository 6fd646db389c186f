"""The view-counter flusher on real Redis and PostgreSQL: counts move exactly once, whatever
fails between the swap, the upsert and the release, and however many flushers race.

Failures are real: a trigger makes PostgreSQL refuse the upsert, CLIENT PAUSE makes Redis refuse
the release after the commit, a table lock holds flushers inside their transactions until the
test lets them go. Nothing is timed; waits poll a condition with a bound."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable

import psycopg
import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db import libpq_url
from core.keys import Keys
from core.settings import Settings
from devtools.localservers import RedisProcess
from invalidator.viewflush import ViewFlusher
from service.views import ViewCounter
from tests.helpers import Delta, eventually, metric


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """This module's tests run on one Redis and on a Redis Cluster."""
    return topo_settings


def flusher(redis: Redis, db: AsyncEngine, keys: Keys, chunk: int = 5000) -> ViewFlusher:
    return ViewFlusher(redis, db, keys, interval_s=3600, chunk=chunk)


async def totals(db: AsyncEngine) -> dict[str, int]:
    async with db.connect() as conn:
        rows = await conn.execute(sa.text("SELECT product_id, views FROM product_stats"))
        return {r.product_id: int(r.views) for r in rows}


async def redis_state(redis: Redis, keys: Keys) -> tuple[int, int]:
    """(distinct ids pending in the live hash, flush ids not yet released)."""
    return await redis.hlen(keys.views_pending), await redis.scard(keys.views_flushes)


async def leftover_keys(redis: Redis, keys: Keys) -> list[bytes]:
    return [k async for k in redis.scan_iter(match=keys.views_flush("*"))]


async def record(counter: ViewCounter, ids: Iterable[str], expected: Counter[str]) -> None:
    batch = list(ids)
    assert await counter.record(batch) == len(batch)
    expected.update(batch)


def psql(url: str, *statements: str) -> None:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


REFUSE = """
CREATE FUNCTION refuse_views() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'product_stats refuses %', NEW.product_id; END $$;
CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON product_stats
FOR EACH ROW WHEN (NEW.product_id = '{product_id}') EXECUTE FUNCTION refuse_views();
"""
ALLOW = "DROP TRIGGER refuse ON product_stats; DROP FUNCTION refuse_views()"


def blocked_flushers(url: str, n: int) -> Callable[[], Awaitable[bool]]:
    """A check: ``n`` backends of this database wait on a lock inside a flush statement."""

    async def check() -> bool:
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO view_flushes%'"
            ).fetchone()
        return row is not None and row[0] == n

    return check


async def test_flush_moves_counts_to_postgresql_and_clears_redis(
    redis: Redis, db: AsyncEngine, keys: Keys
) -> None:
    counter, expected = ViewCounter(redis, keys, 100_000), Counter[str]()
    await record(counter, ["p0000001", "p0000002", "p0000001"], expected)
    await record(counter, ["p0000003"], expected)
    flushed = Delta("catalog_views_flushed_total")

    done = await flusher(redis, db, keys).flush_once()
    assert (done.flushes, done.views, done.dropped) == (1, 4, 0)
    assert await totals(db) == expected
    assert await redis_state(redis, keys) == (0, 0)
    assert await leftover_keys(redis, keys) == []
    assert flushed() == 4

    assert (await flusher(redis, db, keys).flush_once()).flushes == 0  # nothing pending
    await record(counter, ["p0000001"] * 5, expected)
    await flusher(redis, db, keys).flush_once()
    assert await totals(db) == expected == {"p0000001": 7, "p0000002": 1, "p0000003": 1}


async def test_unknown_ids_are_dropped_at_flush_and_counted(
    redis: Redis, db: AsyncEngine, keys: Keys
) -> None:
    counter = ViewCounter(redis, keys, 100_000)
    await counter.record(["p0000001", "no-such-product", "no-such-product", "gone"])
    dropped = Delta("catalog_views_dropped_total")
    done = await flusher(redis, db, keys).flush_once()
    assert (done.views, done.dropped) == (1, 3)
    assert dropped() == 3
    assert await totals(db) == {"p0000001": 1}
    assert await redis_state(redis, keys) == (0, 0)


async def test_views_recorded_during_a_flush_go_to_the_next_one(
    redis: Redis, db: AsyncEngine, keys: Keys
) -> None:
    counter, expected = ViewCounter(redis, keys, 100_000), Counter[str]()
    await record(counter, ["p0000001", "p0000002"], expected)
    one = flusher(redis, db, keys)
    flush_id = await one.claim()
    assert flush_id is not None
    await record(counter, ["p0000001", "p0000003"], expected)  # after the swap, before the write
    await one.finish(flush_id)
    assert await totals(db) == {"p0000001": 1, "p0000002": 1}
    await one.flush_once()
    assert await totals(db) == expected


async def test_a_flush_refused_midway_is_retried_without_double_counting(
    redis: Redis, db: AsyncEngine, keys: Keys, fresh_database_url: str
) -> None:
    """Chunks of 2 ids: the first chunk commits, PostgreSQL refuses the second. The retry, by
    another flusher, skips the committed chunk and writes the rest; newer views follow."""
    counter, expected = ViewCounter(redis, keys, 100_000), Counter[str]()
    ids = [f"p000000{n}" for n in range(1, 6)]
    await record(counter, ids + ids[:2], expected)
    psql(fresh_database_url, REFUSE.format(product_id="p0000004"))
    failures = Delta("catalog_view_flush_failures_total")

    first = flusher(redis, db, keys, chunk=2)
    stop = asyncio.Event()
    stop.set()
    await first.run(stop)  # one cycle: it fails and says so
    assert failures() == 1
    assert metric("catalog_view_flushes_pending") == 1
    assert await totals(db) == {"p0000001": 2, "p0000002": 2}  # chunk 0 committed
    assert await redis_state(redis, keys) == (0, 1)
    with pytest.raises(DBAPIError, match="refuses p0000004"):
        await first.flush_once()  # a retry while PostgreSQL still refuses changes nothing
    assert await totals(db) == {"p0000001": 2, "p0000002": 2}

    await record(counter, ["p0000004", "p0000005"], expected)  # new live hash meanwhile
    psql(fresh_database_url, ALLOW)
    done = await flusher(redis, db, keys, chunk=4000).flush_once()  # its own chunk size unused
    assert done.flushes == 2
    assert await totals(db) == expected
    assert await redis_state(redis, keys) == (0, 0)
    assert await leftover_keys(redis, keys) == []


async def test_a_crash_after_commit_before_release_does_not_double_count(
    db: AsyncEngine, private_redis: RedisProcess, fresh_database_url: str
) -> None:
    """The flusher's transaction is held on a table lock; Redis is paused for writes; the lock
    is released. The flusher commits, then its DEL fails: a crash between COMMIT and release.
    The next flusher finds the flush recorded in PostgreSQL and only releases it."""
    keys = Keys("crash")  # a Redis of its own: any namespace
    fast = Redis.from_url(private_redis.url, socket_timeout=0.5)
    admin = Redis.from_url(private_redis.url)
    try:
        counter, expected = ViewCounter(admin, keys, 100_000), Counter[str]()
        await record(counter, ["p0000001", "p0000002", "p0000002"], expected)
        with psycopg.connect(libpq_url(fresh_database_url)) as locker:
            locker.execute("LOCK TABLE product_stats IN EXCLUSIVE MODE")
            flush = asyncio.create_task(flusher(fast, db, keys).flush_once())
            await eventually(blocked_flushers(fresh_database_url, 1), what="flusher blocked")
            await admin.client_pause(30_000, all=False)
            locker.rollback()  # the flusher commits now, then meets the paused Redis
            with pytest.raises(RedisError):
                await flush
        await admin.client_unpause()
        assert await totals(db) == expected  # committed
        assert len(await leftover_keys(admin, keys)) == 1  # but not released

        await record(counter, ["p0000002"], expected)
        done = await flusher(admin, db, keys).flush_once()
        assert (done.flushes, done.views) == (2, 1)  # the leftover added nothing
        assert await totals(db) == expected
        assert await redis_state(admin, keys) == (0, 0)
    finally:
        await fast.aclose()
        await admin.aclose()


async def test_flushers_racing_on_one_flush_count_it_once(
    redis: Redis, db: AsyncEngine, keys: Keys, fresh_database_url: str
) -> None:
    """A claims a flush; A, B and C all try to write it at once (B and C find it in the
    registry). The table lock keeps all three inside their statements until they overlap."""
    counter, expected = ViewCounter(redis, keys, 100_000), Counter[str]()
    await record(counter, [f"p{n:07d}" for n in range(1, 201)] * 3, expected)
    a, b, c = (flusher(redis, db, keys) for _ in range(3))
    flush_id = await a.claim()
    assert flush_id is not None
    with psycopg.connect(libpq_url(fresh_database_url)) as locker:
        locker.execute("LOCK TABLE product_stats IN EXCLUSIVE MODE")
        racing = asyncio.gather(a.finish(flush_id), b.flush_once(), c.flush_once())
        await eventually(blocked_flushers(fresh_database_url, 3), what="3 flushers blocked")
        locker.rollback()
        results = await racing
    assert results[0].views + results[1].views + results[2].views == 600
    assert await totals(db) == expected
    assert await redis_state(redis, keys) == (0, 0)


async def test_stopping_the_loop_flushes_once_more(
    redis: Redis, db: AsyncEngine, keys: Keys
) -> None:
    counter, expected = ViewCounter(redis, keys, 100_000), Counter[str]()
    stop = asyncio.Event()
    loop = asyncio.create_task(flusher(redis, db, keys).run(stop))  # first cycle: nothing yet
    await record(counter, ["p0000009", "p0000009"], expected)
    stop.set()
    await asyncio.wait_for(loop, 30)
    assert await totals(db) == expected


def test_flush_keys_share_one_hash_slot(keys: Keys) -> None:
    """RENAME between slots fails on Redis Cluster: the live and per-flush hashes share a tag."""
    tag = "{views}"
    assert tag in keys.views_pending and tag in keys.views_flush("x") and tag in keys.views_flushes
