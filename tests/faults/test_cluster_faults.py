"""The stream side on a 6-node Redis Cluster (3 primaries, a replica each) while it fails over
and while hot slots move.

* A primary (the stream's) is killed while outbox rows are relayed and consumed, with
  ``CATALOG_REDIS_WAIT_REPLICAS=1``: until the killed node is back as the new primary's replica
  nothing on that shard can be acked, and at the end every event was applied, every
  invalidation write survived, nothing is pending and nothing was dead-lettered.
* The ``{views}`` slot and the stream's slot are moved with ``redis-cli --cluster reshard``
  while events are published, views recorded and flushed, and the stream consumed: no caller
  sees an error (MOVED, ASK, TRYAGAIN and CROSSSLOT are all handled below them).
* A WAIT for replicas still succeeds while a primary's lowest slot (the one redis-cli moves
  first) is being migrated.

The consumers apply an event by writing a marker key per product (its own slot), as in
tests/invalidator/test_group.py: the cached format is not what is tested here. Faults are
lined up with the system's own signals (counts, metrics, the cluster's state), not sleeps."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from redis.crc import key_slot
from sqlalchemy.ext.asyncio import AsyncEngine

from core.cache.store import CacheStore
from core.events import PRODUCT_UPDATED, new_event, to_fields
from core.keys import Keys
from core.outbox import outbox
from core.publisher import Publisher
from core.redisclient import RedisClient, ReplicaWait, connect, mget
from core.settings import Settings
from devtools.rediscluster import RedisCluster as ClusterLauncher
from invalidator.deadletter import list_dead_letters
from invalidator.outbox import OutboxRelay
from invalidator.settings import InvalidatorSettings
from invalidator.viewflush import ViewFlusher
from invalidator.worker import redis_clients
from service.views import ViewCounter
from tests.faults.conftest import Load, drained, settings_on, unsent
from tests.helpers import Delta, eventually
from tests.invalidator.conftest import FAST
from tests.invalidator.test_group import Recording, marker

pytestmark = [pytest.mark.fault, pytest.mark.slow]
VIEWS_SLOT = key_slot(b"views")


@dataclass
class Group:
    """In-process Recording consumers, each with its own clients; stopped at teardown."""

    settings: Settings
    isettings: InvalidatorSettings
    running: list[tuple[Recording, asyncio.Task[bool], tuple[RedisClient, RedisClient]]] = field(
        default_factory=list
    )

    def start(self, name: str) -> Recording:
        redis, reader = redis_clients(self.settings, self.isettings)
        keys = self.isettings.keys(self.settings)
        store = CacheStore(redis, keys, lease_ttl_ms=5000, tag_margin_ms=60_000)
        wait = ReplicaWait.from_settings(self.settings, keys)
        consumer = Recording(redis, reader, store, keys, self.isettings, name, wait)
        self.running.append((consumer, asyncio.create_task(consumer.serve()), (redis, reader)))
        return consumer

    def applied(self) -> list[str]:
        return [pid for consumer, _, _ in self.running for pid in consumer.applied]

    async def stop(self) -> None:
        for consumer, _, _ in self.running:
            consumer.stop()
        for _, task, clients in self.running:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
            for client in clients:
                await client.aclose()
        self.running.clear()


@pytest.fixture
async def group_for() -> AsyncIterator[Callable[[Settings], Group]]:
    made: list[Group] = []

    def make(settings: Settings) -> Group:
        made.append(Group(settings, InvalidatorSettings.from_env({}, **FAST)))
        return made[-1]

    yield make
    for group in made:
        await group.stop()


async def test_a_killed_primary_loses_no_event_with_wait_for_one_replica(
    cluster6: ClusterLauncher, db: AsyncEngine, fresh_database_url: str, group_for: Any
) -> None:
    settings = settings_on(cluster6, fresh_database_url)
    group: Group = group_for(settings)
    keys = group.isettings.keys(settings)
    redis = connect(settings, socket_timeout=5.0)
    wait = ReplicaWait.from_settings(settings, keys)
    relay = OutboxRelay(
        db,
        Publisher(redis, keys, maxlen=100_000, replicas=wait),
        batch_size=50,
        poll_s=0.05,
        retention_s=3600,
    )
    stop_relay = asyncio.Event()
    relaying = asyncio.create_task(relay.run(stop_relay))
    for name in ("a", "b"):
        group.start(name)
    written: list[str] = []

    async def write(n: int) -> None:  # a writer committing one event per transaction
        product_id = f"f{n:05d}"
        async with db.begin() as conn:
            fields = to_fields(new_event(PRODUCT_UPDATED, product_id=product_id))
            await conn.execute(sa.insert(outbox).values(fields=fields))
        written.append(product_id)

    writer = Load(write).start()
    relay_short = Delta("catalog_replica_wait_short_total", by="relay")
    try:
        await eventually(lambda: _true(len(set(group.applied())) >= 100), 60, "100 applied")
        victim = cluster6.owner(key_slot(keys.stream.encode()))
        promoted = await asyncio.to_thread(cluster6.fail_over, victim)
        # The promoted primary has no replica yet: its shard's writes cannot be WAITed for.
        await eventually(lambda: _true(relay_short() >= 1), 60, "a relay pass short of WAIT")
        at_restart = len(written)
        await asyncio.to_thread(cluster6.restart, victim)
        await eventually(lambda: _true(len(written) >= at_restart + 100), 60, "100 more rows")
        await writer.stop()
        assert writer.errors == []

        async def settled() -> bool:
            return (
                await unsent(db) == 0
                and set(group.applied()) >= set(written)
                and await drained(redis, keys)
            )

        await eventually(settled, 120, "every row relayed, applied and acked")
    finally:
        with contextlib.suppress(Exception):
            await writer.stop()
        stop_relay.set()
        await relaying
    applied = Counter(group.applied())
    await group.stop()
    assert victim != promoted
    assert cluster6.owner(key_slot(keys.stream.encode())) == promoted
    assert applied.keys() == set(written)  # each at least once, none invented
    present = await mget(redis, [marker(keys, pid) for pid in written])
    assert present.count(None) == 0, "an acked invalidation write was lost in the failover"
    assert await list_dead_letters(redis, keys) == []
    await redis.aclose()


async def test_moving_hot_slots_under_load_shows_callers_no_redirect(
    cluster6: ClusterLauncher, db: AsyncEngine, fresh_database_url: str, group_for: Any
) -> None:
    lowest = {min(cluster6.slots_of(p)): p for p in cluster6.primaries()}
    namespace = next(
        ns
        for ns in (f"r{n}" for n in range(1_000_000))
        if key_slot(f"{ns}:events".encode()) in lowest
        and lowest[key_slot(f"{ns}:events".encode())] != cluster6.owner(VIEWS_SLOT)
    )
    settings = settings_on(cluster6, fresh_database_url, namespace).replace(redis_wait_replicas=0)
    group: Group = group_for(settings)
    keys = group.isettings.keys(settings)
    redis = connect(settings, socket_timeout=5.0)
    publisher = Publisher(redis, keys, maxlen=100_000)
    counter = ViewCounter(redis, keys, 100_000)
    flusher = ViewFlusher(redis, db, keys, interval_s=3600)
    for name in ("a", "b"):
        group.start(name)
    published: list[str] = []
    viewed: Counter[str] = Counter()
    flushed = Counter[str]()

    async def publish(n: int) -> None:
        await publisher.publish_product_updated(f"h{n:05d}")
        published.append(f"h{n:05d}")

    async def view(n: int) -> None:
        ids = [f"p{(n * 7 + k) % 300 + 1:07d}" for k in range(5)]
        await counter.record(ids)
        viewed.update(ids)

    async def flush(n: int) -> None:
        flushed["views"] += (await flusher.flush_once()).views
        await asyncio.sleep(0.05)

    loads = [Load(publish).start(), Load(view).start(), Load(flush).start()]
    stream_slot = key_slot(keys.stream.encode())
    try:
        await eventually(lambda: _true(min(load.done for load in loads) >= 20), 60, "load")
        # {views} goes to the third primary (not the stream's: the stream's slot is its
        # owner's lowest, so that move takes exactly one slot), the stream to {views}' old one.
        views_from, stream_from = cluster6.owner(VIEWS_SLOT), cluster6.owner(stream_slot)
        views_to = next(p for p in cluster6.primaries() if p not in (views_from, stream_from))
        await asyncio.to_thread(cluster6.reshard_slot, VIEWS_SLOT, views_to)
        stream_to = views_from
        await asyncio.to_thread(cluster6.reshard_slot, stream_slot, stream_to)
        marks = [load.done for load in loads]
        await eventually(
            lambda: _true(all(load.done >= m + 20 for load, m in zip(loads, marks, strict=True))),
            60,
            "load after the moves",
        )
    finally:
        for load in loads:
            await load.stop()
    assert [load.errors for load in loads] == [[], [], []]
    assert (cluster6.owner(VIEWS_SLOT), cluster6.owner(stream_slot)) == (views_to, stream_to)

    flushed["views"] += (await flusher.flush_once()).views
    async with db.connect() as conn:
        rows = await conn.execute(sa.text("SELECT product_id, views FROM product_stats"))
        totals = {r.product_id: int(r.views) for r in rows}
    assert totals == dict(viewed) and flushed["views"] == sum(viewed.values())

    async def applied() -> bool:
        return set(group.applied()) >= set(published) and await drained(redis, keys)

    await eventually(applied, 60, "every published event applied and acked")
    assert await list_dead_letters(redis, keys) == []
    await group.stop()
    await redis.aclose()


async def _true(value: bool) -> bool:
    return value


async def test_wait_for_replicas_is_not_refused_while_a_primary_migrates_its_lowest_slot(
    cluster6: ClusterLauncher, database_url: str
) -> None:
    """``redis-cli --cluster reshard`` (and ``rebalance``) move a source's lowest slots first:
    a WAIT whose fence key is in a slot being migrated, and not (or no longer) on the source,
    meets ASK for the whole move, and nothing can be acked."""
    settings = settings_on(cluster6, database_url)
    redis = connect(settings, socket_timeout=5.0)
    synced = ReplicaWait.from_settings(settings, Keys("synced"))
    await eventually(lambda: synced(redis), 30, "every primary's replica in sync")
    source, target = sorted(cluster6.primaries())[:2]
    slot = str(cluster6.slots_of(source)[0])
    cluster6.cli("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster6.node_id(source), port=target)
    cluster6.cli("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster6.node_id(target), port=source)
    try:  # a namespace of its own: its fence keys exist nowhere yet
        wait = ReplicaWait.from_settings(settings, Keys(settings.key_namespace))
        assert await wait(redis) is True
    finally:
        for port in (source, target):
            cluster6.cli("CLUSTER", "SETSLOT", slot, "STABLE", port=port)
        await redis.aclose()
