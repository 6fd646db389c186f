"""Hostile entries against a consumer on a real Redis: each is dead-lettered alone with its
reason, its valid neighbours are applied, the loops survive; an entry delivered many times is
still attempted; the dead-letter stream stays bounded in length and in entry size."""

from __future__ import annotations

from typing import Any, cast

import pytest
from redis.asyncio import Redis

from core.cache.store import CacheStore
from core.events import MAX_ENTRY_BYTES
from core.keys import Keys
from core.publisher import Publisher
from core.settings import Settings
from invalidator import consumer as consumer_module
from invalidator.deadletter import TRUNCATED, list_dead_letters
from tests.helpers import eventually
from tests.invalidator.conftest import Consumers, counted, exists, fill, fill_page, group_info


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Every test of this module runs on one Redis and on a Redis Cluster."""
    return topo_settings


BASE = {"schema": "1", "type": "product.updated", "event_id": "e", "occurred_at": "1"}


def hostile(**fields: Any) -> dict[Any, Any]:
    return {**BASE, "product_id": "h", **fields}


def rule(**fields: Any) -> dict[Any, Any]:
    """A price_rule.changed as the capture triggers write it, but for ``fields``."""
    return {**BASE, "type": "price_rule.changed", "category_id": "c1", **fields}


# (what, the entry's fields, a part of the dead letter's reason)
HOSTILE: list[tuple[str, dict[Any, Any], str]] = [
    ("occurred_at of 400 nines", hostile(occurred_at="9" * 400), "at most 15 digits"),
    ("occurred_at of 5000 digits", hostile(occurred_at="9" * 5000), "at most 15 digits"),
    ("occurred_at past year 9999", hostile(occurred_at="9" * 15), "over its maximum"),
    ("negative version", hostile(version="-1"), "must be a non-negative integer"),
    ("version past 2**53", hostile(version=str(2**53)), "over its maximum"),
    ("id of 129 characters", hostile(product_id="x" * 129), "not a valid id"),
    ("id of 100 kB", hostile(product_id="x" * 100_000), "(max 8192)"),
    ("event_id of 200 characters", hostile(event_id="e" * 200), "'event_id' must be"),
    ("non-UTF-8 id", {**hostile(), "product_id": b"\xff\xfe"}, "not UTF-8"),
    ("1 MB entry", hostile(blob="x" * 1_000_000), "(max 8192)"),
    ("40 extra fields", hostile(**{f"x{i}": "1" for i in range(40)}), "(max 32)"),
    ("missing event_id", {"schema": "1", "type": "product.updated"}, "missing field 'event_id'"),
    ("unknown type", hostile(type="product.exploded"), "unknown event type"),
    ("half move", hostile(previous_category_id="c1"), "requires field 'category_id'"),
    (
        "price rule naming 101 products",
        rule(product_ids=",".join(f"p{n}" for n in range(101))),
        "names 101 ids (at most 100)",
    ),
    ("price rule with an empty id", rule(product_ids="p1,,p2"), "holds an invalid id: ''"),
    ("price rule with a spaced id", rule(product_ids="p1,p 2"), "holds an invalid id: 'p 2'"),
    ("price rule with a braced id", rule(product_ids="{p1}"), "holds an invalid id: '{p1}'"),
    ("price rule of two scopes", rule(brand_id="b1", product_ids="p1"), "exactly one of"),
]


async def drained(redis: Redis, keys: Keys) -> bool:
    info = await group_info(redis, keys)
    return bool(info["pending"] == 0 and info["lag"] == 0)


async def test_each_hostile_entry_is_dead_lettered_alone_and_valid_neighbours_are_applied(
    store: CacheStore, consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    valid = [f"v{i}" for i in range(len(HOSTILE) + 1)]
    for pid in valid:
        await fill(store, keys.product(pid))
    page = await fill_page(store, "c1", "")
    await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    # One batch: valid, hostile, valid, hostile, ..., valid.
    for pid, (_, fields, _) in zip(valid, HOSTILE, strict=False):
        await publisher.publish_product_updated(pid)
        await redis.xadd(keys.stream, fields)
    # The last valid one comes from a newer publisher: extra fields, one not even UTF-8.
    newer: dict[Any, Any] = {**BASE, "product_id": valid[-1], "trace": b"\xff", "x": "y"}
    await redis.xadd(keys.stream, newer)

    consumer = consumers.start("c")
    await eventually(counted(consumer, total=len(valid) + len(HOSTILE)), what="all acked")
    assert await drained(redis, keys)
    assert await exists(redis, *(keys.product(pid) for pid in valid)) == [False] * len(valid)
    letters = await list_dead_letters(redis, keys)
    assert len(letters) == len(HOSTILE)
    for letter, (what, _, reason) in zip(letters, HOSTILE, strict=True):
        assert reason in letter.reason, what
    assert (consumer.stats.processed, consumer.stats.dead_lettered) == (len(valid), len(HOSTILE))
    assert await exists(redis, page) == [True], "the half move voided no list page"
    # The loops survived: the next valid event is applied too.
    await fill(store, keys.product("after"))
    await publisher.publish_product_updated("after")
    await eventually(lambda: _gone(redis, keys.product("after")), what="event after the batch")
    (_, task, _) = consumers.running[0]
    assert not task.done()


async def test_an_unexpected_error_while_parsing_costs_that_entry_only(
    monkeypatch: pytest.MonkeyPatch,
    store: CacheStore,
    consumers: Consumers,
    publisher: Publisher,
    redis: Redis,
    keys: Keys,
) -> None:
    """A parser bug (any exception, not only ParseError) dead-letters the entry that hit it."""
    from core.events import parse as real

    def buggy(fields: Any) -> Any:
        if fields and fields.get(b"product_id") == b"boom":
            raise RuntimeError("parser bug\non two lines")
        return real(fields)

    monkeypatch.setattr(consumer_module, "parse", buggy)
    for pid in ("before", "after"):
        await fill(store, keys.product(pid))
    await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    for pid in ("before", "boom", "after"):
        await publisher.publish_product_updated(pid)
    consumer = consumers.start("c")
    await eventually(counted(consumer, total=3), what="every entry acked")
    assert await drained(redis, keys)
    (letter,) = await list_dead_letters(redis, keys)
    assert letter.reason == "could not be parsed: RuntimeError: parser bug on two lines"
    assert await exists(redis, keys.product("before"), keys.product("after")) == [False, False]
    assert (consumer.stats.processed, consumer.stats.dead_lettered) == (2, 1)


@pytest.mark.parametrize("holder", ["c", "dead-consumer"])
async def test_an_entry_delivered_many_times_is_attempted_and_applied(
    holder: str,
    store: CacheStore,
    consumers: Consumers,
    publisher: Publisher,
    redis: Redis,
    keys: Keys,
) -> None:
    """Timeouts and restarts raise the delivery count without any failed attempt: the count alone
    must not dead-letter an entry. ``c`` restarts and drains it as its own pending entry;
    ``dead-consumer``'s entry is reclaimed by ``c`` after min-idle."""
    await fill(store, keys.product("1"))
    await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    entry_id = await publisher.publish_product_updated("1")
    await redis.xreadgroup(keys.group, holder, {keys.stream: ">"})
    for _ in range(10):  # each XCLAIM (without JUSTID) counts one more delivery
        await redis.xclaim(keys.stream, keys.group, holder, 0, [entry_id])
    (row,) = await redis.xpending_range(keys.stream, keys.group, "-", "+", 1)
    assert row["times_delivered"] == 11

    consumer = consumers.start("c", invalidator_max_deliveries=3)
    await eventually(counted(consumer, total=1), what="entry acked")
    assert await drained(redis, keys)
    assert await list_dead_letters(redis, keys) == []
    assert await exists(redis, keys.product("1")) == [False]
    assert (consumer.stats.processed, consumer.stats.dead_lettered) == (1, 0)


