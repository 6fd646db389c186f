"""The service and the invalidator work under the least-privilege Redis users of docs/security.md.

The ``ACL SETUSER`` lines are read from that page (so the page cannot drift from what is
tested), applied to a private redis-server with this test's namespace and passwords, and the two
processes run under them: every RPC, a cache hit, an outbox relay, an invalidation and a clean
leave of the group, with nothing in Redis's ACL LOG (where every refusal is recorded). Then the
commands neither may run are refused with NOPERM. Last, the service reads through ``rediss://``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
import redis as redis_sync
from google.protobuf import field_mask_pb2
from grpc import aio
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.db import libpq_url
from core.keys import Keys
from core.publisher import Publisher
from core.settings import Settings
from devtools.localservers import RedisProcess, free_port
from invalidator.settings import InvalidatorSettings
from service.app import start
from tests.certs import Authority
from tests.helpers import Delta, eventually, make_settings, writer_channel

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "security.md").read_text()
USERS = {"catalog-service": "SERVICE_PASSWORD", "catalog-invalidator": "INVALIDATOR_PASSWORD"}


def acl_lines(namespace: str, passwords: dict[str, str]) -> list[list[str]]:
    """The documented ACL SETUSER commands for ``namespace`` with the given passwords."""
    lines = [
        line.split()
        for line in DOC.splitlines()
        if line.startswith("ACL SETUSER ") and " on " in line  # the cluster additions: below
    ]
    assert [line[2] for line in lines] == list(USERS), "docs/security.md lists both users"
    out = []
    for words in lines:
        placeholder = ">" + USERS[words[2]]
        out.append(
            [
                ">" + passwords[words[2]]
                if w == placeholder
                else w.replace("~catalog:", f"~{namespace}:").replace("&catalog:", f"&{namespace}:")
                for w in words
            ]
        )
    return out


@pytest.fixture
def acl_redis(private_redis: RedisProcess) -> Iterator[tuple[RedisProcess, str, dict[str, str]]]:
    namespace = f"acl{uuid.uuid4().hex[:8]}"
    passwords = {user: uuid.uuid4().hex for user in USERS}
    admin = redis_sync.Redis.from_url(private_redis.url)
    for words in acl_lines(namespace, passwords):
        admin.execute_command(*words)  # type: ignore[no-untyped-call]
    admin.close()
    yield private_redis, namespace, passwords


def user_url(server: RedisProcess, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


async def test_the_service_and_the_invalidator_work_under_their_acl_users(
    acl_redis: tuple[RedisProcess, str, dict[str, str]], fresh_database_url: str, tmp_path: Path
) -> None:
    server, namespace, passwords = acl_redis
    keys = Keys(namespace)
    settings = make_settings(
        database_url=fresh_database_url,
        redis_url=user_url(server, "catalog-service", passwords["catalog-service"]),
        key_namespace=namespace,
        grpc_address="127.0.0.1:0",
        metrics_port=0,
        name_ttl_ms=3_600_000,  # only the invalidator's announcement can show the rename
        near_cache_enabled=True,
    )
    hits = Delta("catalog_cache_requests_total", op="get", result="hit")
    near_hits = Delta("catalog_near_cache_requests_total", result="hit")
    service = await start(settings)
    admin = Redis.from_url(server.url)
    invalidator = None
    try:
        async with writer_channel(f"127.0.0.1:{service.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            await stub.GetProduct(pb.GetProductRequest(id="p0000001"), timeout=10)
            await stub.GetProduct(pb.GetProductRequest(id="p0000001"), timeout=10)
            page = await stub.ListProducts(pb.ListProductsRequest(page_size=5), timeout=10)
            await stub.ListProducts(
                pb.ListProductsRequest(page_size=5, page_token=page.next_page_token), timeout=10
            )
            await stub.ListProducts(pb.ListProductsRequest(page_size=5), timeout=10)  # a page hit
            empty = pb.ListProductsRequest(category_id="c99999")  # matches nothing: not cached
            assert not (await stub.ListProducts(empty, timeout=10)).products
            await stub.BatchGetProducts(pb.BatchGetProductsRequest(ids=["p0000002", "x"]))
            first = await stub.GetProduct(pb.GetProductRequest(id="p0000001"), timeout=10)
            combined = pb.ListProductsRequest(  # registers the filter in both registries
                page_size=5, category_id=first.category.id, brand_id=first.brand.id
            )
            assert (await stub.ListProducts(combined, timeout=10)).products
            mask = field_mask_pb2.FieldMask(paths=["name"])
            await stub.UpdateProduct(
                pb.UpdateProductRequest(
                    product=pb.Product(id="p0000003", name="ACL"), update_mask=mask
                ),
                timeout=10,
            )
            try:
                await stub.RecordProductViews(
                    pb.RecordProductViewsRequest(product_ids=["p0000001"]), timeout=10
                )
            except aio.AioRpcError as exc:  # served once the lead's RPC lands
                assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
            assert hits() >= 1, "the second read was a cache hit"
            near = service.reader.near
            assert near is not None

            async def near_hit() -> bool:
                await stub.GetProduct(pb.GetProductRequest(id="p0000002"), timeout=10)
                return near_hits() >= 1

            await eventually(near_hit, 10, "a near-cache hit (its channel works under the ACL)")

            invalidator = subprocess.Popen(  # noqa: ASYNC220 (starts it, waits for nothing)
                [sys.executable, "-m", "invalidator"],
                env={
                    "PATH": os.environ["PATH"],
                    "PYTHONPATH": str(ROOT),
                    "CATALOG_REDIS_URL": user_url(
                        server, "catalog-invalidator", passwords["catalog-invalidator"]
                    ),
                    "CATALOG_DATABASE_URL": fresh_database_url,
                    "CATALOG_KEY_NAMESPACE": namespace,
                    "CATALOG_INVALIDATOR_CONSUMER": "acl-test",
                    "CATALOG_INVALIDATOR_BLOCK_MS": "200",
                    "CATALOG_INVALIDATOR_CLAIM_INTERVAL_MS": "100",
                    "CATALOG_INVALIDATOR_STATS_INTERVAL_S": "0.2",
                    "CATALOG_INVALIDATOR_METRICS_PORT": "0",
                    "CATALOG_INVALIDATOR_HEALTH_ADDRESS": "",
                    "CATALOG_LOG_LEVEL": "INFO",
                },
                cwd=ROOT,
                stderr=(tmp_path / "invalidator.log").open("wb"),
            )
            product_key = keys.product("p0000001")
            assert await admin.exists(product_key)
            await Publisher(admin, keys, maxlen=10_000).publish_product_updated("p0000001")

            async def consumed() -> bool:
                groups = (
                    await admin.xinfo_groups(keys.stream) if await admin.exists(keys.stream) else []
                )
                return (
                    not await admin.exists(product_key)
                    and bool(groups)
                    and all(g["pending"] == 0 and g["lag"] == 0 for g in groups)
                )

            await eventually(
                consumed, timeout=60, what="the invalidator applied the event and the outbox row"
            )
            reply = await stub.GetProduct(pb.GetProductRequest(id="p0000003"), timeout=10)
            assert reply.name == "ACL"
            with psycopg.connect(libpq_url(fresh_database_url)) as conn:
                conn.execute(
                    "UPDATE categories SET name = 'ACL renamed' WHERE id = %s",
                    (first.category.id,),
                )

            async def renamed() -> bool:  # PUBLISH by the invalidator, SUBSCRIBE by the service
                got = await stub.GetProduct(pb.GetProductRequest(id="p0000001"), timeout=10)
                return got.category.name == "ACL renamed"

            await eventually(renamed, timeout=60, what="the rename announced and followed")
        invalidator.send_signal(signal.SIGTERM)
        assert invalidator.wait(30) == 0, "left the group (XGROUP DELCONSUMER) cleanly"
        log = (tmp_path / "invalidator.log").read_text()
        # Redis records every command and key an ACL refused: a missing grant shows up here even
        # where the service only falls back to PostgreSQL.
        denied = await admin.acl_log()
        assert denied == [], f"refused by the documented ACLs: {denied}"
        assert "NOPERM" not in log and "Traceback" not in log and " ERROR " not in log, log
    finally:
        if invalidator is not None and invalidator.poll() is None:
            invalidator.kill()
            invalidator.wait()
        await service.stop(grace=0)
        await admin.aclose()


@pytest.mark.parametrize("user", list(USERS))
@pytest.mark.parametrize(
    "command",
    [
        ["FLUSHALL"],
        ["FLUSHDB"],
        ["KEYS", "*"],
        ["CONFIG", "GET", "maxmemory"],
        ["XGROUP", "DESTROY", "{ns}:events", "invalidator"],
        ["GET", "other-namespace:v1:p:{p1}"],
        ["SET", "other-namespace:x", "1"],
        ["ACL", "LIST"],
        ["SHUTDOWN", "NOSAVE"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_commands_outside_the_grants_are_refused(
    acl_redis: tuple[RedisProcess, str, dict[str, str]], user: str, command: list[str]
) -> None:
    server, namespace, passwords = acl_redis
    client = redis_sync.Redis.from_url(user_url(server, user, passwords[user]))
    try:
        assert client.set(f"{namespace}:v1:probe", "1"), "the user works in its namespace"
        with pytest.raises(NoPermissionError):
            client.execute_command(*(w.replace("{ns}", namespace) for w in command))  # type: ignore[no-untyped-call]
    finally:
        client.close()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisProcess, Path]]:
    ca = Authority(tmp_path, "redis-ca")
    cert = ca.issue("redis", server=True)
    port = free_port()
    server = RedisProcess(
        tmp_path / "redis", free_port(), "--tls-port", str(port), "--tls-cert-file",
        str(cert.cert), "--tls-key-file", str(cert.key), "--tls-ca-cert-file", str(ca.cert),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    server.start()
    server.tls_port = port  # type: ignore[attr-defined]
    yield server, ca.cert
    server.stop()


async def test_the_service_reads_through_rediss(
    tls_redis: tuple[RedisProcess, Path], settings: Settings
) -> None:
    """Reads, and the near cache's channel (its connections taken over from redis-py after the
    TLS handshake), over ``rediss://``."""
    server, ca = tls_redis
    url = f"rediss://127.0.0.1:{server.tls_port}/0?ssl_ca_certs={ca}"  # type: ignore[attr-defined]
    errors = Delta("catalog_redis_errors_total")
    hits = Delta("catalog_cache_requests_total", op="get", result="hit")
    near_hits = Delta("catalog_near_cache_requests_total", result="hit")
    service = await start(
        settings.replace(redis_url=url, grpc_address="127.0.0.1:0", near_cache_enabled=True)
    )
    try:
        async with writer_channel(f"127.0.0.1:{service.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            for _ in range(2):
                await stub.GetProduct(pb.GetProductRequest(id="p0000001"), timeout=10)
            assert errors() == 0 and hits() + near_hits() == 1  # the second read, a hit

            async def near_hit() -> bool:
                await stub.GetProduct(pb.GetProductRequest(id="p0000001"), timeout=10)
                return near_hits() >= 1

            await eventually(near_hit, 10, "a near-cache hit (its channel works over TLS)")
        assert service.tracking is not None and service.tracking.sessions == 1
        assert errors() == 0
    finally:
        await service.stop(grace=0)


def cluster_additions() -> dict[str, list[str]]:
    """The documented extra grants of each user on a Redis Cluster."""
    return {
        line.split()[2]: line.split()[3:]
        for line in DOC.splitlines()
        if line.startswith("ACL SETUSER ") and " on " not in line
    }


async def test_the_stream_side_and_view_counts_work_under_the_users_on_a_cluster(
    tmp_path: Path,
) -> None:
    """Every node gets the documented users plus their cluster grants. As the invalidator:
    publish, consume (invalidating the cache's entries, a rename announced), dead-letter,
    re-drive, claim and release a view flush, WAIT; as the service: lease and fill a cached
    product, read it, count views. Nothing lands in any node's ACL LOG."""
    from core.cache.store import CacheStore, FillItem
    from core.keys import Tag
    from core.publisher import Publisher
    from core.redisclient import ReplicaWait, connect
    from devtools.rediscluster import RedisCluster as ClusterLauncher
    from invalidator.consumer import Consumer
    from invalidator.deadletter import list_dead_letters, redrive
    from invalidator.viewflush import ViewFlusher
    from service.views import ViewCounter
    from tests.invalidator.conftest import FAST

    namespace, passwords = f"acl{uuid.uuid4().hex[:8]}", {u: uuid.uuid4().hex for u in USERS}
    assert set(cluster_additions()) == set(USERS)
    with ClusterLauncher(tmp_path / "cluster", primaries=3) as cluster:
        for port in cluster.ports:
            for words in acl_lines(namespace, passwords):
                cluster.cli(*words, port=port)
            for user, grants in cluster_additions().items():
                cluster.cli("ACL", "SETUSER", user, *grants, port=port)

        def as_user(user: str) -> Settings:
            url = f"redis://{user}:{passwords[user]}@127.0.0.1:{cluster.ports[0]}/0"
            return make_settings(redis_url=url, redis_mode="cluster", key_namespace=namespace)

        invalidator, service = as_user("catalog-invalidator"), as_user("catalog-service")
        isettings = InvalidatorSettings.from_env({}, **FAST)
        keys = isettings.keys(invalidator)
        redis = connect(invalidator, socket_timeout=5.0)
        reader = connect(invalidator, socket_timeout=10.0, single_connection=True)
        views_client = connect(service, socket_timeout=5.0)
        try:
            publisher = Publisher(redis, keys, maxlen=1000)
            await publisher.publish_product_updated("p1")
            await redis.xadd(keys.stream, {"type": "nonsense"})
            cached = CacheStore(views_client, keys, lease_ttl_ms=5000, tag_margin_ms=60_000)
            got = await cached.acquire([keys.product("p1")])
            assert await cached.fill(got.token, [FillItem(keys.product("p1"), b"v", 60_000)])
            assert await cached.get(keys.product("p1")) == b"v"
            store = CacheStore(redis, keys, lease_ttl_ms=5000, tag_margin_ms=60_000)
            consumer = Consumer(redis, reader, store, keys, isettings, "c")
            serving = asyncio.create_task(consumer.serve())
            await eventually(lambda: _settled(consumer, 2), what="applied and dead-lettered")
            (letter,) = await list_dead_letters(redis, keys)
            assert (await redrive(redis, keys, [letter.id], maxlen=1000)).redriven == 1
            await eventually(lambda: _settled(consumer, 3), what="re-driven and dead-lettered")
            consumer.stop()
            assert await asyncio.wait_for(serving, 30) is True
            assert await cached.get(keys.product("p1")) is None, "the event voided the entry"
            assert await store.invalidate([Tag.category("c1")]) == 0  # announced (PUBLISH)

            assert await ViewCounter(views_client, keys, 1000).record(["p1", "p1"]) == 2
            flusher = ViewFlusher(redis, None, keys, interval_s=60)  # type: ignore[arg-type]
            flush_id = await flusher.claim()
            assert flush_id is not None
            await flusher.release(flush_id)
            assert await ReplicaWait(keys, replicas=1, timeout_ms=10)(redis) is False
        finally:
            for client in (redis, reader, views_client):
                await client.aclose()
        for port in cluster.ports:
            assert cluster.cli("ACL", "LOG", port=port).strip() == "", f"refused on {port}"


async def _settled(consumer: object, total: int) -> bool:
    stats = consumer.stats  # type: ignore[attr-defined]
    return bool(stats.processed + stats.dead_lettered >= total)
