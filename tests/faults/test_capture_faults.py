"""Change capture under faults: the relay publishes every captured row at least once when it is
killed (SIGKILL) in the middle of a batch and when PostgreSQL restarts under it, and a bulk
UPDATE sent as plain SQL leaves nothing stale.

The relay runs in real ``python -m invalidator`` processes with a fallback poll of a minute, so a
row published within the bounds below was announced by NOTIFY (or found by the drain that
follows every LISTEN), not polled. "Mid-batch" is forced, not timed: Redis is paused for writes
(CLIENT PAUSE WRITE), so the relay's XADD waits while its transaction holds the rows, and the
test sees that from PostgreSQL (the unsent rows are locked) before it kills the relay."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
import sqlalchemy as sa
from grpc import aio
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.db import create_engine
from core.events import parse
from core.keys import Keys
from core.settings import Settings
from devtools.localservers import PostgresCluster, RedisProcess
from ops.verify import render, verify
from service.app import Service
from tests.faults.conftest import PRODUCT_IDS, Invalidators, start_service, wait_until

pytestmark = pytest.mark.fault
SLOW_POLL = {"CATALOG_OUTBOX_POLL_MS": "60000"}
RELAY_ONLY = SLOW_POLL | {
    "CATALOG_INVALIDATOR_CONSUME": "false",
    "CATALOG_VIEWS_FLUSH": "false",
    "CATALOG_INVALIDATOR_SOCKET_TIMEOUT_S": "120",  # the paused XADD waits, never times out
}


async def sql(engine: AsyncEngine, statement: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text(statement))


async def scalar(engine: AsyncEngine, query: str) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(sa.text(query)) or 0)


async def published_products(redis: Redis, keys: Keys) -> set[str]:
    """Every product id named by an entry of the stream (per-product and bulk entries)."""
    if not await redis.exists(keys.stream):
        return set()
    named: set[str] = set()
    for _, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(keys.stream)):
        event = parse(fields)
        named.update(event.product_ids or (event.product_id,))
    return named


async def test_relay_killed_mid_batch_leaves_every_row_to_the_next_relay(
    settings: Settings,
    fresh_database_url: str,
    private_redis: RedisProcess,
    invalidators: Invalidators,
) -> None:
    s = settings.replace(database_url=fresh_database_url, redis_url=private_redis.url)
    keys = Keys(s.key_namespace)
    invalidators.settings = s
    engine = create_engine(s)
    redis = Redis.from_url(private_redis.url, socket_timeout=5)
    try:
        first = invalidators.start("first", **RELAY_ONLY)
        await sql(engine, "UPDATE products SET stock = 0 WHERE id = 'p0000001'")
        await wait_until(
            lambda: _named(redis, keys, {"p0000001"}), 30, "the first relay publishing"
        )

        await redis.client_pause(120_000, all=False)  # writes only
        async with engine.begin() as conn:  # one commit, one notification, one batch
            await conn.execute(sa.text("UPDATE products SET stock = stock + 1"))  # 3 rows
            await conn.execute(
                sa.text("UPDATE products SET version = version + 1 WHERE id = 'p0000002'")
            )
        unsent = "SELECT count(*) FROM outbox WHERE sent_at IS NULL"

        async def held_by_the_relay() -> bool:
            async with engine.begin() as conn:
                free = await conn.scalar(
                    sa.text(
                        "SELECT count(*) FROM (SELECT id FROM outbox WHERE sent_at IS NULL "
                        "FOR UPDATE SKIP LOCKED) AS free"
                    )
                )
            return bool(free == 0)

        assert await scalar(engine, unsent) == 4
        await wait_until(held_by_the_relay, 30, "the relay holding the batch in its XADD")
        first.kill()
        first.wait()
        await redis.client_unpause()
        assert await scalar(engine, unsent) == 4, "the killed relay committed nothing"

        invalidators.start("second", **RELAY_ONLY)
        await wait_until(
            lambda: _named(redis, keys, set(PRODUCT_IDS)), 30, "every product published"
        )
        await wait_until(lambda: _scalar_is(engine, unsent, 0), 30, "the outbox drained")
    finally:
        await redis.aclose()
        await engine.dispose()


async def test_relay_publishes_across_a_postgresql_restart_without_polling(
    settings: Settings,
    pg_cluster: PostgresCluster,
    invalidators: Invalidators,
    redis_client: Redis,
) -> None:
    s = settings.replace(database_url=pg_cluster.url)
    keys = Keys(s.key_namespace)
    invalidators.settings = s
    invalidators.start("only", **SLOW_POLL)
    engine = create_engine(s)
    try:
        await sql(engine, "UPDATE products SET stock = 1 WHERE id = 'p0000001'")
        await wait_until(lambda: _named(redis_client, keys, {"p0000001"}), 30, "published")

        await asyncio.to_thread(pg_cluster.stop, "fast")
        await asyncio.to_thread(pg_cluster.start)
        # The relay lost its LISTEN connection with the server. Its retry listens again and
        # drains; later commits wake it by NOTIFY (the fallback poll is a minute away).
        for pid in PRODUCT_IDS[1:4]:
            statement = f"UPDATE products SET stock = 2 WHERE id = '{pid}'"
            await _retrying(lambda statement=statement: sql(engine, statement))
            await wait_until(
                lambda pid=pid: _named(redis_client, keys, {pid}),
                30,
                f"{pid} published",
            )
        await wait_until(
            lambda: _scalar_is(engine, "SELECT count(*) FROM outbox WHERE sent_at IS NULL", 0),
            30,
            "the outbox drained",
        )
    finally:
        await engine.dispose()


async def test_bulk_plain_sql_update_leaves_nothing_stale(
    settings: Settings,
    fresh_database_url: str,
    services: list[Service],
    invalidators: Invalidators,
    redis_client: Redis,
) -> None:
    s = settings.replace(database_url=fresh_database_url)
    keys = Keys(s.key_namespace)
    svc = await start_service(s)
    services.append(svc)
    invalidators.settings = s
    invalidators.start("only", **SLOW_POLL)
    engine = create_engine(s)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            for k in range(0, len(PRODUCT_IDS), 100):
                await stub.BatchGetProducts(
                    pb.BatchGetProductsRequest(ids=PRODUCT_IDS[k : k + 100])
                )
            cached = [keys.product(p) for p in PRODUCT_IDS]
            assert await redis_client.exists(*cached) == len(PRODUCT_IDS)

            await sql(engine, "UPDATE products SET price_minor = price_minor + 1")

            async def all_gone() -> bool:
                return await redis_client.exists(*cached) == 0

            await wait_until(all_gone, 30, "every cached product invalidated")
            reply = await stub.BatchGetProducts(pb.BatchGetProductsRequest(ids=PRODUCT_IDS[:100]))
            async with engine.connect() as conn:
                prices: dict[str, int] = dict(
                    (await conn.execute(sa.text("SELECT id, price_minor FROM products"))).all()
                )
            assert all(
                r.product.base_price.amount_minor == prices[r.product.id] for r in reply.results
            )
        report = await verify(redis_client, engine, keys)
        print(f"\n{render(report, s.key_namespace)}")
        assert report.products > 0 and report.stale == []
    finally:
        await engine.dispose()


async def _named(redis: Redis, keys: Keys, products: set[str]) -> bool:
    return products <= await published_products(redis, keys)


async def _scalar_is(engine: AsyncEngine, query: str, value: int) -> bool:
    return await scalar(engine, query) == value


async def _retrying(write: object) -> None:
    """A write right after the restart may meet a pooled connection the restart killed."""
    for _ in range(50):
        try:
            await write()  # type: ignore[operator]
            return
        except sa.exc.OperationalError:
            await asyncio.sleep(0.1)
    await write()  # type: ignore[operator]
