"""RecordProductViews over gRPC, against an in-process server whose Redis is private (a
redis-server of the test's own, or a 3-primary Redis Cluster of this module's own), so its INFO
counters, summed over the primaries, see nothing but this test's traffic. Runs on both
topologies."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio
from redis.asyncio import Redis

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.keys import Keys
from core.redisclient import RedisClient, connect, keys_in_namespace
from core.settings import Settings
from devtools.localservers import RedisProcess
from devtools.rediscluster import RedisCluster
from service.app import Service, start
from tests.conftest import Topology
from tests.helpers import Delta, delete_namespace, standalone_only, writer_channel

if TYPE_CHECKING:
    from catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub as Stub

STATS = ("total_commands_processed", "total_reads_processed", "total_writes_processed")


@pytest.fixture(scope="module")
def private_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with RedisCluster(tmp_path_factory.mktemp("viewscluster"), primaries=3) as cluster:
        yield cluster


@dataclass(frozen=True)
class Private:
    """The test's private Redis: the settings that reach it, and the URL of every primary."""

    settings: Settings
    primaries: list[str]


@pytest.fixture
def private(
    settings: Settings, redis_topology: Topology, request: pytest.FixtureRequest
) -> Private:
    """``settings`` on a private Redis of ``redis_topology``'s mode."""
    if redis_topology.mode == "cluster":
        cluster: RedisCluster = request.getfixturevalue("private_cluster")
        url, primaries = cluster.url, [cluster.node(p).url for p in cluster.primaries()]
    else:
        server: RedisProcess = request.getfixturevalue("private_redis")
        url, primaries = server.url, [server.url]
    return Private(settings.replace(redis_url=url, redis_mode=redis_topology.mode), primaries)


@pytest.fixture
async def views_service(private: Private) -> AsyncIterator[Service]:
    svc = await start(private.settings.replace(grpc_address="127.0.0.1:0"))
    yield svc
    await svc.stop(grace=0)


@pytest.fixture
async def views_stub(views_service: Service) -> AsyncIterator[Stub]:
    async with writer_channel(f"127.0.0.1:{views_service.port}") as channel:
        yield catalog_pb2_grpc.CatalogServiceStub(channel)


@dataclass
class Probe:
    """A client of the private Redis (``client``, of its topology) and one plain client per
    primary (``nodes``), to read INFO where the commands ran."""

    client: RedisClient
    nodes: list[Redis]


@pytest.fixture
async def probe(private: Private) -> AsyncIterator[Probe]:
    client = connect(private.settings, socket_timeout=5.0)
    nodes = [Redis.from_url(url) for url in private.primaries]
    for node in nodes:
        await node.ping()  # connect now, so its handshake is not counted later
    yield Probe(client, nodes)
    await delete_namespace(client, private.settings.key_namespace)  # the cluster outlives us
    await client.aclose()
    for node in nodes:
        await node.aclose()


async def counts(redis: RedisClient, keys: Keys) -> dict[str, int]:
    pending = await redis.hgetall(keys.views_pending)
    return {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in pending.items()}


async def server_stats(probe: Probe) -> tuple[dict[str, int], dict[str, int]]:
    """(INFO stats counters, calls per command), each summed over the primaries. The INFO call
    itself is one command on each primary."""
    stats: dict[str, int] = dict.fromkeys(STATS, 0)
    calls: dict[str, int] = {}
    for node in probe.nodes:
        info: dict[str, Any] = await node.info("all")
        for k in STATS:
            stats[k] += int(info[k])
        for k, v in info.items():
            if "cmdstat_" in k:
                name = k.removeprefix("cmdstat_")
                calls[name] = calls.get(name, 0) + int(v["calls"])
    return stats, calls


async def used_memory(probe: Probe) -> int:
    """Redis ``used_memory``, summed over the primaries."""
    return sum([int((await node.info("memory"))["used_memory"]) for node in probe.nodes])


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def record(*ids: str) -> pb.RecordProductViewsRequest:
    return pb.RecordProductViewsRequest(product_ids=list(ids))


async def test_each_occurrence_is_one_view_and_is_counted_in_redis(
    views_stub: Stub, probe: Probe, settings: Settings
) -> None:
    recorded = Delta("catalog_views_recorded_total")
    reply = await views_stub.RecordProductViews(record("p0000001", "p0000002", "p0000001"))
    assert reply.recorded == 3
    reply = await views_stub.RecordProductViews(record("p0000002"))
    assert reply.recorded == 1
    assert await counts(probe.client, Keys(settings.key_namespace)) == {
        "p0000001": 2,
        "p0000002": 2,
    }
    assert recorded() == 4


async def test_a_call_is_one_round_trip_to_redis(views_stub: Stub, probe: Probe) -> None:
    await views_stub.RecordProductViews(record("warm-up"))  # the pool connects once, before
    infos = len(probe.nodes)  # our INFO, one per primary
    stats, calls = await server_stats(probe)
    await views_stub.RecordProductViews(record("a", "b", "a", "c"))
    stats2, calls2 = await server_stats(probe)
    # One request read and one reply written for the RPC (every counter is in the {views} slot,
    # so on a cluster too), one of each per INFO. (Commands a script runs count too: the
    # EVALSHA, 3 HEXISTS, 1 HLEN and 3 HINCRBY.)
    assert moved(stats, stats2) == {
        "total_commands_processed": 8 + infos,
        "total_reads_processed": 1 + infos,
        "total_writes_processed": 1 + infos,
    }
    assert moved(calls, calls2) == {
        "evalsha": 1,
        "hexists": 3,
        "hlen": 1,
        "hincrby": 3,
        "info": infos,
    }

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
        "info": infos,
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
    views_stub: Stub, probe: Probe, ids: list[str], message: str
) -> None:
    await views_stub.RecordProductViews(record("warm-up"))
    _, calls = await server_stats(probe)
    with pytest.raises(aio.AioRpcError) as err:
        await views_stub.RecordProductViews(record(*ids))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    _, calls2 = await server_stats(probe)
    assert moved(calls, calls2) == {"info": len(probe.nodes)}


@standalone_only  # stops and restarts a Redis of its own (tests/faults cover a cluster's nodes)
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
    private: Private, probe: Probe, fresh_database_url: str
) -> None:
    """Calls of 1000 distinct unknown ids each: the pending hash stops at its cap and further
    new ids get RESOURCE_EXHAUSTED (the whole call refused); ids already pending still count.
    The flush drops the unknown ids: nothing of the flood is left in Redis."""
    from core.db import create_engine
    from invalidator.viewflush import ViewFlusher

    cap = 5000
    own = private.settings.replace(
        grpc_address="127.0.0.1:0",
        database_url=fresh_database_url,
        views_max_pending=cap,
    )
    keys = Keys(own.key_namespace)
    svc = await start(own)
    refused = Delta("catalog_views_refused_total")
    try:
        redis = probe.client
        async with writer_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            await stub.RecordProductViews(record("p0000001"))
            used_before = await used_memory(probe)
            codes = []
            for call in range(20):
                ids = [f"flood-{call}-{n}" for n in range(1000)]
                try:
                    await stub.RecordProductViews(record(*ids))
                    codes.append(grpc.StatusCode.OK)
                except aio.AioRpcError as exc:
                    codes.append(exc.code())
            pending = await redis.hlen(keys.views_pending)
            used_after = await used_memory(probe)
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
            left = keys_in_namespace(redis, f"{own.key_namespace}:{{views}}*")
            assert [k async for k in left] == []
            await stub.RecordProductViews(record(*[f"after-{n}" for n in range(1000)]))
    finally:
        await svc.stop(grace=0)
