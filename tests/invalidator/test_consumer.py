"""A consumer on a real Redis: exact invalidation, acks, dead letters, idle blocks, restarts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.cache.store import CacheStore
from core.events import (
    BRAND_UPDATED,
    CATEGORY_UPDATED,
    PRODUCT_CREATED,
    PRODUCT_UPDATED,
    Invalidation,
    new_event,
)
from core.keys import Keys
from core.publisher import Publisher
from core.redisclient import pubsub_client
from core.settings import Settings
from invalidator.consumer import Consumer
from invalidator.deadletter import list_dead_letters, redrive
from invalidator.settings import InvalidatorSettings
from invalidator.worker import redis_clients
from tests.helpers import eventually
from tests.invalidator.conftest import Consumers, counted, exists, fill, fill_page, group_info


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Every test of this module runs on one Redis and on a Redis Cluster."""
    return topo_settings


async def drained(redis: Redis, keys: Keys) -> bool:
    info = await group_info(redis, keys)
    return bool(info["pending"] == 0 and info["lag"] == 0)


@pytest.fixture
async def cached(store: CacheStore, keys: Keys) -> dict[str, str]:
    """Products 1 (c1, b1) and 2 (c2, b2), and list pages per filter, combined ones included."""
    names = {"p1": keys.product("1"), "p2": keys.product("2")}
    await fill(store, names["p1"])
    await fill(store, names["p2"])
    for name, (category, brand) in {
        "c1": ("c1", ""),
        "c2": ("c2", ""),
        "c3": ("c3", ""),
        "b1": ("", "b1"),
        "b2": ("", "b2"),
        "all": ("", ""),
        "c1b1": ("c1", "b1"),
        "c2b1": ("c2", "b1"),
    }.items():
        names[name] = await fill_page(store, category, brand)
    return names


@pytest.mark.parametrize(
    ("event", "gone"),
    [
        ({"type": PRODUCT_UPDATED, "product_id": "1"}, {"p1"}),
        (
            {
                "type": PRODUCT_UPDATED,
                "product_id": "1",
                "category_id": "c3",
                "previous_category_id": "c1",
                "brand_id": "b1",
            },
            {"p1", "c1", "c3", "c1b1"},
        ),
        (
            {
                "type": PRODUCT_UPDATED,
                "product_id": "2",
                "brand_id": "b1",
                "previous_brand_id": "b2",
            },
            {"p2", "b1", "b2", "c1b1", "c2b1"},
        ),
        (
            {"type": PRODUCT_CREATED, "product_id": "9", "category_id": "c2", "brand_id": "b2"},
            {"c2", "b2", "all", "c2b1"},
        ),
        # Renames change no cached value (names are appended when served): announced only.
        ({"type": CATEGORY_UPDATED, "category_id": "c1"}, set()),
        ({"type": BRAND_UPDATED, "brand_id": "b2"}, set()),
    ],
)
async def test_event_deletes_exactly_its_keys(
    event: dict[str, str],
    gone: set[str],
    cached: dict[str, str],
    consumers: Consumers,
    publisher: Publisher,
    redis: Redis,
    keys: Keys,
) -> None:
    consumers.start("c")
    await publisher.publish(new_event(**event))  # type: ignore[arg-type]
    await eventually(lambda: drained(redis, keys), what="event acked")
    present = dict(zip(cached, await exists(redis, *cached.values()), strict=True))
    assert {name for name, there in present.items() if not there} == gone


async def test_renames_are_announced_on_the_names_channel_after_they_are_applied(
    cached: dict[str, str],
    consumers: Consumers,
    publisher: Publisher,
    redis: Redis,
    keys: Keys,
) -> None:
    """Every process drops a renamed name from its table on these messages
    (core/cache/names.py); no cached value changes."""
    pubsub = (await pubsub_client(redis)).pubsub()
    await pubsub.subscribe(keys.names_channel)
    assert (await pubsub.get_message(timeout=10))["type"] == "subscribe"
    consumers.start("c")
    await publisher.publish(new_event(CATEGORY_UPDATED, category_id="c1"))
    await publisher.publish(new_event(BRAND_UPDATED, brand_id="b2"))
    await eventually(lambda: drained(redis, keys), what="renames acked")
    got = [await pubsub.get_message(timeout=10) for _ in range(2)]
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert sorted(bytes(m["data"]) for m in got) == [b"b:b2", b"c:c1"]
    assert await exists(redis, *cached.values()) == [True] * len(cached)


