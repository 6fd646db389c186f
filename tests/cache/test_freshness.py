"""Stale-while-revalidate and probabilistic early refresh (XFetch), on real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from core.cache import entry
from core.cache.reader import Reader
from core.db import create_engine
from core.keys import Keys, Tag
from core.repository import Repository
from core.settings import Settings
from service.app import create_store
from tests.cache.test_reader import PausedAfterRead, db_execute
from tests.helpers import Delta, db_loads, eventually


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Every test of this module runs on one Redis and on a Redis Cluster."""
    return topo_settings


PID = "p0000021"


def test_stale_entries_always_refresh_and_beta_zero_never_refreshes_early() -> None:
    rand = random.Random(3)
    assert entry.should_refresh(1000.0, 1000, 50, 1.0, rand)
    assert entry.should_refresh(5000.0, 1000, 50, 0.0, rand)
    assert not any(entry.should_refresh(999.0, 1000, 50, 0.0, rand) for _ in range(1000))


@pytest.mark.parametrize(
    ("gap_ms", "delta_ms", "beta"), [(10, 10, 1.0), (50, 10, 2.0), (5, 20, 0.5)]
)
def test_xfetch_refresh_probability_is_exp_of_minus_gap_over_delta_beta(
    gap_ms: int, delta_ms: int, beta: float
) -> None:
    """P(refresh at `gap` before expiry) = P(-delta*beta*ln U >= gap) = exp(-gap/(delta*beta))."""
    rand = random.Random(11)
    draws = 40_000
    hits = sum(
        entry.should_refresh(1000.0 - gap_ms, 1000, delta_ms, beta, rand) for _ in range(draws)
    )
    expected = math.exp(-gap_ms / (delta_ms * beta))
    assert abs(hits / draws - expected) < 0.015, (hits / draws, expected)


def test_xfetch_refreshes_more_often_closer_to_expiry() -> None:
    rand = random.Random(5)
    rates = [
        sum(entry.should_refresh(1000.0 - gap, 1000, 10, 1.0, rand) for _ in range(5000))
        for gap in (40, 20, 10, 1)
    ]
    assert rates == sorted(rates)


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(settings)
    yield eng
    await eng.dispose()


async def make_stale(redis: Redis, key: str) -> None:
    """Move an entry's logical expiry into the past, keeping its bytes and physical TTL."""
    raw = await redis.get(key)
    assert isinstance(raw, bytes)
    head = entry.header(raw)
    past = int(time.time() * 1000) - 1000
    await redis.set(
        key, entry.pack(entry.payload(raw), head.version, past, head.load_ms), keepttl=True
    )


async def test_stale_entry_serves_500_concurrent_reads_from_cache_with_one_reload(
    settings: Settings, engine: AsyncEngine, redis_client: Redis
) -> None:
    keys = Keys(settings.key_namespace)
    reader = Reader(create_store(redis_client, settings), Repository(engine), keys, settings)
    first = await reader.get_product(PID)
    await make_stale(redis_client, keys.product(PID))

    loads, hits = db_loads(), Delta("catalog_cache_requests_total", op="get", result="hit")
    misses = Delta("catalog_cache_requests_total", op="get", result="miss")
    results = await asyncio.gather(*(reader.get_product(PID) for _ in range(500)))
    assert set(results) == {first}
    assert (hits(), misses()) == (500, 0), "every read answered from the cache"

    async def refreshed() -> bool:
        raw = await redis_client.get(keys.product(PID))
        return isinstance(raw, bytes) and entry.header(raw).fresh_until_ms > time.time() * 1000

    await eventually(refreshed, what="the background refresh")
    assert loads() == 1, "one reload for 500 stale reads"


async def test_invalidated_entry_is_never_served_stale(
    settings: Settings, fresh_database_url: str, redis_client: Redis
) -> None:
    """A refresh in flight reads the old row; the product changes and is invalidated; the
    refresh's fill is refused and the next read returns the new data, not the stale entry."""
    writable = settings.replace(database_url=fresh_database_url)
    eng = create_engine(writable)
    try:
        keys = Keys(writable.key_namespace)
        store = create_store(redis_client, writable)
        paused = PausedAfterRead(eng)
        reader = Reader(store, paused, keys, writable)
        paused.proceed.set()
        await reader.get_product(PID)
        paused.proceed.clear()
        paused.has_read.clear()
        await make_stale(redis_client, keys.product(PID))

        refused = Delta("catalog_fill_refused_total")
        await reader.get_product(PID)  # serves stale, starts the refresh
        await paused.has_read.wait()
        db_execute(
            fresh_database_url,
            "UPDATE products SET name = 'fresh', version = version + 1 WHERE id = %s",
            PID,
        )
        await store.invalidate([Tag.product(PID)])
        paused.proceed.set()

        async def refusal_seen() -> bool:
            return refused() == 1

        await eventually(refusal_seen, what="the refresh to be refused")
        assert pb.Product.FromString(await reader.get_product(PID) or b"").name == "fresh"
    finally:
        await eng.dispose()


async def test_hot_key_is_refreshed_before_expiry_so_readers_never_miss(
    settings: Settings, engine: AsyncEngine, redis_client: Redis
) -> None:
    """No stale window (physical TTL = logical TTL), a 1 s TTL and an eager beta: a key read
    continuously is reloaded by XFetch before it expires, so no reader ever sees a miss."""
    hot = settings.replace(
        product_ttl_s=1.0, ttl_jitter=0.0, product_stale_s=0.0, product_xfetch_beta=200.0
    )
    keys = Keys(hot.key_namespace)
    reader = Reader(create_store(redis_client, hot), Repository(engine), keys, hot)
    await reader.get_product(PID)
    misses = Delta("catalog_cache_requests_total", op="get", result="miss")
    refreshes = Delta("catalog_refreshes_total", kind="product")
    until = time.monotonic() + 2.5
    while time.monotonic() < until:
        assert await reader.get_product(PID)
        await asyncio.sleep(0.001)
    assert refreshes() >= 2, "the key outlived two TTLs only through early refreshes"
    assert misses() == 0


def test_xfetch_draws_nothing_beyond_its_horizon() -> None:
    """Further than delta * beta * XFETCH_HORIZON from expiry no draw could pick the entry
    (probability exp(-30)): none is made, so the hit path skips the random number."""
    rand = random.Random(7)
    state = rand.getstate()
    horizon_ms = 10 * 2.0 * entry.XFETCH_HORIZON
    assert not entry.should_refresh(1000.0 - horizon_ms - 1, 1000, 10, 2.0, rand)
    assert rand.getstate() == state
    entry.should_refresh(1000.0 - horizon_ms, 1000, 10, 2.0, rand)
    assert rand.getstate() != state
