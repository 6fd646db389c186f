"""The gRPC contract end to end, against an in-process server on real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.repository import LoadedProduct, Repository
from core.settings import Settings
from devtools.localservers import free_port
from service.app import Service, start
from tests.conftest import SEED_PRODUCTS
from tests.helpers import Delta, db_loads, eventually, handled

if TYPE_CHECKING:
    from catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub as Stub


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Tests of this module run on both topologies (one Redis and a Redis Cluster)."""
    return topo_settings


def conninfo(sa_url: str) -> str:
    return sa_url.replace("postgresql+psycopg://", "postgresql://")


async def test_miss_then_hit_returns_the_database_product(stub: Stub, database_url: str) -> None:
    loads, hits = db_loads(), Delta("catalog_cache_requests_total", op="get", result="hit")
    first = await stub.GetProduct(pb.GetProductRequest(id="p0000007"))
    assert loads() == 1 and hits() == 0
    second = await stub.GetProduct(pb.GetProductRequest(id="p0000007"))
    assert loads() == 1 and hits() == 1
    assert first == second
    with psycopg.connect(conninfo(database_url)) as conn:
        name, price, version = conn.execute(
            "SELECT name, price_minor, version FROM products WHERE id = %s", ("p0000007",)
        ).fetchone()  # type: ignore[misc]
    assert (first.name, first.base_price.amount_minor, first.version) == (name, price, version)
    assert first.category.name and first.brand.name and first.images


async def test_a_hit_a_miss_and_an_uncached_read_answer_the_same_bytes(
    settings: Settings, service: Service, redis_client: object
) -> None:
    """Cached products hold no names; a hit appends the name fragments to the stored bytes and a
    miss or a read with the cache off serve what the database read built. The wire bytes of
    every read RPC are identical across the three (no re-encoding, no reordering)."""
    uncached = await start(settings.replace(grpc_address="127.0.0.1:0", cache_enabled=False))
    category = "c00002"
    requests = [
        ("GetProduct", pb.GetProductRequest(id="p0000009")),
        ("BatchGetProducts", pb.BatchGetProductsRequest(ids=["p0000010", "nope", "p0000009"])),
        ("ListProducts", pb.ListProductsRequest(page_size=7, category_id=category)),
        ("ListProducts", pb.ListProductsRequest(page_size=50)),
    ]

    async def raw(port: int) -> list[bytes]:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return [
                await channel.unary_unary(
                    f"/catalog.v1.CatalogService/{method}",
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=None,
                )(request)
                for method, request in requests
            ]

    try:
        misses = Delta("catalog_cache_requests_total", op="get", result="miss")
        hits = Delta("catalog_cache_requests_total", op="get", result="hit")
        first = await raw(service.port)
        again = await raw(service.port)
        assert (misses(), hits()) == (1, 1)
        assert first == again == await raw(uncached.port)
        product = pb.Product.FromString(first[0])
        assert product.category.name and product.brand.name
    finally:
        await uncached.stop(grace=0)


async def test_unknown_id_is_not_found_and_cached_negatively(stub: Stub) -> None:
    loads = db_loads()
    for _ in range(3):
        with pytest.raises(aio.AioRpcError) as err:
            await stub.GetProduct(pb.GetProductRequest(id="nope-404"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert loads() == 1, "a flood of an unknown id reaches the database once"


@pytest.mark.parametrize("bad", ["", "x" * 65, "a:b", "a*", "{p}", "a b", "a\x00b", "é"])
async def test_malformed_id_is_invalid_argument_before_any_io(stub: Stub, bad: str) -> None:
    loads = db_loads()
    lookups = Delta("catalog_cache_requests_total", op="get", result="miss")
    with pytest.raises(aio.AioRpcError) as err:
        await stub.GetProduct(pb.GetProductRequest(id=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert loads() == 0 and lookups() == 0


async def test_batch_get_mixes_hits_misses_and_unknown_ids_in_one_call(stub: Stub) -> None:
    await stub.GetProduct(pb.GetProductRequest(id="p0000001"))
    loads = db_loads()
    ids = ["p0000001", "p0000002", "unknown-1", "p0000001", "p0000003"]
    reply = await stub.BatchGetProducts(pb.BatchGetProductsRequest(ids=ids))
    assert [r.id for r in reply.results] == ids
    assert [r.WhichOneof("result") for r in reply.results] == [
        "product",
        "product",
        "not_found",
        "product",
        "product",
    ]
    assert [r.product.id for r in reply.results if r.HasField("product")] == [
        "p0000001",
        "p0000002",
        "p0000001",
        "p0000003",
    ]
    assert loads() == 1, "all misses in one query"
    again = await stub.BatchGetProducts(pb.BatchGetProductsRequest(ids=ids))
    assert again == reply and loads() == 1, "second call: all hits, unknown id cached negative"


@pytest.mark.parametrize("ids", [[], ["p1"] * 101, ["p1", "bad id"]])
async def test_bad_batch_is_invalid_argument(stub: Stub, ids: list[str]) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await stub.BatchGetProducts(pb.BatchGetProductsRequest(ids=ids))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def walk(stub: Stub, **request: Any) -> list[str]:
    seen: list[str] = []
    token = ""
    while True:
        reply = await stub.ListProducts(pb.ListProductsRequest(page_token=token, **request))
        seen += [p.id for p in reply.products]
        token = reply.next_page_token
        if not token:
            return seen


async def test_walking_pages_returns_every_product_once(stub: Stub) -> None:
    first = await walk(stub, page_size=7)
    assert len(first) == SEED_PRODUCTS == len(set(first))
    assert first == sorted(first)
    loads = Delta("catalog_db_loads_total", op="list_page_ids")
    product_loads = db_loads()
    assert await walk(stub, page_size=7) == first
    assert loads() == 0 and product_loads() == 0, "second walk: pages and products all hits"


async def test_filtered_walk_matches_the_database(stub: Stub, database_url: str) -> None:
    with psycopg.connect(conninfo(database_url)) as conn:
        category, brand = conn.execute(
            "SELECT category_id, brand_id FROM products WHERE id = 'p0000010'"
        ).fetchone()  # type: ignore[misc]
        by_cat = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM products WHERE category_id = %s ORDER BY id", (category,)
            )
        ]
        by_both = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM products WHERE category_id = %s AND brand_id = %s ORDER BY id",
                (category, brand),
            )
        ]
    assert await walk(stub, page_size=3, category_id=category) == by_cat
    assert await walk(stub, page_size=2, category_id=category, brand_id=brand) == by_both
    reply = await stub.ListProducts(pb.ListProductsRequest(page_size=5, category_id="no-such"))
    assert list(reply.products) == [] and reply.next_page_token == ""


