"""Redis under memory pressure: what eviction does to correctness (docs/architecture.md).

Every cache key has a TTL, and page sets and registries outlive the pages they index, so with
``volatile-ttl`` values go before the sets. A product's key is derived from the event's id, so a
product edit is applied whatever else was evicted; names are not in Redis at all."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import cast

import psycopg
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from core.cache.reader import Reader
from core.db import create_engine, libpq_url
from core.keys import Keys, Tag
from core.repository import Repository
from core.settings import Settings
from devtools.localservers import RedisProcess
from service.app import create_redis, create_store
from tests.conftest import SEED_PRODUCTS
from tests.helpers import Delta, eventually

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


def db_filters(url: str) -> list[tuple[str, str]]:
    """Every category alone and every (category, brand) pair with products."""
    with psycopg.connect(libpq_url(url)) as conn:
        pairs = conn.execute("SELECT DISTINCT category_id, brand_id FROM products ORDER BY 1, 2")
        combined = [(r[0], r[1]) for r in pairs]
    return sorted({(c, "") for c, _ in combined}) + combined


def db_page(url: str, category: str, brand: str) -> list[str]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute(
            "SELECT id FROM products WHERE category_id = %s AND (%s = '' OR brand_id = %s) "
            "ORDER BY id LIMIT 20",
            (category, brand, brand),
        )
        return [r[0] for r in rows]


async def read_all(reader: Reader) -> dict[str, tuple[str, str]]:
    out = {}
    for start in range(0, len(IDS), 100):
        for data in await reader.batch_get(IDS[start : start + 100]):
            product = pb.Product.FromString(data or b"")
            out[product.id] = (product.name, product.category.name)
    return out


async def read_pages(reader: Reader, filters: list[tuple[str, str]]) -> dict[str, list[str]]:
    out = {}
    for c, b in filters:
        page = await reader.list_page(c, b, "", 20)
        out[f"{c}/{b}"] = [pb.Product.FromString(p).id for p in page.products]
    return out


async def test_a_product_edit_applies_whatever_else_was_evicted(
    writable: Settings, parts: tuple[Redis, AsyncEngine, Reader]
) -> None:
    redis, _, reader = parts
    store, keys = reader.store, Keys(writable.key_namespace)
    assert store is not None
    await reader.get_product("p0000003")
    await reader.list_page("", "", "", 5)
    for key in [k async for k in redis.scan_iter(match=f"{writable.key_namespace}:*")]:
        if key != keys.product("p0000003").encode():
            await redis.delete(key)  # as if evicted
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
    follow = asyncio.create_task(reader.names.follow(redis, keys.names_channel))
    try:

        async def subscribed() -> bool:
            return (
                dict(await redis.pubsub_numsub(keys.names_channel))[keys.names_channel.encode()]
                == 1
            )

        await eventually(subscribed, what="the names subscription")
        used = int((await redis.info("memory"))["used_memory"])
        await redis.config_set("maxmemory", used + 1_500_000)
        await redis.config_set("maxmemory-policy", "volatile-ttl")
        await redis.config_set("maxmemory-samples", 10)

        url = writable.database_url
        filters = db_filters(url)
        await read_all(reader)
        await read_pages(reader, filters)
        # Ballast like other cached values (same TTL range), until Redis has evicted plenty.
        n = 0
        while int((await redis.info("stats"))["evicted_keys"]) < 500:
            await redis.set(f"{writable.key_namespace}:ballast:{n}", b"x" * 4096, ex=300)
            n += 1
        await read_all(reader)  # refill what was evicted, under pressure
        await read_pages(reader, filters)

        unindexed = 0
        for c, b in filters:
            page = keys.page(c, b, "", 20)
            if await redis.exists(page):
                unindexed += not await redis.sismember(keys.pages(c, b), page)
                if b:
                    unindexed += not await redis.sismember(keys.category_registry(c), b)
                    unindexed += not await redis.sismember(keys.brand_registry(b), c)
        assert unindexed == 0, "pages outlived the sets that index them"

        with psycopg.connect(libpq_url(url)) as conn:
            conn.execute("UPDATE products SET name = name || ' (edited)', version = version + 1")
            moved = conn.execute(
                "UPDATE products p SET category_id = c.id FROM categories c "
                "WHERE p.id <= 'p0000030' AND c.id = (SELECT min(id) FROM categories "
                "WHERE id <> p.category_id) RETURNING p.id, c.id"
            ).fetchall()
            conn.execute("UPDATE categories SET name = name || ' (renamed)'")
            categories = [r[0] for r in conn.execute("SELECT id FROM categories")]
        old = {pid: c for pid, c in moved}
        broadcasts = Delta("catalog_name_broadcasts_total")
        await store.invalidate([Tag.product(i) for i in IDS])
        await store.invalidate(
            [Tag.list_category(c) for c in categories] + [Tag.list_brand(b) for _, b in filters]
        )
        await store.invalidate([Tag.category(c) for c in categories])

        async def delivered() -> bool:
            return broadcasts() == len(categories)

        await eventually(delivered, what="the rename broadcasts")
        assert old, "some products moved"
        assert await read_all(reader) == db_names(url), "a read returned stale data"
        pages = await read_pages(reader, filters)
        assert pages == {f"{c}/{b}": db_page(url, c, b) for c, b in filters}, "a stale page"
        assert int((await redis.info("stats"))["evicted_keys"]) >= 500
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
