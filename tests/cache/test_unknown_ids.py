"""What unknown ids and filters leave in Redis: one short-lived key per unknown id, nothing for
a filter that matches no product (each was two keys, or a page plus tag sets, for minutes)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from core.cache.reader import Reader
from core.keys import Keys
from core.repository import Repository
from core.settings import Settings
from service.app import create_store


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Every test of this module runs on one Redis and on a Redis Cluster."""
    return topo_settings


async def namespace_keys(redis: Redis, namespace: str) -> dict[bytes, int]:
    """Every key of the test's namespace with its PTTL (-1: none)."""
    return {k: await redis.pttl(k) async for k in redis.scan_iter(match=f"{namespace}:*")}


def reader_for(redis: Redis, engine: AsyncEngine, settings: Settings) -> Reader:
    keys = Keys(settings.key_namespace)
    return Reader(create_store(redis, settings), Repository(engine), keys, settings)


async def test_unknown_ids_cost_one_short_lived_key_each(
    settings: Settings, engine: AsyncEngine, redis_client: Redis
) -> None:
    reader = reader_for(redis_client, engine, settings)
    unknown = [f"nope{n}" for n in range(50)]
    assert await reader.batch_get(unknown) == [None] * 50
    assert await reader.get_product("nope-single") is None

    keys = Keys(settings.key_namespace)
    left = await namespace_keys(redis_client, settings.key_namespace)
    assert sorted(left) == sorted(keys.product(i).encode() for i in [*unknown, "nope-single"])
    longest = settings.negative_ttl_s * (1 + settings.ttl_jitter) * 1000
    assert all(0 < ttl <= longest for ttl in left.values())


async def test_a_filter_matching_no_product_caches_nothing(
    settings: Settings, engine: AsyncEngine, redis_client: Redis
) -> None:
    reader = reader_for(redis_client, engine, settings)
    for category, brand in (("c99999", ""), ("", "b9999"), ("c99999", "b9999")):
        page = await reader.list_page(category, brand, "", 20)
        assert page.products == [] and page.next_after_id == ""
    assert await namespace_keys(redis_client, settings.key_namespace) == {}

    page = await reader.list_page("", "", "", 5)  # a page with products is cached as before
    assert len(page.products) == 5
    assert await namespace_keys(redis_client, settings.key_namespace) != {}
