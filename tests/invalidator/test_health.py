"""The invalidator's sampler: group lag, pending entries and dead letters as gauges, and health."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from core.events import PRODUCT_UPDATED, new_event
from core.keys import Keys
from core.publisher import Publisher
from core.settings import Settings
from invalidator.health import Health, monitor
from tests.helpers import eventually, metric


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """On one Redis and on a Redis Cluster."""
    return topo_settings


async def test_monitor_sets_lag_pending_and_dead_letter_gauges(
    redis: Redis, keys: Keys, publisher: Publisher
) -> None:
    await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    await publisher.publish_many(new_event(PRODUCT_UPDATED, product_id=f"p{i}") for i in range(5))
    await redis.xreadgroup(keys.group, "reader", {keys.stream: ">"}, count=2)  # 2 now pending
    for reason in ("bad", "worse"):
        await redis.xadd(keys.dead_letter_stream, {"reason": reason})
    health = Health()
    stop = asyncio.Event()
    task = asyncio.create_task(monitor(redis, keys, health, lambda: True, 0.05, stop))
    try:

        async def sampled() -> bool:
            return (
                metric("catalog_invalidator_group_lag") == 3
                and metric("catalog_invalidator_group_pending") == 2
                and metric("catalog_invalidator_dead_letters") == 2
            )

        await eventually(sampled, what="the gauges sampled")
    finally:
        stop.set()
        await task
