"""The near cache while a slot holding its entries moves to another primary (``redis-cli
--cluster reshard``), on a private 3-primary cluster.

The move deletes each key from its old node (``MIGRATE``), which that node reports: the held
entries are dropped. The cluster's config epoch moves, the next beat checks the primaries, and
since they are the same the session goes on (no reset). Entries read afterwards come from the
new owner, whose changes are reported too. Checked exactly with the watermark, no sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from core.cache.near import NearCache
from core.redisclient import connect
from core.settings import Settings
from devtools.rediscluster import RedisCluster
from service.app import Service, start
from tests.helpers import Delta, eventually, make_settings

pytestmark = [pytest.mark.fault, pytest.mark.slow]
IDS = [f"p{n:07d}" for n in range(1, 41)]


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with RedisCluster(Path(tmp_path_factory.mktemp("near-reshard")), primaries=3) as c:
        yield c


@pytest.fixture
async def svc(cluster3: RedisCluster, fresh_database_url: str) -> AsyncIterator[Service]:
    settings: Settings = make_settings(
        database_url=fresh_database_url,
        redis_url=cluster3.url,
        redis_mode="cluster",
        key_namespace="nr",
        near_cache_enabled=True,
        grpc_address="127.0.0.1:0",
        metrics_port=0,
    )
    service = await start(settings)
    yield service
    await service.stop(grace=0)


async def _true(value: bool) -> bool:
    return value


async def _passed(near: NearCache, instant: float) -> bool:
    """Is the watermark past ``instant``? (A lookup too: beats go only while lookups come.)"""
    near.get("a lookup")
    return near.watermark > instant


async def test_a_moved_slot_drops_its_entries_and_the_session_goes_on(
    svc: Service, cluster3: RedisCluster
) -> None:
    near = svc.reader.near
    assert isinstance(near, NearCache)
    assert svc.tracking is not None
    keys = svc.reader.keys
    await eventually(lambda: _true(near.serving()), 10, "the near cache to serve")

    async def all_held() -> bool:
        await svc.reader.batch_get(IDS)
        return all(keys.product(i) in near._entries for i in IDS)

    await eventually(all_held, 20, "every product in the near cache")
    # The product whose slot is its owner's lowest moves alone (redis-cli moves the lowest).
    slots = {i: key_slot(keys.product(i).encode()) for i in IDS}
    lowest = {min(cluster3.slots_of(p)): p for p in cluster3.primaries()}
    moved = [i for i in IDS if slots[i] in lowest] or [IDS[0]]
    slot = slots[moved[0]]
    source = cluster3.owner(slot)
    target = next(p for p in cluster3.primaries() if p != source)
    sessions = svc.tracking.sessions
    resets = Delta("catalog_near_cache_resets_total", reason="topology")

    await asyncio.to_thread(cluster3.reshard_slot, slot, target)
    done = time.monotonic()
    assert cluster3.owner(slot) == target
    await eventually(lambda: _passed(near, done), 20, "the watermark to pass the move")
    gone = [i for i in IDS if slots[i] == slot]
    assert all(keys.product(i) not in near._entries for i in gone), "MIGRATE is reported"
    kept = [i for i in IDS if slots[i] != slot]
    assert any(keys.product(i) in near._entries for i in kept), "other entries stay"
    assert (svc.tracking.sessions, resets()) == (sessions, 0), "same primaries: no reset"

    # Read again: now from the new owner; a change there is reported as well.
    key = keys.product(moved[0])

    async def held_again() -> bool:
        await svc.reader.get_product(moved[0])
        return key in near._entries

    await eventually(held_again, 20, "the moved product in the near cache again")
    client = connect(svc.settings, socket_timeout=5.0)
    try:
        await client.delete(key)
        deleted = time.monotonic()
    finally:
        await client.aclose()
    await eventually(lambda: _passed(near, deleted), 20, "the watermark to pass")
    assert key not in near._entries


async def test_a_beat_redirected_from_a_migrating_slot_moves_to_another_slot(
    svc: Service, cluster3: RedisCluster
) -> None:
    """Each beat is a new key, so once its slot is MIGRATING the node answers ASK: the channel
    beats in another slot of the same node and the session goes on."""
    near = svc.reader.near
    tracking = svc.tracking
    assert isinstance(near, NearCache)
    assert tracking is not None
    await eventually(lambda: _true(near.serving()), 10, "the near cache to serve")
    channel = tracking.channels[0]
    slot, port = channel.slot, int(channel.name.rsplit(":", 1)[1])
    target = next(p for p in cluster3.primaries() if p != port)
    sessions = tracking.sessions
    source_id, target_id = cluster3.node_id(port), cluster3.node_id(target)
    cluster3.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id, port=target)
    cluster3.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id, port=port)
    try:
        await eventually(lambda: _true(channel.slot != slot), 20, "the beat to change slots")
        moved = time.monotonic()
        await eventually(lambda: _passed(near, moved), 20, "beats in the new slot")
        assert tracking.sessions == sessions and tracking.channels[0] is channel
    finally:
        for node in (port, target):
            cluster3.cli("CLUSTER", "SETSLOT", str(slot), "STABLE", port=node)
