"""The cache protocol against a real Redis and a real Redis Cluster: leases, fills, page sets,
registries, invalidation, and the one-slot-per-script rule every call keeps. Every test runs on
both topologies."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from core.cache import entry
from core.cache.store import CacheStore, FillItem, slot_groups
from core.keys import Keys, Tag
from core.redisclient import CrossSlot, is_cluster, pubsub_client
from core.redisscript import Script
from core.settings import Settings
from service.app import create_store


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Every test of this module runs on one Redis and on a Redis Cluster."""
    return topo_settings


def _store(redis: Redis, settings: Settings, **changes: object) -> CacheStore:
    return create_store(redis, settings.replace(**changes))


def _product(version: int = 1, data: bytes = b"x") -> bytes:
    return entry.pack_product(data, "c1", "b1", version, 0, 1)


async def _register(store: CacheStore, category: str, brand: str) -> None:
    """What a reader of a combined filter does before its ACQUIRE."""
    keys = store.keys
    await store.register(
        [(keys.category_registry(category), brand), (keys.brand_registry(brand), category)],
        600_000,
    )


async def _fill_page(store: CacheStore, category: str, brand: str, size: int = 10) -> str:
    """A page cached the way readers cache it: registered (combined filter), leased into its
    filter's page set, filled."""
    keys = store.keys
    key, pages = keys.page(category, brand, "", size), keys.pages(category, brand)
    if category and brand:
        await _register(store, category, brand)
    got = await store.acquire([key], "miss", [pages])
    assert got.outcomes == [True]
    assert await store.fill(got.token, [FillItem(key, b"page", 600_000, pages)]) == [True]
    return key


def test_slot_groups_keep_one_group_in_standalone_and_split_by_slot_in_cluster() -> None:
    keys = Keys("ns")
    ids = [f"p{i}" for i in range(50)]
    product_keys = [keys.product(i) for i in ids]
    assert slot_groups(product_keys, per_slot=False) == [list(range(50))]
    assert slot_groups([], per_slot=False) == []
    groups = slot_groups(product_keys, per_slot=True)
    assert sorted(i for g in groups for i in g) == list(range(50)), "every entry exactly once"
    for group in groups:
        assert group == sorted(group), "first-seen order within a group"
        assert len({key_slot(product_keys[i].encode()) for i in group}) == 1
    slots = [key_slot(product_keys[g[0]].encode()) for g in groups]
    assert len(set(slots)) == len(groups), "one group per slot"
    # Every key of a filter shares one slot, whatever the position and size.
    same = [keys.page("c1", "b1", a, n) for a in ("", "p9") for n in (5, 20)]
    same += [keys.pages("c1", "b1"), keys.lease(keys.page("c1", "b1", "", 5))]
    assert len(slot_groups(same, per_slot=True)) == 1
    assert key_slot(keys.category_registry("c1").encode()) == key_slot(
        keys.pages("c1", "").encode()
    )
    assert key_slot(keys.brand_registry("b1").encode()) == key_slot(keys.pages("", "b1").encode())


