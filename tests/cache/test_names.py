"""The name table (core/cache/names.py) on real PostgreSQL and Redis, with a driven clock: the
staleness bound with and without a rename's broadcast, the epoch fence against a load racing
the broadcast, single flight, re-subscription, and PostgreSQL going away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import psycopg
import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from core.cache.names import NameTable
from core.db import create_engine, libpq_url
from core.keys import Keys
from core.repository import Names, Repository, category_fragment
from core.settings import Settings
from devtools.localservers import RedisProcess
from service.app import create_redis
from tests.helpers import Delta, eventually

TTL_MS = 2000
C = b"c00001"  # a seeded category


class Clock:
    """Seconds, counted in whole milliseconds (no float drift at the TTL's boundary)."""

    def __init__(self) -> None:
        self.ms = 500_000

    @property
    def now(self) -> float:
        return self.ms / 1000

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.ms += int(ms)


class Gated(Repository):
    """The real repository; a name read can be held after it has read the database."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.hold = False
        self.has_read = asyncio.Event()
        self.proceed = asyncio.Event()
        self.loads = 0

    async def get_names(self, category_ids: Sequence[str], brand_ids: Sequence[str]) -> Names:
        self.loads += 1
        names = await super().get_names(category_ids, brand_ids)
        if self.hold:
            self.has_read.set()
            await self.proceed.wait()
        return names


@pytest.fixture
async def engine_for(fresh_database_url: str, settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.replace(database_url=fresh_database_url))
    yield engine
    await engine.dispose()


def rename(url: str, name: str, category: bytes = C) -> None:
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute("UPDATE categories SET name = %s WHERE id = %s", (name, category.decode()))


async def served(table: NameTable, category: bytes = C) -> bytes:
    """The category fragment a read starting now would serve (the hit path, else a load)."""
    fragments = table.pair(category, b"b00001")
    if fragments is not None:
        return fragments[0]
    return (await table.fragments([category], []))[0][category]


async def test_without_a_broadcast_a_renamed_name_is_served_until_the_ttl_and_never_after(
    engine_for: AsyncEngine, fresh_database_url: str
) -> None:
    clock, repo = Clock(), Gated(engine_for)
    table = NameTable(repo.get_names, TTL_MS, clock)
    rename(fresh_database_url, "Old")
    await table.fragments([C], [b"b00001"])
    loaded_at = clock.now
    rename(fresh_database_url, "New")  # its broadcast is lost
    for step_ms in (0, 1000, 999):
        clock.advance_ms(step_ms)
        assert await served(table) == category_fragment("Old"), "within the TTL: cached"
    assert (clock.now - loaded_at) * 1000 == pytest.approx(TTL_MS - 1)
    clock.advance_ms(1)
    assert await served(table) == category_fragment("New"), "at the TTL: re-read"
    for step_ms in (0, 1, TTL_MS * 10):
        clock.advance_ms(step_ms)
        assert await served(table) == category_fragment("New")


async def test_with_the_broadcast_the_old_name_is_not_served_after_the_message(
    engine_for: AsyncEngine, fresh_database_url: str
) -> None:
    clock, repo = Clock(), Gated(engine_for)
    table = NameTable(repo.get_names, TTL_MS, clock)
    rename(fresh_database_url, "Old")
    assert await served(table) == category_fragment("Old")
    rename(fresh_database_url, "New")
    assert await served(table) == category_fragment("Old"), "no message yet, within the TTL"
    table.drop(b"c:" + C)  # the invalidator's message, delivered
    assert await served(table) == category_fragment("New"), "at once, no clock moved"
    table.drop(b"b:b00001")  # a brand's message leaves the category alone
    loads = repo.loads
    assert await served(table) == category_fragment("New") and repo.loads == loads


async def test_a_load_racing_the_broadcast_never_installs_the_old_name(
    engine_for: AsyncEngine, fresh_database_url: str
) -> None:
    """A load reads the old name; the rename commits and its message arrives; the load ends.
    Its caller (which started before the message) gets what it read, but the table does not
    keep it, and a read that starts after the message never joins that load."""
    clock, repo = Clock(), Gated(engine_for)
    table = NameTable(repo.get_names, TTL_MS, clock)
    rename(fresh_database_url, "Old")
    repo.hold = True
    racing = asyncio.ensure_future(table.fragments([C], []))
    await repo.has_read.wait()
    rename(fresh_database_url, "New")
    table.drop(b"c:" + C)
    repo.hold = False
    after = await table.fragments([C], [])  # started after the message: a load of its own
    assert after[0][C] == category_fragment("New")
    repo.proceed.set()
    assert (await racing)[0][C] == category_fragment("Old")
    assert repo.loads == 2
    assert await served(table) == category_fragment("New"), "the racing load installed nothing"


async def test_missing_names_of_a_request_load_in_one_query_shared_by_concurrent_requests(
    engine_for: AsyncEngine,
) -> None:
    clock, repo = Clock(), Gated(engine_for)
    table = NameTable(repo.get_names, TTL_MS, clock)
    repo.hold = True
    wanted = ([b"c00001", b"c00002", b"nope"], [b"b00001", b"b00002"])
    first = asyncio.ensure_future(table.fragments(*wanted))
    await repo.has_read.wait()
    others = [asyncio.ensure_future(table.fragments([b"c00002"], [b"b00002"])) for _ in range(20)]
    await asyncio.sleep(0)
    repo.proceed.set()
    categories, brands = await first
    assert set(categories) == {b"c00001", b"c00002"}, "an unknown id is absent"
    assert set(brands) == {b"b00001", b"b00002"}
    for other in await asyncio.gather(*others):
        assert other == ({b"c00002": categories[b"c00002"]}, {b"b00002": brands[b"b00002"]})
    assert repo.loads == 1, "one query for the request, joined by the others"
    assert table.pair(b"c00001", b"b00002") == (categories[b"c00001"], brands[b"b00002"])
    assert await table.exist("c00001", "b00001")
    assert not await table.exist("c00001", "nope")


async def test_a_load_also_refreshes_names_past_half_their_ttl(engine_for: AsyncEngine) -> None:
    clock, repo = Clock(), Gated(engine_for)
    table = NameTable(repo.get_names, TTL_MS, clock)
    await table.fragments([b"c00001"], [b"b00001"])
    clock.advance_ms(TTL_MS * 0.6)
    await table.fragments([b"c00002"], [])  # a miss: c00001 and b00001 ride along
    clock.advance_ms(TTL_MS * 0.6)
    loads = repo.loads
    assert table.pair(b"c00001", b"b00001") is not None, "refreshed by the earlier load"
    assert repo.loads == loads == 2


class Unreachable(Repository):
    down = False

    async def get_names(self, category_ids: Sequence[str], brand_ids: Sequence[str]) -> Names:
        if self.down:
            lost = psycopg.OperationalError("server closed the connection unexpectedly")
            raise OperationalError("SELECT", None, lost)
        return await super().get_names(category_ids, brand_ids)


async def test_postgresql_unreachable_serves_an_expired_name_but_never_a_dropped_one(
    engine_for: AsyncEngine,
) -> None:
    clock, repo = Clock(), Unreachable(engine_for)
    table = NameTable(repo.get_names, TTL_MS, clock)
    before = await table.fragments([C, b"c00002"], [b"b00001"])
    clock.advance_ms(TTL_MS * 3)
    repo.down = True
    stale = Delta("catalog_stale_names_served_total")
    assert await table.fragments([C], [b"b00001"]) == (
        {C: before[0][C]},
        {b"b00001": before[1][b"b00001"]},
    )
    assert stale() == 2
    table.drop(b"c:c00002")
    with pytest.raises(OperationalError):
        await table.fragments([b"c00002"], [])


async def test_every_subscription_drops_every_name_and_messages_drop_theirs(
    engine_for: AsyncEngine, settings: Settings, private_redis: RedisProcess
) -> None:
    """On a Redis of this test's own: it kills every pub/sub connection there."""
    keys = Keys(settings.key_namespace)
    redis_client = create_redis(settings.replace(redis_url=private_redis.url), socket_timeout=5)
    table = NameTable(Repository(engine_for).get_names, TTL_MS, Clock())
    await table.fragments([C, b"c00002"], [b"b00001"])
    assert len(table) == 3
    follow = asyncio.create_task(table.follow(redis_client, keys.names_channel))
    try:

        async def subscribed() -> bool:
            return table.epoch >= 1

        await eventually(subscribed, what="the subscription")
        assert len(table) == 0, "subscribing dropped what was loaded before it"
        await table.fragments([C, b"c00002"], [b"b00001"])
        broadcasts = Delta("catalog_name_broadcasts_total")
        await redis_client.publish(keys.names_channel, "c:" + C.decode())

        async def delivered() -> bool:
            return broadcasts() == 1

        await eventually(delivered, what="the message")
        assert len(table) == 2 and table.pair(b"c00002", b"b00001") is not None

        epoch = table.epoch
        await redis_client.client_kill_filter(_type="pubsub")

        async def resubscribed() -> bool:
            return table.epoch >= epoch + 2  # dropped when lost, and again when subscribed

        await eventually(resubscribed, what="the re-subscription")
        assert len(table) == 0
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        await redis_client.aclose()
