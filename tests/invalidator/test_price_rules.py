"""Price rules void product entries by id, on a real PostgreSQL and Redis, and never a category or
brand tag set (the Redis Cluster format has none).

A rule written in SQL reaches the cache through its capture trigger, the outbox relay and a
consumer that has no database: the entries carry the products' ids. An outside publisher's
``price_rule.changed`` that names only a category or brand is looked up in PostgreSQL by the
consumer, in bounded batches; a consumer without database access sets it aside with the reason.
Entries are cached as the loader caches them; a list page of the rule's category is cached too
and must stay (a price changes no page), and every product outside the rule's scope is still
cached."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from core.cache.store import CacheStore
from core.db import create_engine
from core.events import PRICE_RULE_CHANGED, PRODUCT_UPDATED, Invalidation, new_event
from core.keys import Keys, Tag
from core.publisher import Publisher
from core.settings import Settings
from invalidator.consumer import Consumer
from invalidator.deadletter import list_dead_letters, redrive
from invalidator.outbox import OutboxRelay
from invalidator.scopes import DatabaseScopes
from invalidator.settings import InvalidatorSettings
from tests.helpers import eventually
from tests.invalidator.conftest import Consumers, counted, fill, fill_page


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Every test of this module runs on one Redis and on a Redis Cluster."""
    return topo_settings


async def catalog(db: AsyncEngine) -> dict[str, tuple[str, str]]:
    """Every product: id -> (category, brand)."""
    async with db.connect() as conn:
        rows = await conn.execute(sa.text("SELECT id, category_id, brand_id FROM products"))
        return {pid: (c, b) for pid, c, b in rows}


async def cache_all(store: CacheStore, keys: Keys, products: dict[str, tuple[str, str]]) -> None:
    """Every product cached as the loader caches it (no set: its key is derived from its id)."""
    for pid in products:
        await fill(store, keys.product(pid))


async def gone(redis: Redis, keys: Keys, products: Sequence[str]) -> set[str]:
    """The products whose cached entry is no longer there."""
    async with redis.pipeline(transaction=False) as pipe:
        for pid in products:
            pipe.exists(keys.product(pid))
        there = await pipe.execute()
    return {pid for pid, n in zip(products, there, strict=True) if not n}


async def sql(db: AsyncEngine, statement: str) -> None:
    async with db.begin() as conn:
        await conn.execute(sa.text(statement))


async def relay_all(db: AsyncEngine, publisher: Publisher) -> int:
    """Publish every queued outbox row (what the relay does on NOTIFY); the number published."""
    relay = OutboxRelay(db, publisher, batch_size=500, poll_s=60, retention_s=3600)
    total = 0
    try:
        while n := await relay.relay_once():
            total += n
    finally:
        await relay.close()
    return total


def recording(consumers: Consumers, name: str, **kwargs: Any) -> Recording:
    """A :class:`Recording` consumer; ``scopes`` goes to it, the rest to its settings."""
    scopes = kwargs.pop("scopes", None)
    made = consumers.start(name, functools.partial(Recording, scopes=scopes), **kwargs)
    assert isinstance(made, Recording)
    return made


