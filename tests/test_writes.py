"""UpdateProduct: validation, optimistic concurrency, the outbox event and the write-through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import grpc
import psycopg
import pytest
from google.protobuf import field_mask_pb2
from grpc import aio
from redis.asyncio import Redis
from sqlalchemy.exc import OperationalError

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.cache import entry
from core.cache.store import FillItem
from core.db import libpq_url
from core.events import invalidation_for, parse
from core.keys import Keys
from core.repository import LoadedProduct, Repository
from core.settings import Settings
from service.app import Service, create_store, start
from tests.helpers import Delta, writer_channel
from tests.processes import ServerProcess

if TYPE_CHECKING:
    from catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub as Stub

PID = "p0000031"


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Tests of this module run on both topologies (one Redis and a Redis Cluster)."""
    return topo_settings


@pytest.fixture
def writable(settings: Settings, fresh_database_url: str) -> Settings:
    return settings.replace(database_url=fresh_database_url, grpc_address="127.0.0.1:0")


@pytest.fixture
async def api(writable: Settings, redis_client: Redis) -> AsyncIterator[tuple[Service, Stub]]:
    svc = await start(writable)
    async with writer_channel(f"127.0.0.1:{svc.port}") as channel:
        yield svc, catalog_pb2_grpc.CatalogServiceStub(channel)
    await svc.stop(grace=0)


def update(product: pb.Product, *paths: str) -> pb.UpdateProductRequest:
    return pb.UpdateProductRequest(
        product=product, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
    )


def outbox_rows(url: str) -> list[dict[str, str]]:
    with psycopg.connect(libpq_url(url)) as conn:
        return [r[0] for r in conn.execute("SELECT fields FROM outbox ORDER BY id")]


async def test_update_then_read_on_another_process_is_a_hit_with_new_data(
    writable: Settings, api: tuple[Service, Stub]
) -> None:
    """No invalidator runs here, so the update's own event cannot void the write-through's
    lease (with one running, the next read may miss: tests/test_end_to_end.py allows it)."""
    _, stub = api
    other = ServerProcess(writable).start()
    try:
        async with writer_channel(other.target) as channel:
            remote = catalog_pb2_grpc.CatalogServiceStub(channel)
            before = await remote.GetProduct(pb.GetProductRequest(id=PID))  # cached there
            misses = other.metric("catalog_cache_requests_total", op="get", result="miss")

            updated = await stub.UpdateProduct(
                update(pb.Product(id=PID, name="Write-through", stock=7), "name", "stock")
            )
            assert (updated.name, updated.stock, updated.version) == (
                "Write-through",
                7,
                before.version + 1,
            )
            after = await remote.GetProduct(pb.GetProductRequest(id=PID))
            assert after == updated
            assert other.metric("catalog_cache_requests_total", op="get", result="miss") == misses
    finally:
        other.stop()
    [event] = outbox_rows(writable.database_url)
    assert (event["type"], event["product_id"], event["version"]) == (
        "product.updated",
        PID,
        str(updated.version),
    )


async def test_move_records_previous_category_in_the_event(
    writable: Settings, api: tuple[Service, Stub]
) -> None:
    _, stub = api
    before = await stub.GetProduct(pb.GetProductRequest(id=PID))
    with psycopg.connect(libpq_url(writable.database_url)) as conn:
        (target,) = conn.execute(
            "SELECT id FROM categories WHERE id <> %s ORDER BY id LIMIT 1", (before.category.id,)
        ).fetchone()  # type: ignore[misc]
    moved = await stub.UpdateProduct(
        update(pb.Product(id=PID, category=pb.Category(id=target)), "category")
    )
    assert moved.category.id == target
    [event] = outbox_rows(writable.database_url)
    assert (event["category_id"], event["previous_category_id"]) == (target, before.category.id)


async def test_stale_version_is_aborted_and_changes_nothing(
    writable: Settings, api: tuple[Service, Stub]
) -> None:
    _, stub = api
    current = await stub.GetProduct(pb.GetProductRequest(id=PID))
    await stub.UpdateProduct(
        update(pb.Product(id=PID, name="first", version=current.version), "name")
    )
    with pytest.raises(aio.AioRpcError) as err:
        await stub.UpdateProduct(
            update(pb.Product(id=PID, name="second", version=current.version), "name")
        )
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert (await stub.GetProduct(pb.GetProductRequest(id=PID))).name == "first"
    assert len(outbox_rows(writable.database_url)) == 1


