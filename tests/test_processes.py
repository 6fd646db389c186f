"""Behaviour across real server processes: the stampede guard and graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import grpc
import psycopg
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.db import libpq_url
from core.settings import Settings
from tests.helpers import eventually
from tests.processes import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def servers(settings: Settings, fresh_database_url: str) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    base = settings.replace(
        database_url=fresh_database_url, lease_ttl_ms=30_000, lease_wait_ms=25_000
    )
    try:
        for _ in range(2):
            started.append(ServerProcess(base).start())
        yield started
    finally:
        for server in started:
            server.stop()


async def test_stampede_across_two_processes_loads_the_database_once(
    servers: list[ServerProcess],
) -> None:
    """200 concurrent reads of one cold key over two processes: exactly one DB load.

    The product table is locked while the requests arrive, so the first load cannot finish
    before every request is inside a server; it is released only once both servers have
    counted all their misses and the losing process is waiting on the lease."""
    url = libpq_url(servers[0].settings.database_url)
    channels = [aio.insecure_channel(s.target) for s in servers]
    stubs = [catalog_pb2_grpc.CatalogServiceStub(c) for c in channels]
    try:
        with psycopg.connect(url) as locker:
            locker.execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
            calls = [
                asyncio.ensure_future(stub.GetProduct(pb.GetProductRequest(id="p0000042")))
                for stub in stubs
                for _ in range(100)
            ]

            async def all_inside() -> bool:
                misses = sum(
                    s.metric("catalog_cache_requests_total", op="get", result="miss")
                    for s in servers
                )
                waits = sum(s.metric("catalog_lease_waits_total") for s in servers)
                return misses == 200 and waits == 1

            await eventually(all_inside, what="200 misses and one lease waiter")
            locker.rollback()
        replies = await asyncio.gather(*calls)
    finally:
        for channel in channels:
            await channel.close(None)
    assert {r.id for r in replies} == {"p0000042"}
    assert len({r.SerializeToString() for r in replies}) == 1
    loads = [s.metric("catalog_db_loads_total", op="get_products") for s in servers]
    assert sum(loads) == 1, f"database loads per process: {loads}"


async def test_sigterm_finishes_in_flight_refuses_new_and_reports_not_serving(
    servers: list[ServerProcess],
) -> None:
    server = servers[0]
    url = libpq_url(server.settings.database_url)
    async with aio.insecure_channel(server.target) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        warm = await stub.GetProduct(pb.GetProductRequest(id="p0000001"))
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING

        with psycopg.connect(url) as locker:
            locker.execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
            in_flight = asyncio.ensure_future(stub.GetProduct(pb.GetProductRequest(id="p0000002")))

            async def inside() -> bool:
                return server.metric("catalog_cache_requests_total", op="get", result="miss") == 2

            await eventually(inside, what="the slow RPC to reach the server")
            server.signal(signal.SIGTERM)
            update = await watch.read()
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()

            async def refused() -> bool:
                try:
                    assert await stub.GetProduct(pb.GetProductRequest(id="p0000001")) == warm
                except aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    return True
                return False

            await eventually(refused, what="new RPCs to be refused")
            assert not in_flight.done()
            locker.rollback()
        assert (await in_flight).id == "p0000002"
    assert server.wait() == 0