class Recording(Consumer):
    """Records the product tags of every INVALIDATE call (the keys each one could delete)."""

    calls: list[frozenset[Tag]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = []

    async def invalidate(self, invalidation: Invalidation) -> int:
        self.calls.append(invalidation.tags)
        return await super().invalidate(invalidation)


RULE = (
    "INSERT INTO price_rules (id, name, scope, target_id, kind, value, priority) "
    "VALUES ('{id}', 'sale', '{scope}', '{target}', 'percent_off', 1000, 10)"
)


async def test_a_rule_written_in_sql_voids_exactly_its_categorys_products_by_id(
    db: AsyncEngine,
    store: CacheStore,
    consumers: Consumers,
    publisher: Publisher,
    redis: Redis,
    keys: Keys,
) -> None:
    products = await catalog(db)
    category = "c00003"
    covered = {pid for pid, (c, _) in products.items() if c == category}
    await cache_all(store, keys, products)
    page = await fill_page(store, category, "")

    await sql(db, RULE.format(id="r1", scope="category", target=category))
    entries = await relay_all(db, publisher)
    assert entries == -(-len(covered) // 100)  # 100 ids per entry
    consumer = recording(consumers, "no-db")  # needs no database: the ids are in the event
    await eventually(counted(consumer, total=entries), what="the rule's entries applied")

    assert await gone(redis, keys, list(products)) == covered, "exactly the category's products"
    assert all(t.product_id for call in consumer.calls for t in call), "product tags only"
    assert await redis.exists(page), "the category's list page untouched"
    assert await list_dead_letters(redis, keys) == []


async def test_a_rule_moved_from_a_category_to_a_brand_voids_both_scopes_products(
    db: AsyncEngine,
    store: CacheStore,
    consumers: Consumers,
    publisher: Publisher,
    redis: Redis,
    keys: Keys,
) -> None:
    products = await catalog(db)
    category, brand = "c00002", "b00004"
    await sql(db, RULE.format(id="r2", scope="category", target=category))
    first = await relay_all(db, publisher)
    consumer = consumers.start("c")
    await eventually(counted(consumer, total=first), what="the insert's entries applied")
    await cache_all(store, keys, products)

    await sql(db, f"UPDATE price_rules SET scope = 'brand', target_id = '{brand}' WHERE id = 'r2'")
    entries = await relay_all(db, publisher)
    await eventually(counted(consumer, total=first + entries), what="the update's entries applied")

    both = {pid for pid, (c, b) in products.items() if c == category or b == brand}
    assert {pid for pid, (c, _) in products.items() if c == category} < both  # both count
    assert {pid for pid, (_, b) in products.items() if b == brand} < both
    assert await gone(redis, keys, list(products)) == both


@pytest.mark.parametrize(("scope", "target"), [("category", "c00001"), ("brand", "b00002")])
async def test_an_outside_publishers_rule_naming_only_a_scope_is_looked_up_in_batches(
    scope: str,
    target: str,
    db: AsyncEngine,
    store: CacheStore,
    consumers: Consumers,
    publisher: Publisher,
    redis: Redis,
    keys: Keys,
) -> None:
    products = await catalog(db)
    index = 0 if scope == "category" else 1
    covered = {pid for pid, cb in products.items() if cb[index] == target}
    await cache_all(store, keys, products)

    if scope == "category":
        await publisher.publish(new_event(PRICE_RULE_CHANGED, category_id=target))
    else:
        await publisher.publish(new_event(PRICE_RULE_CHANGED, brand_id=target))
    consumer = recording(consumers, "c", scopes=DatabaseScopes(db), invalidator_resolve_batch=7)
    await eventually(counted(consumer, total=1), what="the rule applied")

    assert await gone(redis, keys, list(products)) == covered
    assert consumer.stats.processed == 1
    sizes = [len(call) for call in consumer.calls]
    assert sum(sizes) == len(covered) and max(sizes) == 7, "bounded batches, each id once"
    assert {t.product_id for call in consumer.calls for t in call} == covered


async def test_an_empty_scope_voids_nothing_and_is_acked(
    db: AsyncEngine, consumers: Consumers, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    await publisher.publish(new_event(PRICE_RULE_CHANGED, category_id="no-such-category"))
    consumer = recording(consumers, "c", scopes=DatabaseScopes(db))
    await eventually(counted(consumer, total=1), what="the rule applied")
    assert (consumer.stats.processed, consumer.calls) == (1, [])


async def test_without_database_access_a_scope_only_rule_is_set_aside_with_the_reason(
    db: AsyncEngine,
    store: CacheStore,
    consumers: Consumers,
    publisher: Publisher,
    redis: Redis,
    keys: Keys,
    isettings: InvalidatorSettings,
) -> None:
    products = await catalog(db)
    covered = {pid for pid, (c, _) in products.items() if c == "c00004"}
    await cache_all(store, keys, products)
    await publisher.publish(new_event(PRICE_RULE_CHANGED, category_id="c00004"))
    await publisher.publish(new_event(PRODUCT_UPDATED, product_id="p0000001"))  # a neighbour
    consumer = consumers.start("no-db")
    await eventually(counted(consumer, total=2), what="both entries handled")

    assert (consumer.stats.processed, consumer.stats.dead_lettered) == (1, 1)
    [letter] = await list_dead_letters(redis, keys)
    assert "names category 'c00004' without product_ids" in letter.reason
    assert "CATALOG_INVALIDATOR_RESOLVE_SCOPES=false" in letter.reason
    assert letter.fields["category_id"] == "c00004"
    assert await gone(redis, keys, list(products)) == {"p0000001"}, "nothing dropped silently"

    # Re-driven where the database is reachable, it is applied.
    await consumers.stop(consumer)
    await redrive(redis, keys, [letter.id], maxlen=isettings.invalidator_dead_letter_maxlen)
    resolving = consumers.start("with-db", functools.partial(Consumer, scopes=DatabaseScopes(db)))
    await eventually(counted(resolving, total=1), what="the re-driven rule applied")
    assert await gone(redis, keys, list(products)) == covered | {"p0000001"}


async def test_a_failed_lookup_fails_that_entry_alone(
    settings: Settings,
    store: CacheStore,
    consumers: Consumers,
    publisher: Publisher,
    redis: Redis,
    keys: Keys,
) -> None:
    """A database that refuses the lookup: the entry is retried like any failed invalidation
    and dead-lettered on its last delivery with the error; its neighbour is applied."""
    missing = create_engine(
        settings.replace(database_url=settings.database_url.rsplit("/", 1)[0] + "/no_such_db")
    )
    try:
        await fill(store, keys.product("p0000001"))
        await publisher.publish(new_event(PRICE_RULE_CHANGED, brand_id="b00001"))
        await publisher.publish(new_event(PRODUCT_UPDATED, product_id="p0000001"))
        consumer = consumers.start(
            "c",
            functools.partial(Consumer, scopes=DatabaseScopes(missing)),
            invalidator_max_deliveries=2,
        )
        await eventually(counted(consumer, total=2), what="the rule dead-lettered")
        [letter] = await list_dead_letters(redis, keys)
        assert letter.reason.startswith("invalidation failed on delivery 2 (max 2): ")
        assert "no_such_db" in letter.reason
        assert consumer.stats.failed == 2 and consumer.stats.processed == 1
        assert await gone(redis, keys, ["p0000001"]) == {"p0000001"}
    finally:
        await missing.dispose()
