"""Redis under memory pressure: what eviction does to correctness (docs/operations.md).

Every cache key has a TTL and tag sets outlive their members, so with ``volatile-ttl`` values go
before the tag sets that index them. A product's own key is also derivable from its tag, so a
product edit is applied even if that tag set is gone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import psycopg
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from core.cache import entry
from core.cache.reader import Reader
from core.db import create_engine, libpq_url
from core.keys import Keys, Tag
from core.repository import Repository
from core.settings import Settings
from devtools.localservers import RedisProcess
from service.app import create_redis, create_store
from tests.conftest import SEED_PRODUCTS

IDS = [f"p{n:07d}" for n in range(1, SEED_PRODUCTS + 1)]


@pytest.fixture
def writable(settings: Settings, fresh_database_url: str, private_redis: RedisProcess) -> Settings:
    return settings.replace(
        database_url=fresh_database_url,
        redis_url=private_redis.url,
        redis_connect_timeout_s=5.0,
        redis_socket_timeout_s=5.0,
        redis_pool_timeout_s=30.0,
    )


@pytest.fixture
async def parts(writable: Settings) -> AsyncIterator[tuple[Redis, AsyncEngine, Reader]]:
    redis = cast(Redis, create_redis(writable))  # standalone here
    engine = create_engine(writable)
    reader = Reader(
        create_store(redis, writable), Repository(engine), Keys(writable.key_namespace), writable
    )
    yield redis, engine, reader
    await redis.aclose()
    await engine.dispose()


def db_names(url: str) -> dict[str, tuple[str, str]]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute(
            "SELECT p.id, p.name, c.name FROM products p JOIN categories c ON c.id = p.category_id"
        )
        return {r[0]: (r[1], r[2]) for r in rows}


async def read_all(reader: Reader) -> dict[str, tuple[str, str]]:
    out = {}
    for start in range(0, len(IDS), 100):
        for data in await reader.batch_get(IDS[start : start + 100]):
            product = pb.Product.FromString(data or b"")
            out[product.id] = (product.name, product.category.name)
    return out


async def test_product_edit_applies_even_when_its_tag_set_was_evicted(
    writable: Settings, parts: tuple[Redis, AsyncEngine, Reader]
) -> None:
    redis, _, reader = parts
    store, keys = reader.store, Keys(writable.key_namespace)
    assert store is not None
    await reader.get_product("p0000003")
    await redis.delete(keys.tag(Tag.product("p0000003")))  # as if evicted
    with psycopg.connect(libpq_url(writable.database_url)) as conn:
        conn.execute(
            "UPDATE products SET name = 'edited', version = version + 1 WHERE id = 'p0000003'"
        )
    await store.invalidate([Tag.product("p0000003")])
    assert pb.Product.FromString(await reader.get_product("p0000003") or b"").name == "edited"


async def test_full_redis_with_volatile_ttl_evicts_values_and_serves_nothing_stale(
    writable: Settings, parts: tuple[Redis, AsyncEngine, Reader]
) -> None:
    redis, _, reader = parts
    store, keys = reader.store, Keys(writable.key_namespace)
    assert store is not None
    used = int((await redis.info("memory"))["used_memory"])
    await redis.config_set("maxmemory", used + 1_500_000)
    await redis.config_set("maxmemory-policy", "volatile-ttl")
    await redis.config_set("maxmemory-samples", 10)

    await read_all(reader)
    # Ballast like other cached values (same TTL range), until Redis has evicted plenty.
    n = 0
    while int((await redis.info("stats"))["evicted_keys"]) < 500:
        await redis.set(f"{writable.key_namespace}:ballast:{n}", b"x" * 4096, ex=300)
        n += 1
    await read_all(reader)  # refill what was evicted, under pressure

    unindexed = 0
    for value in await redis.mget([keys.product(i) for i in IDS]):
        if isinstance(value, bytes) and value:
            product = pb.Product.FromString(entry.payload(value))
            tag = keys.tag(Tag.category(product.category.id))
            unindexed += not await redis.sismember(tag, keys.product(product.id))
    assert unindexed == 0, "values outlived the tag sets that index them"

    url = writable.database_url
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute("UPDATE products SET name = name || ' (edited)', version = version + 1")
        conn.execute("UPDATE categories SET name = name || ' (renamed)'")
        categories = [r[0] for r in conn.execute("SELECT id FROM categories")]
    await store.invalidate([Tag.product(i) for i in IDS])
    await store.invalidate([Tag.category(c) for c in categories])

    assert await read_all(reader) == db_names(url), "a read returned stale data after eviction"
    assert int((await redis.info("stats"))["evicted_keys"]) >= 500
