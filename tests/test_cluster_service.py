"""The service on a Redis Cluster (CATALOG_REDIS_MODE=cluster), called as operators call it.

Reads are answered (through the cache) and views are counted in the cluster: the client the
service builds, its pool gauges and the view counter's script. The cache's invalidation on a
cluster, end to end: tests/test_cluster_end_to_end.py."""

from __future__ import annotations

import uuid

from core.keys import Keys
from core.redisclient import connect
from service.app import start
from tests.helpers import WRITE_TOKEN, delete_namespace, make_settings, metric
from tests.test_call import catalog_call


async def test_the_service_on_a_cluster_answers_and_counts_views(
    redis_cluster_url: str, database_url: str
) -> None:
    settings = make_settings(
        database_url=database_url,
        redis_url=redis_cluster_url,
        redis_mode="cluster",
        key_namespace=f"t{uuid.uuid4().hex[:10]}",
        metrics_port=0,
        grpc_address="127.0.0.1:0",
    )
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
