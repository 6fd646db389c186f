"""RED metrics (grpc_server_*): every call is counted, refused, cancelled and deadline-exceeded ones
and the standard services included; the in-flight and saturation gauges read what they claim."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import psycopg
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.db import libpq_url
from core.metrics import sample_loop_lag
from core.settings import Settings
from service.app import Service, start
from tests.helpers import CATALOG_SERVICE, Delta, eventually, handled, metric

if TYPE_CHECKING:
    from catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub as Stub


def started(method: str, service: str = CATALOG_SERVICE, kind: str = "unary") -> Delta:
    return Delta(
        "grpc_server_started_total", grpc_type=kind, grpc_service=service, grpc_method=method
    )


def in_flight(method: str) -> float:
    labels = {"grpc_type": "unary", "grpc_service": CATALOG_SERVICE, "grpc_method": method}
    return metric("grpc_server_in_flight", **labels)


@pytest.fixture
async def locked_service(
    settings: Settings, fresh_database_url: str
) -> AsyncIterator[tuple[Service, Stub, psycopg.Connection]]:
    """A service allowing 2 calls in flight, and a connection holding the products table locked
    (product reads that miss the cache wait until ``locker.rollback()``)."""
    svc = await start(
        settings.replace(
            grpc_address="127.0.0.1:0", database_url=fresh_database_url, max_concurrent_rpcs=2
        )
    )
    try:
        with psycopg.connect(libpq_url(fresh_database_url)) as locker:
            locker.execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
            async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
                yield svc, catalog_pb2_grpc.CatalogServiceStub(channel), locker
            locker.rollback()
    finally:
        await svc.stop(grace=0)


async def test_refused_cancelled_and_late_calls_are_all_counted(
    locked_service: tuple[Service, Stub, psycopg.Connection],
) -> None:
    _svc, stub, locker = locked_service
    calls = started("GetProduct")
    refused = handled("GetProduct", "RESOURCE_EXHAUSTED")
    cancelled = handled("GetProduct", "CANCELLED")
    late = handled("GetProduct", "DEADLINE_EXCEEDED")
    ok = handled("GetProduct", "OK")
    flying = in_flight("GetProduct")

    held = stub.GetProduct(pb.GetProductRequest(id="p0000001"), timeout=30)
    short = stub.GetProduct(pb.GetProductRequest(id="p0000002"), timeout=0.5)

    async def two_in_flight() -> bool:
        return in_flight("GetProduct") - flying == 2

    await eventually(two_in_flight, what="two calls in flight")
    with pytest.raises(aio.AioRpcError) as err:
        await stub.GetProduct(pb.GetProductRequest(id="p0000003"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused() == 1

    with pytest.raises(aio.AioRpcError) as err:
        await short
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def late_counted() -> bool:
        return late() == 1

    await eventually(late_counted, what="the late call counted")

    held.cancel()

    async def cancel_counted() -> bool:
        return cancelled() == 1

    await eventually(cancel_counted, what="the cancelled call counted")
    assert in_flight("GetProduct") == flying
    locker.rollback()
    assert (await stub.GetProduct(pb.GetProductRequest(id="p0000004"))).id == "p0000004"
    assert ok() == 1
    assert calls() == 4, "started: held, short, refused, the last"


async def test_health_and_reflection_calls_are_counted_and_limited(
    locked_service: tuple[Service, Stub, psycopg.Connection],
) -> None:
    svc, stub, _locker = locked_service
    health = "grpc.health.v1.Health"
    checks = handled("Check", "OK", service=health)
    unknown = handled("Check", "NOT_FOUND", service=health)
    refused = handled("Check", "RESOURCE_EXHAUSTED", service=health)
    reflections = Delta(
        "grpc_server_handled_total",
        grpc_type="bidi_stream",
        grpc_service="grpc.reflection.v1alpha.ServerReflection",
        grpc_method="ServerReflectionInfo",
        grpc_code="OK",
    )
    async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        health_stub = health_pb2_grpc.HealthStub(channel)
        await health_stub.Check(health_pb2.HealthCheckRequest())
        with pytest.raises(aio.AioRpcError) as err:
            await health_stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        assert [r async for r in call]
        assert checks() == 1 and unknown() == 1 and reflections() == 1

        # Two catalog calls wait on the lock: the limit is shared, so health is refused too.
        held = [stub.GetProduct(pb.GetProductRequest(id=i)) for i in ("p0000005", "p0000006")]

        async def full() -> bool:
            return in_flight("GetProduct") >= 2

        await eventually(full, what="the limit reached")
        with pytest.raises(aio.AioRpcError) as err:
            await health_stub.Check(health_pb2.HealthCheckRequest())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused() == 1
        for call_ in held:
            call_.cancel()


async def test_saturation_gauges_read_the_pools_and_breaker(service: Service) -> None:
    settings = service.settings
    value = REGISTRY.get_sample_value
    assert value("catalog_db_pool_connections", {"state": "max"}) == (
        settings.db_pool_size + settings.db_max_overflow
    )
    assert value("catalog_redis_pool_connections", {"state": "max"}) == (
        settings.redis_max_connections
    )
    assert value("catalog_breaker_state", {}) == 0
    for _ in range(settings.breaker_failures):
        service.reader.breaker.failure()
    assert value("catalog_breaker_state", {}) == 1
    service.reader.breaker.success()
    async with service.engine.connect():
        assert value("catalog_db_pool_connections", {"state": "in_use"}) == 1


async def test_event_loop_lag_shows_a_blocked_loop() -> None:
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_loop_lag(0.01, stop))
    await asyncio.sleep(0.05)
    time.sleep(0.3)  # noqa: ASYNC251 (on purpose: blocks the loop, so the 10 ms wait ends late)
    stop.set()  # so that late sample is its last
    await sampler
    assert (REGISTRY.get_sample_value("catalog_event_loop_lag_seconds", {}) or 0) >= 0.25
