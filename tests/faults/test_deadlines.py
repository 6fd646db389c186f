"""Deadlines and overload: the server stops its work at the caller's deadline, the database
query included, and refuses calls beyond ``max_concurrent_rpcs`` with RESOURCE_EXHAUSTED.

Acceptance figures (issue #6): no query of a call still runs 1 s after its DEADLINE_EXCEEDED;
a lease wait never outlives the remaining deadline (it takes at most half of it, so the
PostgreSQL read it falls back to fits in the other half)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
import psycopg
import pytest
from grpc import aio
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.db import libpq_url
from core.keys import Keys
from core.repository import LoadedProduct, Repository
from core.settings import Settings
from service.app import Service, start
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


async def test_a_lease_wait_leaves_time_to_read_postgresql_within_the_deadline(
    own_db: Settings, services: list[Service], redis_client: Redis
) -> None:
    """Another reader holds the lease for 30 s and we may wait 20 s: the wait takes at most half
    of the 1 s deadline, and the call is then served from PostgreSQL before its deadline."""
    svc = await start_service(own_db, lease_ttl_ms=30_000, lease_wait_ms=20_000)
    services.append(svc)
    keys = Keys(own_db.key_namespace)
    await redis_client.set(keys.lease(keys.product("p0000008")), "someone-else", px=30_000)
    waits = Delta("catalog_lease_waits_total")
    async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        await stub.GetProduct(pb.GetProductRequest(id="p0000009"))  # connections made
        started = time.monotonic()
        reply = await stub.GetProduct(pb.GetProductRequest(id="p0000008"), timeout=1.0)
        took = time.monotonic() - started
    assert reply.id == "p0000008"
    assert waits() == 1, "the call did wait on the lease"
    print(f"\nserved from PostgreSQL after a lease wait in {took * 1000:.0f} ms of 1000")
    assert await redis_client.get(keys.product("p0000008")) is None, "not cached: not our lease"


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


class SlowToCancel(Repository):
    """The first product read blocks (a locked table) and, when cancelled, takes until
    ``let_go`` to finish cancelling (psycopg cancelling the query in the server)."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.blocked, self.cancelling, self.let_go = (asyncio.Event() for _ in range(3))
        self.first = True

    async def get_products(self, ids: Sequence[str]) -> dict[str, LoadedProduct]:
        if not self.first:
            return await super().get_products(ids)
        self.first = False
        self.blocked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelling.set()
            await self.let_go.wait()
            raise
        raise AssertionError("unreachable")


async def test_a_call_never_inherits_another_calls_cancellation(
    settings: Settings, services: list[Service], redis_client: Redis
) -> None:
    """Caller A leaves (client cancel, as at its deadline) while its single-flight load is
    blocked; the load is still cancelling when caller B asks for the same product. B gets the
    product, not A's CancelledError (to which gRPC sends no status: B hung until its deadline)."""
    repos: list[SlowToCancel] = []

    def repository(engine: AsyncEngine) -> Repository:
        repos.append(SlowToCancel(engine))
        return repos[-1]

    svc = await start(settings.replace(grpc_address="127.0.0.1:0"), repository=repository)
    services.append(svc)
    repo = repos[0]
    misses = Delta("catalog_cache_requests_total", op="get", result="miss")
    request = pb.GetProductRequest(id="p0000014")
    async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        call_a = stub.GetProduct(request)
        await asyncio.wait_for(repo.blocked.wait(), 15)
        call_a.cancel()
        await asyncio.wait_for(repo.cancelling.wait(), 15)
        call_b = asyncio.ensure_future(stub.GetProduct(request, timeout=10))
        # B counts its miss and enters the single-flight in one step: once counted, it joined
        # the cancelling load (old behaviour) or started its own.
        await wait_until(lambda: misses() == 2, timeout=15, what="B's cache miss")
        repo.let_go.set()
        reply = await call_b
    assert reply.id == "p0000014"


class CancelledByAnother(Repository):
    """Product reads end in a CancelledError that is not the caller's (a leaked one)."""

    async def get_products(self, ids: Sequence[str]) -> dict[str, LoadedProduct]:
        raise asyncio.CancelledError


async def test_a_cancellation_not_of_the_call_still_gets_a_status(
    settings: Settings, services: list[Service], redis_client: Redis
) -> None:
    svc = await start(
        settings.replace(grpc_address="127.0.0.1:0", cache_enabled=False),
        repository=CancelledByAnother,
    )
    services.append(svc)
    async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as caught:
            await stub.GetProduct(pb.GetProductRequest(id="p0000015"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
