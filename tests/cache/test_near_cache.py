"""The near cache in a running service, on one Redis and on a Redis Cluster: what it serves,
what makes it drop an entry, and the watermark's promise, checked exactly.

The promise (core/cache/near.py): while the near cache holds a key, its watermark is older than
the completion of every change of that key it has not applied. So after a change completes at
``t``, once the watermark has passed ``t`` the old value is gone. The tests wait for that
instant through the system's own signal (the watermark), never a sleep. The failure modes of
the channel are in tests/faults/."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from catalog.v1 import catalog_pb2 as pb
from core.cache import entry
from core.cache.near import NearCache
from core.keys import Keys
from core.redisclient import RedisClient
from core.settings import Settings
from service.app import Service, start
from tests.helpers import Delta, eventually

P, Q, R = "p0000011", "p0000012", "p0000013"


@pytest.fixture
def settings(topo_settings: Settings, fresh_database_url: str) -> Settings:
    """Both topologies; a database of its own (a test updates products)."""
    return topo_settings.replace(
        near_cache_enabled=True, grpc_address="127.0.0.1:0", database_url=fresh_database_url
    )


@pytest.fixture
async def svc(settings: Settings, redis_client: RedisClient) -> AsyncIterator[Service]:
    service = await start(settings)
    assert service.tracking is not None
    near = near_of(service)
    await eventually(lambda: _true(near.serving()), 10, "the near cache to serve")
    yield service
    await service.stop(grace=0)


def near_of(service: Service) -> NearCache:
    near = service.reader.near
    assert near is not None
    return near


async def _true(value: bool) -> bool:
    return value


async def held(service: Service, product_id: str) -> bytes:
    """Read ``product_id`` until the near cache holds it (a fill voided by the invalidation of
    its own Redis fill is offered again by the next read); its served bytes."""
    near, key = near_of(service), service.reader.keys.product(product_id)

    async def in_near() -> bool:
        await service.reader.get_product(product_id)
        return key in near._entries

    await eventually(in_near, 10, f"{product_id} in the near cache")
    served = await service.reader.get_product(product_id)
    assert served is not None
    return served


async def watermark_passes(near: NearCache, instant: float) -> None:
    """Until every change completed before ``instant`` has been applied. (Each look is a
    lookup too: the channel beats only while lookups come.)"""

    async def passed() -> bool:
        near.get("a lookup")
        return near.watermark > instant

    await eventually(passed, 10, "the watermark to pass")


async def test_a_hit_costs_no_redis_request(svc: Service, redis_client: RedisClient) -> None:
    served = await held(svc, P)
    near_hits = Delta("catalog_near_cache_requests_total", result="hit")
    redis_hits = Delta("catalog_cache_requests_total", op="get", result="hit")
    for _ in range(5):
        assert await svc.reader.get_product(P) == served
    assert (near_hits(), redis_hits()) == (5, 0)
    assert pb.Product.FromString(served).id == P


async def test_every_kind_of_change_in_redis_drops_the_entry(
    svc: Service, redis_client: RedisClient
) -> None:
    near, keys = near_of(svc), svc.reader.keys
    # Deleted (an invalidation), overwritten (a write-through or a fill), expired.
    changes: dict[str, Callable[[str], Awaitable[object]]] = {
        P: lambda key: redis_client.delete(key),
        Q: lambda key: redis_client.set(key, b"garbage-but-a-change"),
        R: lambda key: redis_client.pexpire(key, 1),
    }
    for product_id in changes:
        await held(svc, product_id)
    for product_id, change in changes.items():
        key = keys.product(product_id)
        assert key in near._entries
        await change(key)
        done = time.monotonic()
        if product_id == R:  # expired only once Redis notices: wait until it has

            async def expired(k: str = key) -> bool:
                return not await redis_client.exists(k)

            await eventually(expired, 10, "the key to expire")
            done = time.monotonic()
        await watermark_passes(near, done)
        assert near.get(key) is None, f"{product_id}: a change the watermark passed is applied"
    invalidations = Delta("catalog_near_cache_invalidations_total")
    await redis_client.set(keys.product("never-held"), b"x", px=1000)
    await watermark_passes(near, time.monotonic())
    assert invalidations() == 1, "a change of any product key is reported, held or not"


async def test_a_racing_change_never_leaves_the_older_value(
    svc: Service, redis_client: RedisClient
) -> None:
    """A read whose Redis GET returned the old bytes, and a change that lands before the read
    offers them: the near cache refuses them (the ticket was voided)."""
    near, key = near_of(svc), svc.reader.keys.product(P)
    await svc.reader.get_product(P)  # cached in Redis
    old = await redis_client.get(key)
    assert isinstance(old, bytes) and old
    ticket = near.ticket(key)
    await redis_client.delete(key)
    await watermark_passes(near, time.monotonic())
    assert not near.put(key, old, ticket)
    assert key not in near._entries


async def test_versions_in_the_near_cache_never_go_backwards(svc: Service) -> None:
    near, key = near_of(svc), svc.reader.keys.product(P)
    await held(svc, P)
    current = entry.header(near._entries[key].raw).version
    older = entry.pack(b"c\nb\nold", current - 1, 10**14, 1)
    assert not near.put(key, older, near.ticket(key))
    assert entry.header(near._entries[key].raw).version == current


async def test_batch_reads_take_what_the_near_cache_holds_and_fetch_the_rest(
    svc: Service, redis_client: RedisClient
) -> None:
    await held(svc, P)
    await svc.reader.batch_get([Q, R])  # cached in Redis, not (necessarily) in the near cache
    near_hits = Delta("catalog_near_cache_requests_total", result="hit")
    values = await svc.reader.batch_get([P, Q, R, P])
    assert [pb.Product.FromString(v).id for v in values if v] == [P, Q, R, P]
    assert near_hits() == 1, "P once (the batch reads unique ids), Q and R from Redis"


async def test_heartbeats_of_other_processes_change_nothing(
    svc: Service, redis_client: RedisClient, settings: Settings
) -> None:
    """Another process's heartbeat key is not this one's: no entry dropped, no watermark moved
    by it. (A flush empties the near cache: tests/faults, on a private Redis.)"""
    near = near_of(svc)
    await held(svc, P)
    other = Keys(settings.key_namespace).heartbeat_prefix("someone-else") + "{0}:1"
    await redis_client.set(other, b"1", px=1000)
    await watermark_passes(near, time.monotonic())
    assert svc.reader.keys.product(P) in near._entries


async def test_the_service_serves_near_hits_over_grpc(svc: Service) -> None:
    from catalog.v1 import catalog_pb2_grpc
    from tests.helpers import writer_channel

    await held(svc, P)
    near_hits = Delta("catalog_near_cache_requests_total", result="hit")
    async with writer_channel(f"127.0.0.1:{svc.port}") as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        got = await stub.GetProduct(pb.GetProductRequest(id=P))
    assert got.id == P and got.category.name and got.brand.name, "names appended on a near hit"
    assert near_hits() == 1


async def test_an_update_is_read_back_by_its_own_process_at_once(
    svc: Service, redis_client: RedisClient
) -> None:
    """UpdateProduct returns only once this process's near cache has dropped the older entry:
    the next read here sees the write without waiting for the channel. The channel is made
    slower than the reply: its invalidations are held back (heartbeats still pass), as on a
    busy loop, and only the writer's own drop can make the read fresh."""
    from google.protobuf import field_mask_pb2

    from catalog.v1 import catalog_pb2_grpc
    from tests.helpers import writer_channel

    assert svc.tracking is not None
    svc.tracking.near = HeldBack(near_of(svc))  # type: ignore[assignment]
    await held(svc, P)
    async with writer_channel(f"127.0.0.1:{svc.port}") as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        for n in range(5):
            await held(svc, P)
            updated = await stub.UpdateProduct(
                pb.UpdateProductRequest(
                    product=pb.Product(id=P, name=f"Near {n}"),
                    update_mask=field_mask_pb2.FieldMask(paths=["name"]),
                )
            )
            got = await stub.GetProduct(pb.GetProductRequest(id=P))
            assert (got.name, got.version) == (f"Near {n}", updated.version)


