"""Fixtures of the invalidator tests: real Redis clients built like the process builds them, a
cache filler, and in-process consumers that are always stopped and awaited."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from core.cache.store import CacheStore, FillItem
from core.keys import Keys
from core.publisher import Publisher
from core.redisclient import RedisClient, ReplicaWait, connect
from core.settings import Settings
from invalidator.consumer import Consumer
from invalidator.settings import InvalidatorSettings
from invalidator.worker import redis_clients
from tests.helpers import delete_namespace

FAST = {
    "invalidator_block_ms": 200,
    "invalidator_claim_min_idle_ms": 300,
    "invalidator_claim_interval_ms": 50,
    "invalidator_retry_backoff_ms": 20,
    "invalidator_metrics_port": 0,
    "invalidator_health_address": "",
    "outbox_relay": False,
    "event_stream_maxlen": 100_000,
}


@pytest.fixture
def isettings() -> InvalidatorSettings:
    return InvalidatorSettings.from_env({}, **FAST)


@pytest.fixture
def keys(settings: Settings, isettings: InvalidatorSettings) -> Keys:
    return isettings.keys(settings)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    """A client on the test's Redis (of either topology when the module's ``settings`` is
    ``topo_settings``); deletes this test's namespace (keys and streams) after."""
    client = cast(Redis, connect(settings, socket_timeout=5.0, connect_timeout=5.0))
    yield client
    await delete_namespace(client, settings.key_namespace)
    await client.aclose()


@pytest.fixture
def store(redis: Redis, keys: Keys) -> CacheStore:
    return CacheStore(redis, keys, lease_ttl_ms=5000, tag_margin_ms=60_000)


@pytest.fixture
def publisher(redis: Redis, keys: Keys) -> Publisher:
    return Publisher(redis, keys, maxlen=100_000)


async def fill(store: CacheStore, key: str, data: bytes = b"v") -> None:
    """Cache ``data`` under a product key the way readers do: lease, then fill."""
    got = await store.acquire([key])
    assert got.outcomes == [True]
    assert await store.fill(got.token, [FillItem(key, data, 600_000)])


async def fill_page(store: CacheStore, category: str, brand: str, data: bytes = b"v") -> str:
    """Cache a page of the filter the way readers do (a combined filter registered first, the
    page in its filter's page set); returns its key."""
    keys = store.keys
    key, pages = keys.page(category, brand, "", 10), keys.pages(category, brand)
    if category and brand:
        registries = [
            (keys.category_registry(category), brand),
            (keys.brand_registry(brand), category),
        ]
        await store.register(registries, 600_000)
    got = await store.acquire([key], "miss", [pages])
    assert got.outcomes == [True]
    assert await store.fill(got.token, [FillItem(key, data, 600_000, pages)])
    return key


@dataclass
class Consumers:
    """Starts in-process consumers; stops and awaits every one at teardown."""

    settings: Settings
    isettings: InvalidatorSettings
    store: CacheStore
    running: list[tuple[Consumer, asyncio.Task[bool], list[RedisClient]]] = field(
        default_factory=list
    )

    def start(
        self,
        name: str,
        cls: Callable[..., Consumer] = Consumer,
        replicas: ReplicaWait | None = None,
        **overrides: Any,
    ) -> Consumer:
        isettings = self.isettings.replace(**overrides)
        redis, reader = redis_clients(self.settings, isettings)
        keys = isettings.keys(self.settings)
        store = CacheStore(redis, keys, lease_ttl_ms=5000, tag_margin_ms=60_000)
        consumer = cls(redis, reader, store, keys, isettings, name, replicas=replicas)
        self.running.append((consumer, asyncio.create_task(consumer.serve()), [redis, reader]))
        return consumer

    async def stop(self, consumer: Consumer) -> bool:
        for c, task, clients in self.running:
            if c is consumer:
                c.stop()
                left = await asyncio.wait_for(task, 30)
                for client in clients:
                    await client.aclose()
                self.running.remove((c, task, clients))
                return left
        raise ValueError("not running")


@pytest.fixture
async def consumers(
    settings: Settings, isettings: InvalidatorSettings, store: CacheStore
) -> AsyncIterator[Consumers]:
    group = Consumers(settings, isettings, store)
    yield group
    for consumer, _, _ in list(group.running):
        with contextlib.suppress(Exception):
            await group.stop(consumer)


async def entries(redis: Redis, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The whole stream (XRANGE - +)."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(stream))


async def exists(redis: Redis, *keys: str) -> list[bool]:
    return [bool(await redis.exists(k)) for k in keys]


async def group_info(redis: Redis, keys: Keys) -> dict[str, Any]:
    """XINFO GROUPS of our group; pending and lag -1 while it does not exist yet."""
    if await redis.exists(keys.stream):
        for group in await redis.xinfo_groups(keys.stream):
            if group["name"].decode() == keys.group:
                return dict(group)
    return {"pending": -1, "lag": -1}


def counted(*consumers: Consumer, total: int) -> Callable[[], Awaitable[bool]]:
    """A check for :func:`tests.helpers.eventually`: the consumers counted ``total`` entries as
    processed or dead-lettered. Polling the group alone races: XINFO on another connection can
    show an entry acked before its consumer's coroutine has resumed to count it."""

    async def check() -> bool:
        return sum(c.stats.processed + c.stats.dead_lettered for c in consumers) >= total

    return check
