"""RecordProductViews over gRPC, against an in-process server whose Redis is a private
redis-server, so its INFO counters see nothing but this test's traffic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio
from redis.asyncio import Redis

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.keys import Keys
from core.settings import Settings
from devtools.localservers import RedisProcess
from service.app import Service, start
from tests.helpers import Delta, writer_channel

if TYPE_CHECKING:
    from catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub as Stub

STATS = ("total_commands_processed", "total_reads_processed", "total_writes_processed")


@pytest.fixture
async def views_service(settings: Settings, private_redis: RedisProcess) -> AsyncIterator[Service]:
    svc = await start(settings.replace(grpc_address="127.0.0.1:0", redis_url=private_redis.url))
    yield svc
    await svc.stop(grace=0)


@pytest.fixture
async def views_stub(views_service: Service) -> AsyncIterator[Stub]:
    async with writer_channel(f"127.0.0.1:{views_service.port}") as channel:
        yield catalog_pb2_grpc.CatalogServiceStub(channel)


@pytest.fixture
async def probe(private_redis: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(private_redis.url)
    await client.ping()  # connect now, so its handshake is not counted later
    yield client
    await client.aclose()


async def counts(redis: Redis, keys: Keys) -> dict[str, int]:
    pending = await redis.hgetall(keys.views_pending)
    return {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in pending.items()}


async def server_stats(redis: Redis) -> tuple[dict[str, int], dict[str, int]]:
    """(INFO stats counters, calls per command). The INFO call itself is one command."""
    info: dict[str, Any] = await redis.info("all")
    calls = {
        k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items() if "cmdstat_" in k
    }
    return {k: int(info[k]) for k in STATS}, calls


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def record(*ids: str) -> pb.RecordProductViewsRequest:
    return pb.RecordProductViewsRequest(product_ids=list(ids))


async def test_each_occurrence_is_one_view_and_is_counted_in_redis(
    views_stub: Stub, probe: Redis, settings: Settings
) -> None:
    recorded = Delta("catalog_views_recorded_total")
    reply = await views_stub.RecordProductViews(record("p0000001", "p0000002", "p0000001"))
    assert reply.recorded == 3
    reply = await views_stub.RecordProductViews(record("p0000002"))
    assert reply.recorded == 1
    assert await counts(probe, Keys(settings.key_namespace)) == {"p0000001": 2, "p0000002": 2}
    assert recorded() == 4


async def test_a_call_is_one_round_trip_to_redis(views_stub: Stub, probe: Redis) -> None:
    await views_stub.RecordProductViews(record("warm-up"))  # the pool connects once, before
    stats, calls = await server_stats(probe)
    await views_stub.RecordProductViews(record("a", "b", "a", "c"))
    stats2, calls2 = await server_stats(probe)
    # One request read and one reply written for the RPC, one of each for our INFO. (Commands
    # a script runs count too: the EVALSHA, 3 HEXISTS, 1 HLEN and 3 HINCRBY.)
    assert moved(stats, stats2) == {
        "total_commands_processed": 9,
        "total_reads_processed": 2,
        "total_writes_processed": 2,
    }
    assert moved(calls, calls2) == {"evalsha": 1, "hexists": 3, "hlen": 1, "hincrby": 3, "info": 1}

    ids = [f"p{i:07d}" for i in range(1, 1001)]  # the largest batch: still one script
    stats, calls = await server_stats(probe)
    reply = await views_stub.RecordProductViews(record(*ids))
    _, calls2 = await server_stats(probe)
    assert reply.recorded == 1000
    assert moved(calls, calls2) == {
        "evalsha": 1,
        "hexists": 1000,
        "hlen": 1,
        "hincrby": 1000,
        "info": 1,
    }


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([], "at least one"),
        (["p1"] * 1001, "at most 1000"),
        (["p1", ""], "product_ids[1] is required"),
        (["p1", "x" * 65], "longer than 64"),
        (["a:b"], "only letters"),
        (["{p}"], "only letters"),
    ],
)
async def test_malformed_batch_is_invalid_argument_before_any_io(
    views_stub: Stub, probe: Redis, ids: list[str], message: str
) -> None:
    await views_stub.RecordProductViews(record("warm-up"))
    _, calls = await server_stats(probe)
    with pytest.raises(aio.AioRpcError) as err:
        await views_stub.RecordProductViews(record(*ids))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    _, calls2 = await server_stats(probe)
    assert moved(calls, calls2) == {"info": 1}


async def test_redis_down_is_unavailable(
    views_stub: Stub, private_redis: RedisProcess, settings: Settings
) -> None:
    await views_stub.RecordProductViews(record("p0000001"))
    private_redis.stop()
    recorded = Delta("catalog_views_recorded_total")
    with pytest.raises(aio.AioRpcError) as err:
        await views_stub.RecordProductViews(record("p0000001"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert recorded() == 0
    private_redis.start()  # an empty Redis: counting resumes without a restart of the service
    reply = await views_stub.RecordProductViews(record("p0000001"))
    assert reply.recorded == 1
    async with Redis.from_url(private_redis.url) as redis:
        assert await counts(redis, Keys(settings.key_namespace)) == {"p0000001": 1}


async def test_a_flood_of_unknown_ids_is_capped_and_gone_after_the_flush(
    settings: Settings, private_redis: RedisProcess, fresh_database_url: str
) -> None:
    """Calls of 1000 distinct unknown ids each: the pending hash stops at its cap and further
    new ids get RESOURCE_EXHAUSTED (the whole call refused); ids already pending still count.
    The flush drops the unknown ids: nothing of the flood is left in Redis."""
    from core.db import create_engine
    from invalidator.viewflush import ViewFlusher

    cap = 5000
    own = settings.replace(
        grpc_address="127.0.0.1:0",
        redis_url=private_redis.url,
        database_url=fresh_database_url,
        views_max_pending=cap,
    )
    keys = Keys(own.key_namespace)
    svc = await start(own)
    refused = Delta("catalog_views_refused_total")
    try:
        async with (
            writer_channel(f"127.0.0.1:{svc.port}") as channel,
            Redis.from_url(private_redis.url) as redis,
        ):
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            await stub.RecordProductViews(record("p0000001"))
            used_before = int((await redis.info("memory"))["used_memory"])
            codes = []
            for call in range(20):
                ids = [f"flood-{call}-{n}" for n in range(1000)]
                try:
                    await stub.RecordProductViews(record(*ids))
                    codes.append(grpc.StatusCode.OK)
                except aio.AioRpcError as exc:
                    codes.append(exc.code())
            pending = await redis.hlen(keys.views_pending)
            used_after = int((await redis.info("memory"))["used_memory"])
            print(
                f"\npending hash at its cap: {pending} ids, Redis used_memory "
                f"+{(used_after - used_before) / 1e6:.2f} MB"
            )
            assert pending <= cap
            assert codes.count(grpc.StatusCode.OK) == 4  # the first id + 4000 fill it to 4001
            assert set(codes[4:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert refused() == 16 * 1000
            assert (await stub.RecordProductViews(record("p0000001"))).recorded == 1, (
                "an id already pending still counts"
            )

            engine = create_engine(own)
            try:
                flusher = ViewFlusher(redis, engine, keys, interval_s=3600)
                done = await flusher.flush_once()
            finally:
                await engine.dispose()
            assert (done.views, done.dropped) == (2, 4000)
            assert [k async for k in redis.scan_iter(match=f"{own.key_namespace}:{{views}}*")] == []
            await stub.RecordProductViews(record(*[f"after-{n}" for n in range(1000)]))
    finally:
        await svc.stop(grace=0)
