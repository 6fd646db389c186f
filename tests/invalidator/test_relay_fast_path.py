"""The outbox relay's fast path: it applies a batch's invalidation before the XADDs, marks those
entries ``applied``, and the consumer acks them without applying them again. Whatever the relay
cannot apply (an entry that does not parse, another stream, a failing invalidation) is left to
the consumer, and a forged ``applied`` field is never passed on."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy.ext.asyncio import AsyncEngine

from core.cache.store import CacheStore
from core.events import PRODUCT_UPDATED, Invalidation, new_event, to_fields
from core.keys import Keys
from core.publisher import Publisher
from core.settings import Settings
from invalidator.consumer import Consumer, apply_invalidation
from invalidator.outbox import Apply, OutboxRelay
from tests.helpers import eventually
from tests.invalidator.conftest import Consumers, entries, fill, group_info
from tests.invalidator.test_outbox import bump, insert_row, stream_fields


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Every test of this module runs on one Redis and on a Redis Cluster."""
    return topo_settings


PRODUCT = "p0000001"


class CountingConsumer(Consumer):
    """Counts the invalidations it applies itself."""

    applied_here = 0

    async def invalidate(self, invalidation: Invalidation) -> int:
        type(self).applied_here += 1
        return await super().invalidate(invalidation)


@pytest.fixture(autouse=True)
def _reset_counter() -> None:
    CountingConsumer.applied_here = 0


@pytest.fixture
async def made() -> AsyncIterator[list[OutboxRelay]]:
    relays: list[OutboxRelay] = []
    yield relays
    for r in relays:
        await r.close()


def fast_relay(
    db: AsyncEngine, publisher: Publisher, apply: Apply, made: list[OutboxRelay]
) -> OutboxRelay:
    r = OutboxRelay(db, publisher, batch_size=500, poll_s=1.0, retention_s=3600, apply=apply)
    made.append(r)
    return r


async def drained(redis: Redis, keys: Keys) -> bool:
    info = await group_info(redis, keys)
    return bool(info["pending"] == 0 and info["lag"] == 0)


async def test_a_committed_change_is_gone_after_the_relay_alone_and_the_consumer_only_acks(
    db: AsyncEngine,
    store: CacheStore,
    publisher: Publisher,
    consumers: Consumers,
    redis: Redis,
    keys: Keys,
    made: list[OutboxRelay],
) -> None:
    key = keys.product(PRODUCT)
    await fill(store, key)
    await bump(db, PRODUCT)

    relay = fast_relay(db, publisher, lambda inv: apply_invalidation(store, inv), made)
    assert await relay.relay_once() == 1
    assert not await redis.exists(key), "deleted by the relay, before any consumer ran"
    [fields] = await stream_fields(redis, keys)
    assert fields["applied"] == "1"
    assert relay.applied == 1

    consumers.start("c", cls=CountingConsumer)
    await eventually(lambda: drained(redis, keys), what="the applied entry acked")
    assert CountingConsumer.applied_here == 0, "the consumer applied it a second time"


async def test_what_the_relay_cannot_apply_is_left_to_the_consumer(
    db: AsyncEngine,
    store: CacheStore,
    publisher: Publisher,
    consumers: Consumers,
    redis: Redis,
    keys: Keys,
    made: list[OutboxRelay],
) -> None:
    key = keys.product(PRODUCT)
    await fill(store, key)
    await bump(db, PRODUCT)
    calls: list[Invalidation] = []

    async def failing(invalidation: Invalidation) -> None:
        calls.append(invalidation)
        raise ResponseError("the script refused something in this batch")

    relay = fast_relay(db, publisher, failing, made)
    assert await relay.relay_once() == 1
    assert len(calls) == 1
    assert await redis.exists(key), "nothing applied yet"
    [fields] = await stream_fields(redis, keys)
    assert "applied" not in fields

    consumers.start("c", cls=CountingConsumer)
    await eventually(lambda: drained(redis, keys), what="the entry applied by the consumer")
    assert not await redis.exists(key)
    assert CountingConsumer.applied_here == 1


async def test_a_forged_applied_field_is_dropped_and_other_streams_are_not_applied(
    db: AsyncEngine,
    store: CacheStore,
    publisher: Publisher,
    redis: Redis,
    keys: Keys,
    made: list[OutboxRelay],
) -> None:
    event = to_fields(new_event(PRODUCT_UPDATED, product_id=PRODUCT))
    # Not an event of ours (bad schema), yet claiming to be applied; and a valid event bound for
    # another stream.
    await insert_row(db, {**event, "schema": "someone-else/1", "applied": "1"})
    other = keys.stream + ":audit"
    await insert_row(db, event, stream=other)
    seen: list[Invalidation] = []

    async def recording(invalidation: Invalidation) -> None:
        seen.append(invalidation)

    relay = fast_relay(db, publisher, recording, made)
    assert await relay.relay_once() == 2
    assert seen == [], "neither row is an event of the invalidator's stream"
    [forged] = await stream_fields(redis, keys)
    assert "applied" not in forged
    [(_, audit)] = await entries(redis, other)
    assert b"applied" not in audit
