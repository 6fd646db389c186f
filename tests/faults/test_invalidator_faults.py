"""Two invalidator processes over 10,000 events of real product updates, while a service keeps
refilling the cache: one consumer is SIGSTOPped holding entries (the other reclaims them) and
resumed, then the other is SIGKILLed holding entries (the first reclaims them).

Acceptance figures (issue #6): 100% of the events acked, the pending list empty, and
``catalog verify`` finds 0 stale entries."""

from __future__ import annotations

import signal

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis

from core.db import create_engine
from core.events import PRODUCT_UPDATED, new_event
from core.keys import Keys
from core.publisher import Publisher
from core.settings import Settings
from ops.verify import render, verify
from service.app import Service
from tests.faults.conftest import (
    PRODUCT_IDS,
    Invalidators,
    ReadLoad,
    start_service,
    wait_until,
)
from tests.invalidator.test_processes import consumer_pending, drained

pytestmark = pytest.mark.fault
TOTAL = 10_000
CHUNK = 500
FAST = {"CATALOG_OUTBOX_RELAY": "false", "CATALOG_INVALIDATOR_BATCH_SIZE": "50"}


async def test_two_invalidators_one_stopped_one_killed_ack_everything_and_leave_nothing_stale(
    settings: Settings,
    fresh_database_url: str,
    services: list[Service],
    invalidators: Invalidators,
    redis_client: Redis,
) -> None:
    s = settings.replace(database_url=fresh_database_url)
    keys = Keys(s.key_namespace)
    svc = await start_service(s)
    services.append(svc)
    await redis_client.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    invalidators.settings = s
    first = invalidators.start("first", **FAST)
    second = invalidators.start("second", **FAST)
    load = ReadLoad(f"127.0.0.1:{svc.port}", deadline_s=5.0, workers=4, max_seconds=180).start()
    engine = create_engine(s)
    publisher = Publisher(redis_client, keys, maxlen=100_000)

    async def publish(start: int, end: int) -> None:
        """Events ``start..end``, each after a committed change of its product (stock, version)."""
        for first_id in range(start, end, CHUNK):
            ids = [PRODUCT_IDS[i % len(PRODUCT_IDS)] for i in range(first_id, first_id + CHUNK)]
            async with engine.begin() as conn:
                await conn.execute(
                    sa.text(
                        "UPDATE products SET stock = stock + 1, version = version + 1 "
                        "WHERE id = ANY(:ids)"
                    ),
                    {"ids": sorted(set(ids))},
                )
            await publisher.publish_many(new_event(PRODUCT_UPDATED, product_id=i) for i in ids)

    async def freeze_holding(victim: str) -> int:
        """Both consumers are frozen and new events wait in the stream: read a batch in the
        victim's name, which is what a consumer that read a batch and then froze leaves behind
        (their outstanding blocking reads may also have been served while frozen)."""
        await redis_client.xreadgroup(keys.group, victim, {keys.stream: ">"}, count=50)
        return await consumer_pending(redis_client, keys, victim)

    fifth = TOTAL // 5
    try:
        await publish(0, fifth)
        await wait_until(lambda: drained(redis_client, keys, fifth), 60, "the first fifth acked")

        for proc in (first, second):
            proc.send_signal(signal.SIGSTOP)
        await publish(fifth, 2 * fifth)
        held = await freeze_holding("second")
        first.send_signal(signal.SIGCONT)  # `second` stays stopped: `first` must reclaim
        await wait_until(
            lambda: _pending_is(redis_client, keys, "second", 0), 30, "its entries reclaimed"
        )
        second.send_signal(signal.SIGCONT)
        await publish(2 * fifth, 3 * fifth)

        for proc in (first, second):
            proc.send_signal(signal.SIGSTOP)
        await publish(3 * fifth, 4 * fifth)
        killed_holding = await freeze_holding("first")
        first.kill()
        first.wait()
        second.send_signal(signal.SIGCONT)
        await publish(4 * fifth, TOTAL)
        await wait_until(lambda: drained(redis_client, keys, TOTAL), 120, "every event acked")
    finally:
        await load.stop()
        await engine.dispose()

    assert held > 0 and killed_holding > 0
    assert await redis_client.xpending_range(keys.stream, keys.group, "-", "+", 10) == []
    assert await redis_client.xlen(keys.dead_letter_stream) == 0
    assert second.poll() is None, "the resumed consumer is still working"
    report = await verify(redis_client, svc.engine, keys)
    print(
        f"\n{TOTAL} events: stopped consumer held {held}, killed one held {killed_holding}; "
        f"{load.codes()['OK']} reads meanwhile\n{render(report, s.key_namespace)}"
    )
    assert report.products > 0
    assert report.stale == []


async def _pending_is(redis: Redis, keys: Keys, name: str, n: int) -> bool:
    return await consumer_pending(redis, keys, name) == n
