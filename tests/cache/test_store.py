"""The cache protocol against a real Redis: leases, fills, tag bookkeeping, invalidation."""

from __future__ import annotations

import asyncio
import random

from redis.asyncio import Redis

from core.cache import entry
from core.cache.store import CacheStore, FillItem
from core.keys import Keys, Tag
from core.settings import Settings
from service.app import create_store


def _store(redis: Redis, settings: Settings, **changes: object) -> CacheStore:
    return create_store(redis, settings.replace(**changes))


async def test_fill_under_own_lease_writes_value_and_tags(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    key, tag = keys.product("p1"), keys.tag(Tag.product("p1"))
    acquired = await store.acquire([key], [[tag]])
    assert acquired.outcomes == [True]
    cat = keys.tag(Tag.category("c1"))
    assert await store.fill(
        acquired.token, acquired.generation, [FillItem(key, b"v1", 10_000, [tag, cat])]
    ) == [True]
    assert await store.get(key) == b"v1"
    assert await redis_client.sismember(cat, key)
    assert not await redis_client.exists(keys.lease(key)), "a fill releases its lease"
    # The tag set outlives its member.
    assert await redis_client.pttl(cat) > await redis_client.pttl(key)


async def test_second_acquire_sees_lease_held_then_value(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    key, tag = keys.product("p1"), keys.tag(Tag.product("p1"))
    first = await store.acquire([key], [[tag]])
    assert (await store.acquire([key], [[tag]])).outcomes == [False]
    await store.fill(first.token, first.generation, [FillItem(key, b"v", 10_000, [tag])])
    assert (await store.acquire([key], [[tag]])).outcomes == [b"v"]


async def test_expired_lease_release_deletes_nothing_and_fill_is_refused(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings, lease_ttl_ms=10, lease_wait_ms=10)
    keys = Keys(settings.key_namespace)
    key, tag = keys.product("p1"), keys.tag(Tag.product("p1"))
    old = await store.acquire([key], [[tag]])
    while await redis_client.exists(keys.lease(key)):  # the holder is "still loading"
        await asyncio.sleep(0.005)
    new = await store.acquire([key], [[tag]])
    assert new.outcomes == [True]

    assert await store.release(old.token, [key]) == 0
    assert await redis_client.get(keys.lease(key)) == new.token.encode()
    assert await store.fill(old.token, old.generation, [FillItem(key, b"old", 10_000, [tag])]) == [
        False
    ]
    assert await store.get(key) is None
    assert await store.fill(new.token, new.generation, [FillItem(key, b"new", 10_000, [tag])]) == [
        True
    ]
    assert await store.get(key) == b"new"


async def test_invalidation_voids_pending_lease_so_fill_is_refused(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    key, tag = keys.product("p1"), keys.tag(Tag.product("p1"))
    acquired = await store.acquire([key], [[tag]])
    # The pending key is already findable from its tag, before any value exists.
    assert await redis_client.sismember(tag, key)
    assert await store.invalidate([Tag.product("p1")]) == 1  # the lease
    assert await store.fill(
        acquired.token, acquired.generation, [FillItem(key, b"stale", 10_000, [tag])]
    ) == [False]
    assert await store.get(key) is None


async def test_rename_refuses_fills_leased_before_it(
    redis_client: Redis, settings: Settings
) -> None:
    """A product fill read the old category name, and is not in the category set yet."""
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    key, tag = keys.product("p1"), keys.tag(Tag.product("p1"))
    acquired = await store.acquire([key], [[tag]])
    await store.invalidate([Tag.category("c1")])
    item = FillItem(key, b"old-name", 10_000, [tag, keys.tag(Tag.category("c1"))])
    assert await store.fill(acquired.token, acquired.generation, [item]) == [False]
    again = await store.acquire([key], [[tag]])
    assert await store.fill(again.token, again.generation, [item]) == [True]


async def test_invalidate_deletes_members_of_every_tag_and_only_them(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    ids = ["a", "b", "c"]
    product_keys = [keys.product(i) for i in ids]
    acquired = await store.acquire(product_keys, [[keys.tag(Tag.product(i))] for i in ids])
    cats = {"a": "c1", "b": "c1", "c": "c2"}
    items = [
        FillItem(
            keys.product(i),
            i.encode(),
            10_000,
            [keys.tag(Tag.product(i)), keys.tag(Tag.category(cats[i]))],
        )
        for i in ids
    ]
    assert await store.fill(acquired.token, acquired.generation, items) == [True, True, True]
    assert await store.invalidate([Tag.category("c1")]) == 2
    assert await store.mget(product_keys) == [None, None, b"c"]
    assert not await redis_client.exists(keys.tag(Tag.category("c1")))


async def test_batch_acquire_mixes_values_held_and_taken(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    k = [keys.product(i) for i in ("x", "y", "z")]
    t = [[keys.tag(Tag.product(i))] for i in ("x", "y", "z")]
    first = await store.acquire(k[:1], t[:1])
    await store.fill(first.token, first.generation, [FillItem(k[0], b"X", 10_000, t[0])])
    await store.acquire(k[1:2], t[1:2])  # someone else holds y
    assert (await store.acquire(k, t)).outcomes == [b"X", False, True]


async def test_concurrent_fills_and_invalidations_keep_tags_complete_and_nothing_stale(
    redis_client: Redis, settings: Settings
) -> None:
    """Thousands of interleaved reader fills and writer invalidations over a few hot keys.

    The "database" is an in-memory version per product; a writer bumps it, then invalidates
    (commit before invalidate). Afterwards every cached value must equal the current version and
    be a member of each of its tag sets.
    """
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    rng = random.Random(7)
    products = [f"p{i}" for i in range(8)]
    category = {p: f"c{i % 3}" for i, p in enumerate(products)}
    version = dict.fromkeys(products, 0)
    outcomes: list[bool] = []

    def tags_of(p: str) -> list[str]:
        return [keys.tag(Tag.product(p)), keys.tag(Tag.category(category[p]))]

    async def yield_some() -> None:
        for _ in range(rng.randrange(4)):
            await asyncio.sleep(0)

    async def reader(p: str) -> None:
        key = keys.product(p)
        acquired = await store.acquire([key], [[keys.tag(Tag.product(p))]])
        if acquired.outcomes != [True]:
            return
        await yield_some()
        seen = version[p]  # the database read, after the lease
        await yield_some()
        written = await store.fill(
            acquired.token,
            acquired.generation,
            [FillItem(key, str(seen).encode(), 60_000, tags_of(p))],
        )
        outcomes.extend(written)

    async def writer(p: str, rename: bool) -> None:
        version[p] += 1
        await yield_some()
        await store.invalidate([Tag.category(category[p])] if rename else [Tag.product(p)])

    ops = []
    for _ in range(4000):
        p = rng.choice(products)
        ops.append(reader(p) if rng.random() < 0.7 else writer(p, rng.random() < 0.1))
    await asyncio.gather(*ops)

    assert True in outcomes, "some fills must have succeeded"
    assert False in outcomes, "some fills must have been refused (the race was exercised)"
    for p in products:
        key = keys.product(p)
        value = await store.get(key)
        if value is None:
            continue
        assert value == str(version[p]).encode(), f"{p} cached a stale version"
        for tag_key in tags_of(p):
            assert await redis_client.sismember(tag_key, key), f"{key} missing from {tag_key}"


async def keys_without_ttl(redis: Redis, namespace: str) -> list[bytes]:
    return [k async for k in redis.scan_iter(match=f"{namespace}:*") if await redis.pttl(k) < 0]


async def test_versioned_invalidation_of_an_expired_tag_set_leaves_no_key_without_ttl(
    redis_client: Redis, settings: Settings
) -> None:
    """The entry is already at the event's version and is kept; its tag set had expired. The
    set rebuilt for it lives as long as the entry plus the margin, not forever."""
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    key, tag = keys.product("p1"), keys.tag(Tag.product("p1"))
    acquired = await store.acquire([key], [[tag]], "force")
    item = FillItem(key, entry.pack(b"x", 5, 0, 1), 60_000, [tag], 5)
    assert await store.fill(acquired.token, acquired.generation, [item]) == [True]
    await redis_client.delete(tag)  # as if it had expired

    await store.invalidate([Tag.product("p1")], {Tag.product("p1"): 5})

    assert await store.get(key) is not None, "the entry at the event's version is kept"
    assert await keys_without_ttl(redis_client, settings.key_namespace) == []
    assert await redis_client.pttl(tag) >= await redis_client.pttl(key)
