"""The service on a Redis Cluster (CATALOG_REDIS_MODE=cluster), called as operators call it.

Reads are answered (through the cache) and views are counted in the cluster: the client the
service builds, its pool gauges and the view counter's script. The cache's invalidation on a
cluster, end to end: tests/test_end_to_end.py. A GetProduct hit costs one GET."""

from __future__ import annotations

import uuid
from collections import Counter

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.clusterclient import Cluster
from core.keys import Keys
from core.redisclient import connect
from core.settings import Settings
from devtools.rediscluster import NOT_DATA
from service.app import start
from tests.helpers import (
    WRITE_TOKEN,
    Delta,
    delete_namespace,
    make_settings,
    metric,
    writer_channel,
)
from tests.test_call import catalog_call

HITS = 50


def cluster_settings(redis_cluster_url: str, database_url: str) -> Settings:
    return make_settings(
        database_url=database_url,
        redis_url=redis_cluster_url,
        redis_mode="cluster",
        key_namespace=f"t{uuid.uuid4().hex[:10]}",
        metrics_port=0,
        grpc_address="127.0.0.1:0",
    )


async def commandstats(client: Cluster) -> Counter[str]:
    """Calls per command (``INFO commandstats``), summed over every primary."""
    await client.ready()
    calls: Counter[str] = Counter()
    for node in client.get_primaries():
        stats = await client.node_client(node).info("commandstats")
        for name, fields in stats.items():
            calls[name.removeprefix("cmdstat_")] += int(fields["calls"])
    return calls


async def test_the_service_on_a_cluster_answers_and_counts_views(
    redis_cluster_url: str, database_url: str
) -> None:
    settings = cluster_settings(redis_cluster_url, database_url)
    service = await start(settings)
    client = connect(settings, socket_timeout=5.0)
    target = ("--target", f"127.0.0.1:{service.port}")
    try:
        got = await catalog_call("GetProduct", '{"id": "p0000001"}', *target)
        assert (got.code, got.json()["id"]) == (0, "p0000001")
        views = '{"productIds": ["p0000001", "p0000002", "p0000001"]}'
        auth = ("-H", f"authorization: Bearer {WRITE_TOKEN}")
        recorded = await catalog_call(*auth, "RecordProductViews", views, *target)
        assert recorded.code == 0, recorded.err
        pending = await client.hgetall(Keys(settings.key_namespace).views_pending)
        assert pending == {b"p0000001": b"2", b"p0000002": b"1"}
        health = await catalog_call("grpc.health.v1.Health/Check", *target)
        assert health.json() == {"status": "SERVING"}
        assert metric("catalog_redis_pool_connections", state="max") > 0
    finally:
        await service.stop(grace=0)
        await delete_namespace(client, settings.key_namespace)
        await client.aclose()


async def test_a_get_product_hit_on_a_cluster_is_one_get(
    redis_cluster_url: str, database_url: str
) -> None:
    """Counted by the cluster itself: INFO commandstats over every primary, before and after
    HITS cache hits (the product cached by one miss first)."""
    settings = cluster_settings(redis_cluster_url, database_url)
    service = await start(settings)
    client = connect(settings, socket_timeout=5.0)
    assert isinstance(client, Cluster)
    try:
        async with writer_channel(f"127.0.0.1:{service.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            request = pb.GetProductRequest(id="p0000031")
            expected = await stub.GetProduct(request)  # the miss that caches it
            hits = Delta("catalog_cache_requests_total", op="get", result="hit")
            before = await commandstats(client)
            for _ in range(HITS):
                assert await stub.GetProduct(request) == expected
            after = await commandstats(client)
        assert hits() == HITS
        sent = {
            name: n for name, n in (after - before).items() if name.split("|")[0] not in NOT_DATA
        }
        assert sent == {"get": HITS}, "one GET per hit, nothing else"
    finally:
        await service.stop(grace=0)
        await delete_namespace(client, settings.key_namespace)
        await client.aclose()
