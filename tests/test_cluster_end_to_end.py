"""The cache on a Redis Cluster, end to end: ``python -m service`` and ``python -m invalidator``
as child processes with ``CATALOG_REDIS_MODE=cluster`` on the session's cluster, a real
PostgreSQL with its capture triggers, and ``python -m ops verify`` at the end.

A GetProduct misses then hits; an UpdateProduct writes through; a plain SQL UPDATE (captured by
the triggers, relayed, consumed) voids the cached product; a category rename reaches every
process's name table through the names channel; and verify finds nothing stale."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import psycopg
import pytest
from google.protobuf import field_mask_pb2

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.db import libpq_url
from core.events import PRODUCT_UPDATED, new_event
from core.keys import Keys
from core.outbox import add_to_outbox
from core.redisclient import RedisClient, connect
from core.settings import Settings
from tests.helpers import delete_namespace, eventually, make_settings, writer_channel
from tests.processes import ServerProcess, settings_env

if TYPE_CHECKING:
    from catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub as Stub

pytestmark = pytest.mark.slow
P, Q = "p0000021", "p0000022"


@pytest.fixture
def cluster_settings(redis_cluster_url: str, fresh_database_url: str) -> Settings:
    return make_settings(
        database_url=fresh_database_url,
        redis_url=redis_cluster_url,
        redis_mode="cluster",
        key_namespace=f"t{uuid.uuid4().hex[:10]}",
        name_ttl_ms=3_600_000,  # only the names channel can make a rename visible in time
    )


@pytest.fixture
async def cluster(cluster_settings: Settings) -> AsyncIterator[RedisClient]:
    client = connect(cluster_settings, socket_timeout=5.0, connect_timeout=5.0)
    yield client
    await delete_namespace(client, cluster_settings.key_namespace)
    await client.aclose()


@pytest.fixture
def invalidator(cluster_settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    env = settings_env(cluster_settings) | {
        "CATALOG_INVALIDATOR_BLOCK_MS": "200",
        "CATALOG_INVALIDATOR_METRICS_PORT": "0",
        "CATALOG_INVALIDATOR_HEALTH_ADDRESS": "",
    }
    proc = subprocess.Popen([sys.executable, "-m", "invalidator"], env=env)
    yield proc
    proc.terminate()
    assert proc.wait(30) == 0, "the invalidator leaves its group cleanly"


@pytest.fixture
async def stub(
    cluster_settings: Settings, cluster: RedisClient, invalidator: subprocess.Popen[bytes]
) -> AsyncIterator[tuple[ServerProcess, Stub]]:
    """The service process, once a warm-up event went through outbox, relay and consumer."""
    from core.db import create_engine

    stream = Keys(cluster_settings.key_namespace).stream
    engine = create_engine(cluster_settings)
    async with engine.begin() as conn:
        await add_to_outbox(conn, new_event(PRODUCT_UPDATED, product_id="warm-up"))
    await engine.dispose()

    async def warmed_up() -> bool:
        if not await cluster.exists(stream):
            return False
        groups = await cluster.xinfo_groups(stream)
        return any(g["entries-read"] == 1 and g["pending"] == 0 for g in groups)

    await eventually(warmed_up, timeout=30, what="the warm-up event to be processed")
    server = ServerProcess(cluster_settings).start()
    try:
        async with writer_channel(server.target) as channel:
            yield server, catalog_pb2_grpc.CatalogServiceStub(channel)
    finally:
        server.stop()


def sql(settings: Settings, statement: str, *params: object) -> None:
    """A plain SQL write, as psql or an admin tool would send it (captured by the triggers)."""
    with psycopg.connect(libpq_url(settings.database_url)) as conn:
        conn.execute(statement, params)


def run_verify(settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops", "verify"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_cache_on_a_cluster_end_to_end(
    cluster_settings: Settings, cluster: RedisClient, stub: tuple[ServerProcess, Stub]
) -> None:
    server, api = stub
    keys = Keys(cluster_settings.key_namespace)

    def gets(result: str) -> float:
        return server.metric("catalog_cache_requests_total", op="get", result=result)

    async def get(product_id: str) -> pb.Product:
        return await api.GetProduct(pb.GetProductRequest(id=product_id))

    # A miss fills the product's slot; the next read is a hit with the same answer.
    first = await get(P)
    assert (gets("miss"), gets("hit")) == (1, 0)
    assert await cluster.exists(keys.product(P))
    assert await get(P) == first
    assert (gets("miss"), gets("hit")) == (1, 1)

    # UpdateProduct writes through. Its own event may void the write-through's lease before
    # the fill (the relay is quick), so the next read may miss: it is never the old product.
    await get(Q)
    updated = await api.UpdateProduct(
        pb.UpdateProductRequest(
            product=pb.Product(id=Q, name="Written through"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        )
    )
    assert updated.name == "Written through"
    assert await get(Q) == updated
    assert await get(Q) == updated
    assert await cluster.exists(keys.product(Q)), "cached again, under the new version"

    # A plain SQL UPDATE: trigger -> outbox -> relay -> stream -> invalidator -> key deleted.
    sql(
        cluster_settings,
        "UPDATE products SET name = 'Edited in SQL', version = version + 1 WHERE id = %s",
        P,
    )

    async def product_gone() -> bool:
        return not await cluster.exists(keys.product(P))

    await eventually(product_gone, timeout=30, what="the SQL update to void the cached product")
    assert (await get(P)).name == "Edited in SQL"
    assert await get(Q) == updated, "other products stay cached"

    # A category rename changes no cached value: the invalidator announces it on the names
    # channel (PUBLISH reaches every node) and the service drops that name.
    category = first.category.id
    sql(
        cluster_settings,
        "UPDATE categories SET name = 'Renamed on a cluster' WHERE id = %s",
        category,
    )

    async def renamed() -> bool:
        return (await get(P)).category.name == "Renamed on a cluster"

    await eventually(renamed, timeout=30, what="the rename to reach the name table")
    assert await cluster.exists(keys.product(P)), "a rename deletes no cached value"

    # Nothing the cluster holds differs from PostgreSQL.
    await api.BatchGetProducts(pb.BatchGetProductsRequest(ids=[f"p{i:07d}" for i in range(1, 30)]))
    await api.ListProducts(pb.ListProductsRequest(page_size=7, category_id=category))
    done = run_verify(cluster_settings)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stale: 0" in done.stdout, done.stdout
    assert "1 list pages checked" in done.stdout, done.stdout
