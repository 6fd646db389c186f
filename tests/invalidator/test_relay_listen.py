"""The relay waits on LISTEN/NOTIFY, not on a poll: a commit (here a plain UPDATE whose capture
trigger writes the outbox row) wakes it, also after its listening connection was killed."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from core.keys import Keys
from core.publisher import Publisher
from tests.helpers import eventually
from tests.invalidator.test_outbox import (  # noqa: F401 (autouse)
    _close_relays,
    bump,
    relay,
    settings,
)


async def test_relay_is_woken_by_notify_and_polls_nothing_meanwhile(
    db: AsyncEngine, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    r = relay(db, publisher, poll_s=3600)  # a poll would come an hour late
    stop = asyncio.Event()
    running = asyncio.create_task(r.run(stop))
    try:
        await eventually(lambda: _true(r.passes >= 1), what="the first drain")
        for n in range(1, 4):
            await bump(db, "p0000001")  # a plain UPDATE: its trigger writes the outbox row
            await eventually(lambda: _count(redis, keys, n), what=f"commit {n} published")
        assert r.wakeups >= 1
        assert r.passes <= 1 + 3 * 2, "one pass per wake-up (two if a commit raced a pass)"
    finally:
        stop.set()
        await running


async def test_relay_listens_again_after_losing_its_connection(
    db: AsyncEngine, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    r = relay(db, publisher, poll_s=3600)
    stop = asyncio.Event()
    running = asyncio.create_task(r.run(stop))
    try:
        await bump(db, "p0000001")
        await eventually(lambda: _count(redis, keys, 1), what="the first commit published")
        async with db.connect() as conn:
            killed = await conn.scalar(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() "
                    "AND application_name = 'catalog-outbox-relay'"
                )
            )
        assert killed == 1
        # Committed while the relay may still be reconnecting: the drain after LISTEN finds it.
        await bump(db, "p0000002")
        await eventually(lambda: _count(redis, keys, 2), what="the commit after the loss")
        await bump(db, "p0000003")  # and the new connection is notified
        await eventually(lambda: _count(redis, keys, 3), what="a commit after the reconnect")
    finally:
        stop.set()
        await running


async def _true(value: bool) -> bool:
    return value


async def _count(redis: Redis, keys: Keys, n: int) -> bool:
    return bool(await redis.exists(keys.stream)) and await redis.xlen(keys.stream) >= n
