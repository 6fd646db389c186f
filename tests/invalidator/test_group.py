"""The consumer group's mechanics on one Redis and on a Redis Cluster: acks, dead letters in the
same step, re-drive, reclaim, the interrupted blocking read, a lost group, WAIT before the ack.

The consumer here applies an event by writing a marker key per product (each in its own slot)
and recording it, instead of invalidating cache entries: what is tested is the stream side,
which must not depend on the cached format (tests/invalidator/test_consumer.py covers that)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from core.events import PRODUCT_UPDATED, Invalidation, new_event
from core.keys import Keys
from core.publisher import Publisher
from core.redisclient import ReplicaWait
from core.settings import Settings
from invalidator.consumer import Consumer
from invalidator.deadletter import list_dead_letters, redrive
from tests.helpers import Delta, eventually
from tests.invalidator.conftest import Consumers, counted, group_info


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Every test of this module runs on both topologies."""
    return topo_settings


def marker(keys: Keys, product_id: str) -> str:
    """A key of the test's namespace in the product's own slot."""
    return keys.stream + ":marker:{" + product_id + "}"


class Recording(Consumer):
    """Applies an event by writing one marker key per product, and records the product ids.
    ``poisoned`` ids fail (a ResponseError, as a script refusing an entry's data would)."""

    poisoned: set[str] = set()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.applied: list[str] = []

    async def invalidate(self, invalidation: Invalidation) -> int:
        ids = sorted(t.product_id for t in invalidation.tags if t.product_id)
        if self.poisoned.intersection(ids):
            raise ResponseError("this entry's data is refused")
        for product_id in ids:
            await self.redis.set(marker(self.keys, product_id), "applied")
        self.applied += ids
        return len(ids)


async def drained(redis: Redis, keys: Keys) -> bool:
    info = await group_info(redis, keys)
    return bool(info["pending"] == 0 and info["lag"] == 0)


async def _true(value: bool) -> bool:
    return value


async def test_valid_entries_are_applied_and_bad_ones_dead_lettered_and_acked(
    consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    bad = [{"schema": "1", "type": "product.exploded", "event_id": "x1", "occurred_at": "1"}]
    await redis.xadd(keys.stream, bad[0])  # type: ignore[arg-type]
    await publisher.publish_product_updated("1")
    await redis.xadd(keys.stream, {"hello": "world"})
    bad.append({"hello": "world"})
    await publisher.publish_product_updated("2")
    consumer = consumers.start("c", Recording)
    await eventually(counted(consumer, total=4), what="entries acked")
    assert await drained(redis, keys)
    assert isinstance(consumer, Recording) and consumer.applied == ["1", "2"]
    assert await redis.get(marker(keys, "2")) == b"applied"
    letters = await list_dead_letters(redis, keys)
    assert [d.original for d in letters] == bad
    assert [d.reason for d in letters] == [
        "unknown event type 'product.exploded'",
        "unsupported schema '' (expected '1')",
    ]


async def test_a_poison_event_is_dead_lettered_after_n_deliveries_then_redriven(
    consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    Recording.poisoned = {"poison"}
    for product_id in ("a", "poison", "b"):
        await publisher.publish_product_updated(product_id)
    consumer = consumers.start("c", Recording, invalidator_max_deliveries=3)
    assert isinstance(consumer, Recording)
    await eventually(lambda: drained(redis, keys), what="poison dead-lettered")
    (letter,) = await list_dead_letters(redis, keys)
    assert letter.reason.startswith("invalidation failed on delivery 3 (max 3): ResponseError")
    assert (consumer.applied, consumer.stats.failed) == (["a", "b"], 3)

    Recording.poisoned = set()  # the data was fixed
    assert (await redrive(redis, keys, [letter.id], maxlen=1000)).redriven == 1
    await eventually(lambda: _true("poison" in consumer.applied), what="re-driven event")
    await eventually(lambda: drained(redis, keys), what="re-driven event acked")
    assert await list_dead_letters(redis, keys) == []


async def test_a_dead_consumers_entries_are_reclaimed(
    consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    await publisher.publish_many(new_event(PRODUCT_UPDATED, product_id=str(n)) for n in range(5))
    await redis.xreadgroup(keys.group, "dead", {keys.stream: ">"})  # read, never acked
    live = consumers.start("live", Recording)
    await eventually(counted(live, total=5), what="reclaimed and applied")
    assert await drained(redis, keys)
    assert live.stats.reclaimed == 5


async def test_stop_interrupts_the_blocking_read_where_it_waits(
    consumers: Consumers, redis: Redis, keys: Keys
) -> None:
    """BLOCK is a minute: a stop that returns at all (within 30 s) interrupted the read with
    CLIENT UNBLOCK, on the stream's node in cluster mode."""
    consumer = consumers.start("idle", Recording, invalidator_block_ms=60_000)
    await eventually(lambda: _true(consumer.ready and consumer._reader_id is not None), what="read")
    assert await consumers.stop(consumer) is True
    assert b"idle" not in [c["name"] for c in await redis.xinfo_consumers(keys.stream, keys.group)]


async def test_a_lost_group_is_recreated_and_consumption_resumes(
    consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    consumer = consumers.start("c", Recording)
    assert isinstance(consumer, Recording)
    await publisher.publish_product_updated("1")
    await eventually(lambda: _true(consumer.applied == ["1"]), what="first event")
    await redis.delete(keys.stream)
    await publisher.publish_product_updated("2")
    await eventually(lambda: _true(consumer.applied[-1:] == ["2"]), what="event after the loss")


async def test_a_batch_short_of_replicas_is_not_acked_and_is_applied_again(
    consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    """These servers have no replicas: WAIT 1 never succeeds. The batch is applied, not acked,
    reclaimed after min-idle and applied again; nothing is acked or dead-lettered."""
    short = Delta("catalog_replica_wait_short_total", by="invalidator")
    await publisher.publish_product_updated("1")
    consumer = consumers.start(
        "c", Recording, ReplicaWait(keys, replicas=1, timeout_ms=20), invalidator_max_deliveries=1
    )
    assert isinstance(consumer, Recording)
    await eventually(lambda: _true(len(consumer.applied) >= 3), what="applied three times")
    assert short() >= 2  # the third WAIT may still be under way
    assert (consumer.stats.processed, consumer.stats.dead_lettered) == (0, 0)
    assert (await group_info(redis, keys))["pending"] == 1
    assert await consumers.stop(consumer) is False  # it holds the entry: left for reclaim