async def test_page_size_zero_is_default_and_huge_is_clamped(stub: Stub) -> None:
    assert len((await stub.ListProducts(pb.ListProductsRequest())).products) == 20
    assert len((await stub.ListProducts(pb.ListProductsRequest(page_size=10**9))).products) == 100


async def test_tampered_negative_or_cross_filter_token_is_invalid_argument(stub: Stub) -> None:
    token = (await stub.ListProducts(pb.ListProductsRequest(page_size=2))).next_page_token
    bad_requests = [
        pb.ListProductsRequest(page_size=-1),
        pb.ListProductsRequest(page_token=token[:-1]),
        pb.ListProductsRequest(page_token="A" + token[1:] if token[0] != "A" else "B" + token[1:]),
        pb.ListProductsRequest(page_token=token, category_id="c001"),
        pb.ListProductsRequest(page_token="garbage"),
        pb.ListProductsRequest(category_id="bad id"),
    ]
    for request in bad_requests:
        with pytest.raises(aio.AioRpcError) as err:
            await stub.ListProducts(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request


async def _started(settings: Settings, **changes: object) -> AsyncIterator[tuple[Service, Stub]]:
    svc = await start(settings.replace(grpc_address="127.0.0.1:0", **changes))
    try:
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            yield svc, catalog_pb2_grpc.CatalogServiceStub(channel)
    finally:
        await svc.stop(grace=0)


async def test_unreachable_database_is_unavailable_and_not_serving(settings: Settings) -> None:
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/catalog"
    async for svc, stub in _started(settings, database_url=dead, db_pool_timeout_s=1.0):
        with pytest.raises(aio.AioRpcError) as err:
            await stub.GetProduct(pb.GetProductRequest(id="p0000001"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Traceback" not in (err.value.details() or "")
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_is_serving_and_reflection_lists_services(service: Service) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        for name in ("", "catalog.v1.CatalogService"):
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=name)
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name async for r in call for s in r.list_services_response.service}
    assert {"catalog.v1.CatalogService", "grpc.health.v1.Health"} <= services


class Exploding(Repository):
    """A repository whose product reads hit a bug carrying a secret in its message."""

    async def get_products(self, ids: object) -> dict[str, LoadedProduct]:
        raise RuntimeError("bug! password=hunter2")


async def test_a_bug_is_internal_without_details_on_the_wire(settings: Settings) -> None:
    svc = await start(settings.replace(grpc_address="127.0.0.1:0"), repository=Exploding)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            with pytest.raises(aio.AioRpcError) as err:
                await catalog_pb2_grpc.CatalogServiceStub(channel).GetProduct(
                    pb.GetProductRequest(id="p0000001")
                )
    finally:
        await svc.stop(grace=0)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    wire_text = (err.value.details() or "") + str(err.value.trailing_metadata())
    assert "hunter2" not in wire_text and "Traceback" not in wire_text


async def test_deadline_and_overload_statuses(settings: Settings, fresh_database_url: str) -> None:
    """A product read blocked by a table lock: the caller's deadline passes (DEADLINE_EXCEEDED);
    with max_concurrent_rpcs=1, a second call while it is in flight is RESOURCE_EXHAUSTED."""
    changes = {"database_url": fresh_database_url, "max_concurrent_rpcs": 1}
    async for _svc, stub in _started(settings, **changes):
        with psycopg.connect(conninfo(fresh_database_url)) as locker:
            locker.execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
            late = handled("GetProduct", "DEADLINE_EXCEEDED")
            with pytest.raises(aio.AioRpcError) as err:
                await stub.GetProduct(pb.GetProductRequest(id="p0000001"), timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

            async def counted() -> bool:  # the server stopped the call and counted it
                return late() == 1

            await eventually(counted, what="DEADLINE_EXCEEDED counted")

            blocked = asyncio.ensure_future(stub.GetProduct(pb.GetProductRequest(id="p0000002")))
            loads = Delta("catalog_cache_requests_total", op="get", result="miss")
            while loads() < 1:  # the first call is inside the server
                await asyncio.sleep(0.01)
            with pytest.raises(aio.AioRpcError) as err:
                await stub.GetProduct(pb.GetProductRequest(id="p0000003"))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            locker.rollback()
        assert (await blocked).id == "p0000002"


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def test_healthcheck_command_reports_serving_and_failure(service: Service) -> None:
    from ops.cli import main

    assert (
        await asyncio.to_thread(main, ["healthcheck", "--target", f"127.0.0.1:{service.port}"]) == 0
    )
    closed = f"127.0.0.1:{free_port()}"
    assert await asyncio.to_thread(main, ["healthcheck", "--target", closed]) == 1