async def test_batch_is_one_invalidation_and_all_acked(
    store: CacheStore,
    consumers: Consumers,
    publisher: Publisher,
    redis: Redis,
    keys: Keys,
) -> None:
    for i in range(300):
        await fill(store, keys.product(str(i)))
    await fill(store, keys.product("keep"))
    await publisher.publish_many(new_event(PRODUCT_UPDATED, product_id=str(i)) for i in range(300))
    consumer = consumers.start("c", invalidator_batch_size=300)
    await eventually(counted(consumer, total=300), what="batch acked")
    assert await drained(redis, keys)
    assert consumer.stats.processed == 300
    assert not any(await exists(redis, *(keys.product(str(i)) for i in range(300))))
    assert await exists(redis, keys.product("keep")) == [True]


async def test_malformed_and_unknown_entries_are_dead_lettered_at_once(
    consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    bad = [
        {"schema": "1", "type": "product.exploded", "event_id": "x1", "occurred_at": "1"},
        {"schema": "2", "type": PRODUCT_UPDATED, "product_id": "1"},
        {"schema": "1", "type": PRODUCT_UPDATED, "event_id": "x3", "occurred_at": "1"},
        {"hello": "world"},
    ]
    for fields in bad:
        await redis.xadd(keys.stream, fields)  # type: ignore[arg-type]
    await publisher.publish_product_updated("1")
    consumer = consumers.start("c", invalidator_max_deliveries=1)
    await eventually(counted(consumer, total=5), what="entries acked")
    assert await drained(redis, keys)
    letters = await list_dead_letters(redis, keys)
    assert [d.original for d in letters] == bad
    assert [d.reason for d in letters] == [
        "unknown event type 'product.exploded'",
        "unsupported schema '2' (expected '1')",
        "product.updated requires field 'product_id'",
        "unsupported schema '' (expected '1')",
    ]
    assert (consumer.stats.dead_lettered, consumer.stats.processed) == (4, 1)


async def test_poison_event_is_dead_lettered_after_n_deliveries_and_group_keeps_flowing(
    store: CacheStore, consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    # A product key of the wrong type makes a versioned INVALIDATE fail for it, and only for it.
    await redis.sadd(keys.product("poison"), "not a product")
    for pid in ("a", "b", "c"):
        await fill(store, keys.product(pid))
    await publisher.publish_products_updated([])
    await publisher.publish_product_updated("a")
    await publisher.publish_product_updated("poison", version=2)
    await publisher.publish_product_updated("b")
    consumer = consumers.start("c", invalidator_max_deliveries=3)
    await eventually(lambda: _gone(redis, keys.product("a"), keys.product("b")), what="a, b")
    assert consumer.stats.dead_lettered == 0
    await publisher.publish_product_updated("c")  # flows while the poison is still pending
    await eventually(lambda: _gone(redis, keys.product("c")), what="c invalidated")
    await eventually(lambda: drained(redis, keys), what="poison dead-lettered")
    (letter,) = await list_dead_letters(redis, keys)
    assert letter.reason.startswith("invalidation failed on delivery 3 (max 3): ResponseError")
    assert letter.original["product_id"] == "poison"
    assert consumer.stats.failed == 3, "dead-lettered after its third failed attempt, not before"
    # Fixed the data: re-driving the dead letter now applies it.
    await redis.delete(keys.product("poison"))
    assert (await redrive(redis, keys, [letter.id], maxlen=1000)).redriven == 1
    await eventually(lambda: drained(redis, keys), what="re-driven event acked")
    assert await list_dead_letters(redis, keys) == []
    assert consumer.stats.dead_lettered == 1


async def _gone(redis: Redis, *names: str) -> bool:
    return not any(await exists(redis, *names))


async def test_idle_block_longer_than_socket_timeout_raises_no_error(
    settings: Settings,
    consumers: Consumers,
    publisher: Publisher,
    redis: Redis,
    keys: Keys,
    store: CacheStore,
) -> None:
    idle: dict[str, Any] = {"invalidator_socket_timeout_s": 0.2, "invalidator_block_ms": 1500}
    # The trap: a blocking read on a client whose socket timeout is shorter than BLOCK.
    naive, _ = redis_clients(settings, InvalidatorSettings.from_env({}, **idle))
    await naive.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    with pytest.raises(RedisTimeoutError):
        await naive.xreadgroup(keys.group, "naive", {keys.stream: ">"}, block=1500)
    await naive.aclose()

    consumer = consumers.start("idle", **idle)
    await eventually(lambda: _true(consumer.stats.idle_reads >= 2), what="two idle blocks")
    assert consumer.stats.errors == 0
    await fill(store, keys.product("late"))
    await publisher.publish_product_updated("late")
    await eventually(lambda: _gone(redis, keys.product("late")), what="event after idle")
    assert consumer.stats.errors == 0


async def _true(value: bool) -> bool:
    return value


class GatedConsumer(Consumer):
    """Its invalidation waits for the test to open the gate: a batch as slow as the test likes."""

    gate: asyncio.Event
    entered: asyncio.Event

    async def invalidate(self, invalidation: Invalidation) -> int:
        self.entered.set()
        await self.gate.wait()
        return await super().invalidate(invalidation)


async def test_slow_batch_in_progress_is_not_reclaimed(
    consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    GatedConsumer.gate, GatedConsumer.entered = asyncio.Event(), asyncio.Event()
    await publisher.publish_many(new_event(PRODUCT_UPDATED, product_id=str(i)) for i in range(10))
    slow = consumers.start("slow", GatedConsumer)
    await asyncio.wait_for(GatedConsumer.entered.wait(), 15)
    held_since = time.monotonic()
    other = consumers.start("other")
    min_idle = other.settings.invalidator_claim_min_idle_ms / 1000
    # Let several reclaim passes of the other consumer run after the batch passed min-idle.
    await eventually(lambda: _true(time.monotonic() > held_since + 3 * min_idle), what="idle")
    passes = other.stats.reclaim_passes
    await eventually(lambda: _true(other.stats.reclaim_passes >= passes + 3), what="passes")
    rows = await redis.xpending_range(keys.stream, keys.group, "-", "+", 100)
    assert [(r["consumer"], r["times_delivered"]) for r in rows] == [(b"slow", 1)] * 10
    assert other.stats.reclaimed == 0
    GatedConsumer.gate.set()
    await eventually(counted(slow, other, total=10), what="slow batch acked")
    assert await drained(redis, keys)
    assert (slow.stats.processed, other.stats.processed) == (10, 0)


async def test_restarted_consumer_first_drains_its_own_pending_entries(
    store: CacheStore, consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    await fill(store, keys.product("1"))
    await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    await publisher.publish_product_updated("1")
    # A previous life of "stable-name" read the entry and died before acking it.
    await redis.xreadgroup(keys.group, "stable-name", {keys.stream: ">"})
    consumer = consumers.start("stable-name", invalidator_claim_min_idle_ms=600_000)
    await eventually(counted(consumer, total=1), what="own pending drained")
    assert await drained(redis, keys)
    assert (consumer.stats.processed, consumer.stats.reclaimed) == (1, 0)
    assert await exists(redis, keys.product("1")) == [False]


async def test_stop_leaves_the_group_only_when_clean(
    consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    clean = consumers.start("clean")
    await publisher.publish_product_updated("1")
    await eventually(lambda: drained(redis, keys), what="acked")
    assert await consumers.stop(clean) is True
    assert b"clean" not in [c["name"] for c in await redis.xinfo_consumers(keys.stream, keys.group)]

    await redis.sadd(keys.product("poison"), "not a product")
    stuck = consumers.start("stuck", invalidator_claim_min_idle_ms=600_000)
    await publisher.publish_product_updated("poison", version=2)
    await eventually(lambda: _true(stuck.stats.failed == 1), what="failure")
    assert await consumers.stop(stuck) is False
    (info,) = await redis.xinfo_consumers(keys.stream, keys.group)
    assert (info["name"], info["pending"]) == (b"stuck", 1)


async def test_group_lost_with_redis_data_is_recreated_and_consumption_resumes(
    cached: dict[str, str], consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    """Redis restarted empty (here: the stream and its group deleted under a running consumer)."""
    consumers.start("c")
    await publisher.publish(new_event(PRODUCT_UPDATED, product_id="1"))
    await eventually(lambda: drained(redis, keys), what="first event acked")
    await redis.delete(keys.stream)
    await publisher.publish(new_event(PRODUCT_UPDATED, product_id="2"))

    async def second_applied() -> bool:
        return await exists(redis, cached["p2"]) == [False]

    await eventually(second_applied, what="the event after the loss to be applied")
    assert await exists(redis, cached["c1"]) == [True], "unrelated keys stay"