async def test_dead_letter_stream_is_trimmed_and_each_letter_bounded(
    consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    flood, maxlen = 2000, 100
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(flood):
            pipe.xadd(keys.stream, hostile(type="product.exploded", event_id=f"x{i}"))
        pipe.xadd(
            keys.stream, hostile(blob="x" * 1_000_000, **{f"f{i}": "y" * 1000 for i in range(10)})
        )
        await pipe.execute()
    consumer = consumers.start(
        "c", invalidator_dead_letter_maxlen=maxlen, invalidator_batch_size=500
    )
    await eventually(counted(consumer, total=flood + 1), what="flood acked")
    assert await drained(redis, keys)

    assert consumer.stats.dead_lettered == flood + 1
    node = cast(dict[str, str], await redis.config_get("stream-node-max-entries"))
    # MAXLEN ~ trims whole stream nodes: at most one node's worth over the setting.
    node_entries = int(node["stream-node-max-entries"])
    assert await redis.xlen(keys.dead_letter_stream) <= maxlen + node_entries
    newest = cast(
        list[tuple[bytes, dict[bytes, bytes]]],
        await redis.xrevrange(keys.dead_letter_stream, count=1),
    )
    letter = {k.decode(): v.decode() for k, v in newest[0][1].items()}
    assert "(max 8192)" in letter["dlq_reason"]
    assert letter[TRUNCATED] == "1 fields cut, 3 dropped"  # blob cut, what did not fit dropped
    assert sum(len(k) + len(v) for k, v in newest[0][1].items()) <= MAX_ENTRY_BYTES + 1024


async def _gone(redis: Redis, *names: str) -> bool:
    return not any(await exists(redis, *names))