class SlotChecked(CacheStore):
    """Counts script calls; in per-slot mode fails the test if one spans two hash slots."""

    calls: list[int]

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        slots = {key_slot(k.encode()) for k in keys}
        assert len(slots) <= 1 or not self.per_slot, f"a script call spans slots {slots}: {keys}"
        self.calls.append(len(keys))
        return await super()._eval(script, keys, args)

    async def _eval_many(
        self, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        for keys, _ in calls:
            slots = {key_slot(k.encode()) for k in keys}
            assert len(slots) <= 1, f"a script call spans slots {slots}: {keys}"
            self.calls.append(len(keys))
        return await super()._eval_many(script, calls)


@pytest.mark.parametrize("per_slot", [False, True])
async def test_every_call_runs_one_script_per_slot_and_batches_keep_one_call_standalone(
    redis_client: Redis, settings: Settings, per_slot: bool
) -> None:
    keys = Keys(settings.key_namespace)
    store = SlotChecked(redis_client, keys, lease_ttl_ms=5000, tag_margin_ms=60_000)
    assert store.per_slot == is_cluster(redis_client), "per slot by default on a cluster only"
    store.per_slot, store.calls = per_slot, []
    ids = [f"p{i}" for i in range(20)]
    if is_cluster(redis_client) and not per_slot:
        with pytest.raises(CrossSlot):  # why a cluster needs the groups
            await store.acquire([keys.product(i) for i in ids])
        return
    got = await store.acquire([keys.product(i) for i in ids])
    assert got.outcomes == [True] * 20
    items = [FillItem(keys.product(i), _product(), 60_000, version=1) for i in ids]
    assert await store.fill(got.token, items) == [True] * 20
    page = await _fill_page(store, "c1", "b1")
    n = await store.invalidate(
        [*(Tag.product(i) for i in ids), Tag.list_category("c1"), Tag.brand("b1")]
    )
    assert n == 21
    assert await store.mget([*(keys.product(i) for i in ids), page]) == [None] * 21
    if not per_slot:
        # acquire and fill (one call each for 20 products); the page's register, acquire and
        # fill; then one INVALIDATE_PRODUCTS and one INVALIDATE_PAGES.
        assert len(store.calls) == 7
    else:
        assert len(store.calls) > 7


async def test_fill_under_own_lease_writes_the_value_and_releases_the_lease(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    key = keys.product("p1")
    acquired = await store.acquire([key])
    assert acquired.outcomes == [True]
    assert await store.fill(acquired.token, [FillItem(key, b"v1", 10_000)]) == [True]
    assert await store.get(key) == b"v1"
    assert not await redis_client.exists(keys.lease(key)), "a fill releases its lease"
    page = await _fill_page(store, "c1", "")
    pages = keys.pages("c1", "")
    assert await redis_client.sismember(pages, page)
    assert await redis_client.pttl(pages) > await redis_client.pttl(page), "the set outlives it"


async def test_second_acquire_sees_lease_held_then_value(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings)
    key = Keys(settings.key_namespace).product("p1")
    first = await store.acquire([key])
    assert (await store.acquire([key])).outcomes == [False]
    await store.fill(first.token, [FillItem(key, b"v", 10_000)])
    assert (await store.acquire([key])).outcomes == [b"v"]


async def test_expired_lease_release_deletes_nothing_and_fill_is_refused(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings, lease_ttl_ms=10, lease_wait_ms=10)
    keys = Keys(settings.key_namespace)
    key = keys.product("p1")
    old = await store.acquire([key])
    while await redis_client.exists(keys.lease(key)):  # the holder is "still loading"
        await asyncio.sleep(0.005)
    new = await store.acquire([key])
    assert new.outcomes == [True]

    assert await store.release(old.token, [key]) == 0
    assert await redis_client.get(keys.lease(key)) == new.token.encode()
    assert await store.fill(old.token, [FillItem(key, b"old", 10_000)]) == [False]
    assert await store.get(key) is None
    assert await store.fill(new.token, [FillItem(key, b"new", 10_000)]) == [True]
    assert await store.get(key) == b"new"


async def test_product_invalidation_voids_a_pending_lease_without_any_set(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    key = keys.product("p1")
    acquired = await store.acquire([key])
    assert [k async for k in redis_client.scan_iter(match=f"{settings.key_namespace}:*")] == [
        keys.lease(key).encode()
    ], "a product lease is the only key: its invalidation derives it from the id"
    assert await store.invalidate([Tag.product("p1")]) == 1  # the lease
    assert await store.fill(acquired.token, [FillItem(key, b"stale", 10_000)]) == [False]
    assert await store.get(key) is None


@pytest.mark.parametrize(
    ("category", "brand", "tag"),
    [
        ("c1", "", Tag.list_category("c1")),
        ("", "b1", Tag.list_brand("b1")),
        ("", "", Tag.list_all()),
        ("c1", "b1", Tag.list_category("c1")),
        ("c1", "b1", Tag.list_brand("b1")),
    ],
)
async def test_list_invalidation_voids_a_pending_page_lease(
    redis_client: Redis, settings: Settings, category: str, brand: str, tag: Tag
) -> None:
    """The page joined its filter's set (and a combined filter its registries) before its
    database read, so the invalidation finds its lease and the fill is refused."""
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    key, pages = keys.page(category, brand, "", 10), keys.pages(category, brand)
    if category and brand:
        await _register(store, category, brand)
    acquired = await store.acquire([key], "miss", [pages])
    assert await store.invalidate([tag]) == 1  # the lease
    assert await store.fill(acquired.token, [FillItem(key, b"stale", 10_000, pages)]) == [False]
    assert await store.get(key) is None


async def test_a_rename_changes_no_cached_value_and_is_announced(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    key = keys.product("p1")
    acquired = await store.acquire([key])
    pubsub = (await pubsub_client(redis_client)).pubsub()
    await pubsub.subscribe(keys.names_channel)
    assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
    assert await store.invalidate([Tag.category("c1"), Tag.brand("b1")]) == 0
    got = sorted([bytes((await pubsub.get_message(timeout=5))["data"]) for _ in range(2)])
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert got == [b"b:b1", b"c:c1"]
    assert await store.fill(acquired.token, [FillItem(key, _product(), 10_000)]) == [True], (
        "a fill in flight during a rename holds no name, so nothing refuses it"
    )


async def test_list_invalidation_deletes_the_pages_of_its_filters_and_only_them(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings)
    filters = [("c1", ""), ("c2", ""), ("", "b1"), ("", "b2"), ("", ""), ("c1", "b1")]
    filters += [("c1", "b2"), ("c2", "b1")]
    pages = {f: await _fill_page(store, *f) for f in filters}

    async def left() -> set[tuple[str, str]]:
        values = await store.mget(list(pages.values()))
        return {f for f, v in zip(pages, values, strict=True) if v is not None}

    await store.invalidate([Tag.list_category("c1")])
    assert await left() == set(filters) - {("c1", ""), ("c1", "b1"), ("c1", "b2")}
    await store.invalidate([Tag.list_brand("b1")])
    assert await left() == {("c2", ""), ("", "b2"), ("", "")}
    await store.invalidate([Tag.list_all()])
    assert await left() == {("c2", ""), ("", "b2")}
    keys = Keys(settings.key_namespace)
    assert not await redis_client.exists(keys.pages("c1", "")), "an emptied set disappears"
    assert await redis_client.smembers(keys.category_registry("c1")) == {b"b1", b"b2"}, (
        "registry members are never removed"
    )


class AcquiresDuringInvalidation(CacheStore):
    """After the invalidation read a page set, another reader leases a page of that filter
    (joining the set) before the INVALIDATE_PAGES script runs: the member it was not given."""

    racer: tuple[str, str] = ("", "")
    raced: list[str]

    async def _smembers(self, sets: Sequence[str]) -> list[list[bytes]]:
        found = await super()._smembers(sets)
        if self.keys.pages(*self.racer) in sets and not self.raced:
            key = self.keys.page(*self.racer, "", 99)
            got = await self.acquire([key], "miss", [self.keys.pages(*self.racer)])
            self.raced.append(got.token)
        return found


async def test_a_page_leased_between_smembers_and_the_script_is_voided_in_another_round(
    redis_client: Redis, settings: Settings
) -> None:
    keys = Keys(settings.key_namespace)
    store = AcquiresDuringInvalidation(redis_client, keys, lease_ttl_ms=5000, tag_margin_ms=60_000)
    store.racer, store.raced = ("c1", ""), []
    cached = await _fill_page(store, "c1", "")
    n = await store.invalidate([Tag.list_category("c1")])
    assert store.raced, "the race happened"
    assert n == 2, "the cached page, then the racer's lease in a second round"
    late = keys.page("c1", "", "", 99)
    assert await store.fill(store.raced[0], [FillItem(late, b"stale", 10_000)]) == [False]
    assert await store.mget([cached, late]) == [None, None]
    assert not await redis_client.exists(keys.pages("c1", ""))


async def test_batch_acquire_mixes_values_held_and_taken(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    k = [keys.product(i) for i in ("x", "y", "z")]
    first = await store.acquire(k[:1])
    await store.fill(first.token, [FillItem(k[0], b"X", 10_000)])
    await store.acquire(k[1:2])  # someone else holds y
    assert (await store.acquire(k)).outcomes == [b"X", False, True]


async def test_versions_never_go_backwards(redis_client: Redis, settings: Settings) -> None:
    """FILL, DROP_OLDER and a versioned invalidation compare the header version in the value's
    own slot."""
    store = _store(redis_client, settings)
    key = Keys(settings.key_namespace).product("p1")

    async def fill(version: int) -> bool:
        got = await store.acquire([key], "force")
        item = FillItem(key, _product(version), 60_000, version=version)
        return (await store.fill(got.token, [item]))[0]

    assert await fill(5)
    assert not await fill(4), "an older fill never replaces a newer entry"
    assert not await store.drop_older(key, 5)
    await store.invalidate([Tag.product("p1")], {Tag.product("p1"): 5})
    assert entry.header(await store.get(key) or b"").version == 5, "kept: already at 5"
    await store.invalidate([Tag.product("p1")], {Tag.product("p1"): 6})
    assert await store.get(key) is None, "older than the event: gone"
    assert await fill(3)
    assert await store.drop_older(key, 4)


Thing = str | tuple[str, str]  # a product id, or a list filter (category, brand)


async def test_concurrent_fills_and_invalidations_leave_nothing_stale(
    redis_client: Redis, settings: Settings
) -> None:
    """Thousands of interleaved reader fills and writer invalidations over a few hot products
    and list filters, combined filters reached through either of their registries.

    The "database" is in memory: a version per product and per filter; a writer bumps it, then
    invalidates (commit before invalidate). Operations start a few scheduler steps apart, so
    each overlaps its neighbours at random. Afterwards every cached value equals the current
    version, and every cached page is a member of its filter's page set.
    """
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    rng = random.Random(7)
    products = [f"p{i}" for i in range(8)]
    filters = [("c0", ""), ("c1", ""), ("", "b0"), ("c0", "b0"), ("c1", "b0"), ("", "")]
    choices: list[Thing] = [*products, *filters]
    version = dict.fromkeys(choices, 0)
    outcomes: list[bool] = []

    async def yield_some() -> None:
        for _ in range(rng.randrange(4)):
            await asyncio.sleep(0)

    def key_of(what: Thing) -> str:
        return keys.product(what) if isinstance(what, str) else keys.page(*what, "", 10)

    async def reader(what: Thing) -> None:
        key = key_of(what)
        pages = "" if isinstance(what, str) else keys.pages(*what)
        if isinstance(what, tuple) and all(what):
            await _register(store, *what)
        acquired = await store.acquire([key], "miss", [pages] if pages else None)
        if acquired.outcomes != [True]:
            return
        await yield_some()
        seen = version[what]  # the database read, after the lease
        await yield_some()
        data = str(seen).encode()
        outcomes.extend(await store.fill(acquired.token, [FillItem(key, data, 60_000, pages)]))

    def tags_of(what: Thing) -> list[Tag]:
        if isinstance(what, str):
            return [Tag.product(what)]
        c, b = what
        if c and b:  # either one alone must reach the combined filter (its registries)
            return [rng.choice([Tag.list_category(c), Tag.list_brand(b)])]
        return [Tag.list_category(c) if c else Tag.list_brand(b) if b else Tag.list_all()]

    async def writer(what: Thing) -> None:
        await yield_some()
        version[what] += 1  # the commit
        await yield_some()
        await store.invalidate(tags_of(what))

    tasks = []
    for _ in range(4000):
        what = rng.choice(choices)
        op = reader(what) if rng.random() < 0.7 else writer(what)
        tasks.append(asyncio.ensure_future(op))
        await yield_some()
    await asyncio.gather(*tasks)

    assert True in outcomes, "some fills must have succeeded"
    assert False in outcomes, "some fills must have been refused (the race was exercised)"
    for what in choices:
        key = key_of(what)
        value = await store.get(key)
        if value is None:
            continue
        assert value == str(version[what]).encode(), f"{what} cached a stale version"
        if isinstance(what, tuple):
            assert await redis_client.sismember(keys.pages(*what), key), f"{key} not in its set"


async def keys_without_ttl(redis: Redis, namespace: str) -> list[bytes]:
    return [k async for k in redis.scan_iter(match=f"{namespace}:*") if await redis.pttl(k) < 0]


async def test_no_cache_key_is_ever_left_without_a_ttl(
    redis_client: Redis, settings: Settings
) -> None:
    store = _store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    key = keys.product("p1")
    acquired = await store.acquire([key], "force")
    item = FillItem(key, _product(5), 60_000, version=5)
    assert await store.fill(acquired.token, [item]) == [True]
    await _fill_page(store, "c1", "b1")
    await store.acquire([keys.page("", "", "", 5)], "miss", [keys.pages("", "")])
    await store.invalidate([Tag.product("p1")], {Tag.product("p1"): 5})
    assert await store.get(key) is not None, "the entry at the event's version is kept"
    assert await keys_without_ttl(redis_client, settings.key_namespace) == []
