"""Deadlines and overload: the server stops its work at the caller's deadline, the database
query included, and refuses calls beyond ``max_concurrent_rpcs`` with RESOURCE_EXHAUSTED.

Acceptance figures (issue #6): no query of a call still runs 1 s after its DEADLINE_EXCEEDED;
a lease wait never outlives the remaining deadline."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import grpc
import psycopg
import pytest
from grpc import aio
from redis.asyncio import Redis

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from service.app import Service
from service.db import libpq_url
from service.keys import Keys
from service.settings import Settings
from tests.faults.conftest import active_queries, start_service, wait_until
from tests.helpers import Delta

pytestmark = pytest.mark.fault


@pytest.fixture
def own_db(settings: Settings, fresh_database_url: str) -> Settings:
    """This test's database: it locks tables and counts the queries running in it."""
    return settings.replace(database_url=fresh_database_url)


async def test_a_query_blocked_past_the_deadline_is_cancelled_in_postgresql(
    own_db: Settings, services: list[Service], redis_client: Redis
) -> None:
    svc = await start_service(own_db)
    services.append(svc)
    async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        with psycopg.connect(libpq_url(own_db.database_url)) as locker:
            locker.execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.GetProduct(pb.GetProductRequest(id="p0000007"), timeout=0.5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The statement waits on the lock; statement_timeout (5 s) would end it much later.
            took = await wait_until(
                lambda: active_queries(own_db.database_url) == 0,
                timeout=1.0,
                what="the service's statement to be cancelled",
            )
            print(f"\nstatement gone {took * 1000:.0f} ms after DEADLINE_EXCEEDED")
            locker.rollback()
        # The connection went back to the pool usable: the next call is served.
        assert (await stub.GetProduct(pb.GetProductRequest(id="p0000007"), timeout=5)).id


async def test_a_lease_wait_ends_at_the_deadline(
    own_db: Settings, services: list[Service], redis_client: Redis
) -> None:
    """Another reader holds the lease for 30 s and we may wait 20 s: the deadline wins."""
    svc = await start_service(own_db, lease_ttl_ms=30_000, lease_wait_ms=20_000)
    services.append(svc)
    keys = Keys(own_db.key_namespace)
    await redis_client.set(keys.lease(keys.product("p0000008")), "someone-else", px=30_000)
    polls = Delta("catalog_lease_waits_total")
    async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        deadline = 0.3
        started = time.monotonic()
        with pytest.raises(aio.AioRpcError) as caught:
            await stub.GetProduct(pb.GetProductRequest(id="p0000008"), timeout=deadline)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert polls() == 1, "the call was waiting on the lease"
        # The waiting handler is gone: its polling (one GET per 5 ms) stops. Sampled over
        # 20 polls' time after a bound of 1 s (generous for a loaded 2-core machine).
        info = cast(dict[str, dict[str, int]], await redis_client.info("commandstats"))

        def gets() -> int:
            return int(info.get("cmdstat_get", {}).get("calls", 0))

        async def polling_stopped() -> bool:
            nonlocal info
            before = gets()
            await asyncio.sleep(0.1)
            info = cast(dict[str, dict[str, int]], await redis_client.info("commandstats"))
            return gets() == before

        await wait_until(polling_stopped, timeout=1.0, what="the lease wait to stop")
        print(f"\nlease wait ended; call took {time.monotonic() - started:.3f} s of {deadline}")


async def test_calls_beyond_max_concurrent_rpcs_get_resource_exhausted(
    own_db: Settings, services: list[Service], redis_client: Redis
) -> None:
    svc = await start_service(own_db, max_concurrent_rpcs=3)
    services.append(svc)
    misses = Delta("catalog_cache_requests_total", op="get", result="miss")
    async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        with psycopg.connect(libpq_url(own_db.database_url)) as locker:
            locker.execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
            held = [
                asyncio.ensure_future(stub.GetProduct(pb.GetProductRequest(id=pid), timeout=30))
                for pid in ("p0000010", "p0000011", "p0000012")
            ]
            await wait_until(lambda: misses() == 3, timeout=15, what="three calls in flight")
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.GetProduct(pb.GetProductRequest(id="p0000013"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            locker.rollback()
        assert [r.id for r in await asyncio.gather(*held)] == ["p0000010", "p0000011", "p0000012"]
        assert (await stub.GetProduct(pb.GetProductRequest(id="p0000013"), timeout=5)).id