class HeldBack:
    """A near cache as the channel sees it, with the channel's invalidations dropped (a test
    of the writer's own path; the writer holds the real one)."""

    def __init__(self, near: NearCache) -> None:
        self._near = near

    def invalidate(self, key: str) -> None:
        pass

    def __getattr__(self, name: str) -> object:
        return getattr(self._near, name)


async def test_an_idle_process_stops_beating_and_a_lookup_wakes_it(svc: Service) -> None:
    """No lookup for IDLE_S: the beats stop (nothing is refused meanwhile, so no time counts
    as suspended); the next lookups start them again and the near cache serves again."""
    near = near_of(svc)
    assert svc.tracking is not None
    await held(svc, P)
    await eventually(lambda: _true(near.idle), 10, "the channel to go idle")
    beats = [c.number for c in svc.tracking.channels]
    suspended = near.suspended_seconds()
    await asyncio.sleep(0.2)  # idle for a while: nothing may happen
    assert [c.number for c in svc.tracking.channels] == beats
    assert near.suspended_seconds() == suspended
    assert near.get(svc.reader.keys.product(P)) is None, "the watermark aged while idle"
    await eventually(lambda: _true(not near.idle and near.serving()), 10, "beats again")
    assert near.get(svc.reader.keys.product(P)) is not None, "entries were kept"


async def test_a_key_that_is_not_utf8_under_the_prefix_does_not_break_the_channel(
    svc: Service, redis_client: RedisClient
) -> None:
    near = near_of(svc)
    assert svc.tracking is not None
    await held(svc, P)
    sessions = svc.tracking.sessions
    await redis_client.set(svc.reader.keys.product_prefix.encode() + b"{\xff\xfe}", b"x", px=1000)
    await watermark_passes(near, time.monotonic())
    assert svc.tracking.sessions == sessions
    assert svc.reader.keys.product(P) in near._entries


async def test_the_next_beat_rides_on_the_first_lookup_after_it_is_due(svc: Service) -> None:
    """A serving process sends its next heartbeat from within a lookup, not from a timer of its
    own: a lookup before the beat is due sends nothing; the first one after sends it at once,
    on every node; the next lookups send nothing until that beat is back."""
    near, tracking = near_of(svc), svc.tracking
    assert tracking is not None
    channels = tracking.channels
    assert channels

    async def waiting() -> bool:  # every node's beat back, the next not sent yet
        return not any(c.in_flight for c in channels)

    await eventually(waiting, 10, "every beat back")
    beats = [c.number for c in channels]
    for channel in channels:
        channel.due_at = near._clock() + 3600  # not due for an hour
    tracking.schedule()
    near.get("a lookup")
    assert [c.number for c in channels] == beats, "a beat sent before it was due"
    for channel in channels:
        channel.due_at = near._clock()  # due now
    tracking.schedule()
    near.get("a lookup")  # no await in between: only the lookup can have sent them
    assert [c.number for c in channels] == [n + 1 for n in beats]
    assert all(c.in_flight for c in channels)
    near.get("a lookup")
    assert [c.number for c in channels] == [n + 1 for n in beats], "a second beat in flight"
    sessions = tracking.sessions
    await watermark_passes(near, time.monotonic())  # beats go on, in the same session
    assert tracking.sessions == sessions
