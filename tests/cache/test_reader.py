"""The read path's correctness under forced interleavings, on real PostgreSQL and Redis (one
Redis and a Redis Cluster)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import psycopg
import pytest
from grpc import aio
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.cache import entry
from core.cache.loader import names_of
from core.cache.names import NameTable
from core.cache.reader import Reader
from core.cache.store import Acquired, FillItem
from core.db import create_engine, libpq_url
from core.keys import Keys, Tag
from core.repository import LoadedProduct, Repository, category_fragment
from core.settings import Settings
from devtools.localservers import RedisProcess
from service.app import create_store, start
from tests.helpers import Delta, eventually, standalone_only

PID = "p0000005"


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Tests of this module run on both topologies unless marked ``standalone_only``."""
    return topo_settings


class PausedAfterRead(Repository):
    """The real repository, but each product read waits after it has read the database."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.has_read = asyncio.Event()
        self.proceed = asyncio.Event()

    async def get_products(self, ids: Sequence[str]) -> dict[str, LoadedProduct]:
        rows = await super().get_products(ids)
        self.has_read.set()
        await self.proceed.wait()
        return rows


@pytest.fixture
async def writable(settings: Settings, fresh_database_url: str) -> AsyncIterator[Settings]:
    yield settings.replace(database_url=fresh_database_url)


@pytest.fixture
async def engine_for(writable: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(writable)
    yield engine
    await engine.dispose()


def db_product(url: str, product_id: str) -> tuple[str, str]:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute(
            "SELECT p.name, c.name FROM products p JOIN categories c ON c.id = p.category_id "
            "WHERE p.id = %s",
            (product_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def db_execute(url: str, sql: str, *params: object) -> None:
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute(sql, params)


def stored(raw: bytes | None) -> pb.Product:
    """The product a cache entry holds (names are not stored: they come from the name table)."""
    assert raw, "a product entry"
    return pb.Product.FromString(raw[entry.product_parts(raw)[2] :])


async def test_stale_fill_after_invalidation_is_refused(
    writable: Settings, engine_for: AsyncEngine, redis_client: Redis
) -> None:
    """Reader reads the DB; the product is updated and invalidated; then the reader fills."""
    store = create_store(redis_client, writable)
    paused = PausedAfterRead(engine_for)
    reader = Reader(store, paused, Keys(writable.key_namespace), writable)
    refused = Delta("catalog_fill_refused_total")

    in_flight = asyncio.ensure_future(reader.get_product(PID))
    await paused.has_read.wait()
    db_execute(
        writable.database_url,
        "UPDATE products SET name = 'renamed', version = version + 1 WHERE id = %s",
        PID,
    )
    await store.invalidate([Tag.product(PID)])
    paused.proceed.set()
    old = pb.Product.FromString(await in_flight or b"")
    assert old.name != "renamed", "the in-flight read answers with what it read"

    assert refused() == 1
    assert await store.get(Keys(writable.key_namespace).product(PID)) is None
    fresh = Reader(store, Repository(engine_for), Keys(writable.key_namespace), writable)
    assert pb.Product.FromString(await fresh.get_product(PID) or b"").name == "renamed"
    cached = await store.get(Keys(writable.key_namespace).product(PID))
    assert stored(cached).name == "renamed", "cache ends equal to the DB"


def schedules(rng: random.Random) -> list[tuple[bool, list[int]]]:
    """(rename?, actor order): every order of one reader against the writer, for both kinds of
    write, then random orders of two readers against the writer."""
    orders = [list(p) for p in sorted(set(itertools.permutations([0, 0, 0, 2, 2])))]
    out = [(rename, order) for rename in (False, True) for order in orders]
    for _ in range(150):
        order = [0, 0, 0, 1, 1, 1, 2, 2]
        rng.shuffle(order)
        out.append((rng.random() < 0.4, order))
    return out


class Frozen:
    """A clock that never moves: nothing in the name table expires, so only the epoch fence
    can keep an old name out of it."""

    def __call__(self) -> float:
        return 1000.0


async def test_interleavings_never_leave_a_stale_entry_or_name(
    writable: Settings, engine_for: AsyncEngine, redis_client: Redis
) -> None:
    """Readers (lease, read DB, fill) against a writer (update DB, invalidate), in every order
    for one reader and random orders for two, with product edits and category renames.
    A reader's fill writes the product entry under its lease and installs the names it read
    under the name epoch it saw before reading; a rename's invalidation is announced, and its
    delivery drops the name. Afterwards the cache and the name table equal the DB."""
    store = create_store(redis_client, writable)
    keys = Keys(writable.key_namespace)
    repo = Repository(engine_for)
    names = NameTable(repo.get_names, writable.name_ttl_ms, Frozen())
    key = keys.product(PID)
    url = writable.database_url
    rng = random.Random(2024)
    category_id = (await repo.get_products([PID]))[PID].category_id

    for round_no, (rename, order) in enumerate(schedules(rng)):
        leases: dict[str, tuple[Acquired, int, float]] = {}
        rows: dict[str, LoadedProduct] = {}

        def reader_steps(me: str) -> list[Callable[[], Awaitable[None]]]:
            async def lease() -> None:
                leases[me] = (await store.acquire([key]), names.epoch, names.now())

            async def read() -> None:
                rows[me] = (await repo.get_products([PID]))[PID]

            async def fill() -> None:
                (acquired, epoch, loaded_at), row = leases[me], rows[me]
                names.install(names_of([row]), epoch, loaded_at)
                if acquired.outcomes == [True]:
                    data = entry.pack_product(
                        row.base, row.category_id, row.brand_id, row.version, 0, 0
                    )
                    item = FillItem(key, data, 60_000, version=row.version)
                    await store.fill(acquired.token, [item])

            return [lease, read, fill]

        async def write() -> None:
            if rename:
                db_execute(
                    url,
                    "UPDATE categories SET name = %s WHERE id = %s",
                    f"cat-{round_no}",
                    category_id,
                )
            else:
                db_execute(
                    url,
                    "UPDATE products SET name = %s, version = version + 1 WHERE id = %s",
                    f"name-{round_no}",
                    PID,
                )

        async def invalidate() -> None:
            tag = Tag.category(category_id) if rename else Tag.product(PID)
            await store.invalidate([tag])
            if tag.renamed:
                names.drop(tag.renamed.encode())  # the broadcast's delivery

        actors: list[list[Callable[[], Awaitable[None]]]] = [
            reader_steps("a"),
            reader_steps("b"),
            [write, invalidate],
        ]
        for actor in order:
            await actors[actor].pop(0)()

        name, category_name = db_product(url, PID)
        cached = await store.get(key)
        if cached:
            assert stored(cached).name == name, f"round {round_no}: stale product"
        held = (
            names.pair(category_id.encode(), stored(cached).brand.id.encode()) if cached else None
        )
        fresh = await names.fragments([category_id.encode()], [])
        assert fresh[0][category_id.encode()] == category_fragment(category_name), (
            f"round {round_no}: stale name"
        )
        assert held is None or held[0] == category_fragment(category_name)
        await store.invalidate([Tag.product(PID)])


@standalone_only  # stops and restarts a Redis of its own (tests/faults cover a cluster's nodes)
async def test_reads_survive_redis_stopping_and_hits_resume_after_it_returns(
    settings: Settings, private_redis: RedisProcess
) -> None:
    svc = await start(
        settings.replace(
            grpc_address="127.0.0.1:0",
            redis_url=private_redis.url,
            breaker_failures=2,
            breaker_reset_s=0.2,
        )
    )
    hits = Delta("catalog_cache_requests_total", op="get", result="hit")
    try:
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            request = pb.GetProductRequest(id=PID)
            expected = await stub.GetProduct(request)
            assert await stub.GetProduct(request) == expected and hits() == 1

            private_redis.stop()
            errors = Delta("catalog_redis_errors_total")
            for _ in range(50):
                assert await stub.GetProduct(request) == expected
            page = await stub.ListProducts(pb.ListProductsRequest(page_size=5))
            batch = await stub.BatchGetProducts(pb.BatchGetProductsRequest(ids=[PID, "nope"]))
            assert len(page.products) == 5 and batch.results[0].product == expected
            assert 1 <= errors() <= 10, "the breaker stops paying for a dead Redis"

            private_redis.start()

            async def hit_again() -> bool:
                before = hits()
                assert await stub.GetProduct(request) == expected
                return hits() > before

            await eventually(hit_again, what="a cache hit after Redis returned")
    finally:
        await svc.stop(grace=0)


async def test_a_waiter_whose_lease_holder_lost_its_lease_takes_the_lease_at_once(
    writable: Settings, engine_for: AsyncEngine, redis_client: Redis
) -> None:
    """Replica A holds the lease and has read the database; replica B waits for A's fill. An
    update voids A's lease, so A's fill will be refused: B sees the lease gone with no value,
    leases the key itself and caches the new product, instead of sleeping out lease_wait_ms
    and reading PostgreSQL uncached."""
    slow = writable.replace(lease_ttl_ms=60_000, lease_wait_ms=30_000)
    store = create_store(redis_client, slow)
    keys = Keys(slow.key_namespace)
    paused = PausedAfterRead(engine_for)
    a = Reader(store, paused, keys, slow)
    b = Reader(store, Repository(engine_for), keys, slow)
    waits, refused = Delta("catalog_lease_waits_total"), Delta("catalog_fill_refused_total")

    in_flight = asyncio.ensure_future(a.get_product(PID))
    await paused.has_read.wait()
    waiter = asyncio.ensure_future(b.get_product(PID))

    async def b_waits() -> bool:
        return waits() == 1

    await eventually(b_waits, what="B waiting on A's lease")
    db_execute(slow.database_url, "UPDATE products SET name = 'voided' WHERE id = %s", PID)
    await store.invalidate([Tag.product(PID)])
    started = time.monotonic()
    got = await waiter
    took_ms = (time.monotonic() - started) * 1000
    print(f"\nwaiter served {took_ms:.1f} ms after the lease was voided")

    assert pb.Product.FromString(got or b"").name == "voided"
    cached = await store.get(keys.product(PID))
    assert stored(cached).name == "voided", "B filled the cache under a lease of its own"
    paused.proceed.set()
    await in_flight
    assert refused() == 1, "A's fill, which read before the update, was refused"