async def test_concurrent_updates_with_the_same_version_one_wins(
    writable: Settings, api: tuple[Service, Stub]
) -> None:
    _, stub = api
    version = (await stub.GetProduct(pb.GetProductRequest(id=PID))).version
    calls = [
        stub.UpdateProduct(update(pb.Product(id=PID, stock=n, version=version), "stock"))
        for n in range(8)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    wins = [r for r in results if isinstance(r, pb.Product)]
    assert len(wins) == 1
    assert all(
        isinstance(r, aio.AioRpcError) and r.code() == grpc.StatusCode.ABORTED
        for r in results
        if r not in wins
    )
    assert await stub.GetProduct(pb.GetProductRequest(id=PID)) == wins[0]


@pytest.mark.parametrize(
    ("product", "paths"),
    [
        (pb.Product(id=PID, name="x"), []),
        (pb.Product(id=PID, name="x"), ["name", "price"]),
        (pb.Product(id=PID, name="x"), ["version"]),
        (pb.Product(id=PID), ["name"]),
        (pb.Product(id=PID, stock=-1), ["stock"]),
        (
            pb.Product(id=PID, base_price=pb.Money(currency_code="usd", amount_minor=1)),
            ["base_price"],
        ),
        (
            pb.Product(id=PID, base_price=pb.Money(currency_code="USD", amount_minor=-5)),
            ["base_price"],
        ),
        (pb.Product(id=PID, category=pb.Category(id="bad id")), ["category"]),
        (pb.Product(id=PID, category=pb.Category(id="no-such-category")), ["category"]),
        (pb.Product(id="bad id", name="x"), ["name"]),
    ],
)
async def test_invalid_updates_are_invalid_argument_and_leave_no_trace(
    writable: Settings, api: tuple[Service, Stub], product: pb.Product, paths: list[str]
) -> None:
    _, stub = api
    before = await stub.GetProduct(pb.GetProductRequest(id=PID))
    with pytest.raises(aio.AioRpcError) as err:
        await stub.UpdateProduct(update(product, *paths))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await stub.GetProduct(pb.GetProductRequest(id=PID)) == before
    assert outbox_rows(writable.database_url) == []


async def test_unknown_product_is_not_found(api: tuple[Service, Stub]) -> None:
    _, stub = api
    with pytest.raises(aio.AioRpcError) as err:
        await stub.UpdateProduct(update(pb.Product(id="nope", name="x"), "name"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_older_write_through_never_replaces_a_newer_version(
    settings: Settings, redis_client: Redis
) -> None:
    store = create_store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    key = keys.product(PID)

    async def write_through(version: int) -> list[bool]:
        acquired = await store.acquire([key], "force")
        data = entry.pack_product(b"v%d" % version, "c", "b", version, 0, 1)
        return await store.fill(acquired.token, [FillItem(key, data, 60_000, version=version)])

    assert await write_through(3) == [True]
    assert await write_through(2) == [False], "a stale write-through is refused"
    assert entry.header(await store.get(key) or b"").version == 3
    assert await write_through(4) == [True]


async def test_event_of_the_written_version_keeps_the_write_through(
    settings: Settings, redis_client: Redis
) -> None:
    """The update's own event arrives after its write-through: the entry is already at that
    version, so it stays (the next read is a hit); an event of a later version deletes it."""
    store = create_store(redis_client, settings)
    keys = Keys(settings.key_namespace)
    key = keys.product(PID)
    acquired = await store.acquire([key], "force")
    data = entry.pack_product(b"x", "c", "b", 5, 0, 1)
    await store.fill(acquired.token, [FillItem(key, data, 60_000, version=5)])

    def event(version: int) -> dict[str, str]:
        return {
            "schema": "1",
            "type": "product.updated",
            "event_id": f"e{version}",
            "occurred_at": "1",
            "product_id": PID,
            "version": str(version),
        }

    same = invalidation_for([parse(event(5))])
    await store.invalidate(same.tags, same.min_versions)
    assert await store.get(key) is not None
    later = invalidation_for([parse(event(5)), parse(event(6))])
    await store.invalidate(later.tags, later.min_versions)
    assert await store.get(key) is None


async def test_write_through_forces_past_a_foreign_lease(
    writable: Settings, api: tuple[Service, Stub], redis_client: Redis
) -> None:
    """A reader's fill in flight holds the lease: the write-through takes it over (voiding that
    fill, which read older data) and the cache holds the updated product."""
    _, stub = api
    keys = Keys(writable.key_namespace)
    await redis_client.set(keys.lease(keys.product(PID)), "a-reader", px=60_000)
    updated = await stub.UpdateProduct(update(pb.Product(id=PID, name="forced"), "name"))
    cached = await redis_client.get(keys.product(PID))
    assert isinstance(cached, bytes)
    _, _, start = entry.product_parts(cached)
    assert pb.Product.FromString(cached[start:]).name == "forced"
    assert await stub.GetProduct(pb.GetProductRequest(id=PID)) == updated


async def test_write_through_failure_deletes_the_key(
    writable: Settings, api: tuple[Service, Stub], redis_client: Redis
) -> None:
    """The cache write fails for real (the product key holds a set, so FILL's GET errors): the
    key is deleted rather than left behind, and the caller still gets the update."""
    _, stub = api
    await stub.GetProduct(pb.GetProductRequest(id=PID))
    keys = Keys(writable.key_namespace)
    await redis_client.delete(keys.product(PID))
    await redis_client.sadd(keys.product(PID), "not a product")
    errors = Delta("catalog_redis_errors_total")
    updated = await stub.UpdateProduct(update(pb.Product(id=PID, name="after failure"), "name"))
    assert updated.name == "after failure"
    assert errors() >= 1
    assert await redis_client.get(keys.product(PID)) is None
    assert (await stub.GetProduct(pb.GetProductRequest(id=PID))).name == "after failure"


async def test_write_through_that_loses_its_lease_leaves_no_older_entry(
    writable: Settings, redis_client: Redis
) -> None:
    """Two updates overlap: the second write-through takes the lease over while the first is
    reading. The first's fill is refused; the old entry must not stay behind until the second
    lands (its caller already has the new version and would read the old one)."""
    from core.cache.loader import Loader
    from core.cache.names import NameTable
    from core.db import create_engine
    from tests.cache.test_reader import PausedAfterRead

    engine = create_engine(writable)
    try:
        keys = Keys(writable.key_namespace)
        store = create_store(redis_client, writable)
        key = keys.product(PID)
        old = await store.acquire([key])
        stale = entry.pack_product(b"old", "c", "b", 1, 0, 1)
        await store.fill(old.token, [FillItem(key, stale, 60_000, version=1)])
        with psycopg.connect(libpq_url(writable.database_url)) as conn:
            conn.execute("UPDATE products SET version = 5 WHERE id = %s", (PID,))

        paused = PausedAfterRead(engine)
        names = NameTable(paused.get_names, writable.name_ttl_ms)
        first = Loader(store, paused, keys, writable, lambda exc: None, names)
        in_flight = asyncio.ensure_future(first.write_through(PID))
        await paused.has_read.wait()
        await store.acquire([key], "force")  # the second write-through's lease
        paused.proceed.set()
        assert await in_flight is not None
        assert await store.get(key) is None, "the older entry was dropped, not served"
    finally:
        await engine.dispose()


class ReadsFailAfterCommit(Repository):
    """PostgreSQL goes away for reads once ``failing`` is set (the write path is unaffected)."""

    failing = False

    async def get_products(self, ids: Sequence[str]) -> dict[str, LoadedProduct]:
        if self.failing:
            lost = psycopg.OperationalError("server closed the connection unexpectedly")
            raise OperationalError("SELECT", None, lost)
        return await super().get_products(ids)


async def test_a_committed_update_returns_the_product_when_its_re_read_fails(
    writable: Settings, redis_client: Redis
) -> None:
    """The commit succeeds, then the write-through's read fails: the caller gets the committed
    product (from the write transaction), not UNAVAILABLE inviting a retry of a done update."""
    svc = await start(writable, repository=ReadsFailAfterCommit)
    try:
        async with writer_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            before = await stub.GetProduct(pb.GetProductRequest(id=PID))  # cached
            ReadsFailAfterCommit.failing = True
            updated = await stub.UpdateProduct(
                update(pb.Product(id=PID, name="committed", version=before.version), "name")
            )
    finally:
        ReadsFailAfterCommit.failing = False
        await svc.stop(grace=0)
    assert (updated.name, updated.version) == ("committed", before.version + 1)
    keys = Keys(writable.key_namespace)
    assert await redis_client.get(keys.product(PID)) is None, "the older entry was dropped"
