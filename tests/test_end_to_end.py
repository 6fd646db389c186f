"""A plain SQL write reaches every read path: PostgreSQL -> capture trigger -> outbox -> relay
(woken by NOTIFY) -> stream -> invalidator process -> cached keys, or a rename's
announcement on the names channel -> the next GetProduct /
ListProducts / BatchGetProducts. No event is written by hand: the writes are what psql or an
admin tool would send, price rules included. An UpdateProduct writes through meanwhile, and
``python -m ops verify`` finds nothing stale at the end.

Runs on both topologies (one Redis and a 3-primary Redis Cluster). The service and the invalidator
are real ``python -m service`` and ``python -m invalidator`` processes, the invalidator with a
fallback poll of a minute, so only notifications can wake its relay in time. Latencies from commit
to key deletion are printed (run with ``-s``), never asserted."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.db import create_engine
from core.events import PRODUCT_UPDATED, new_event
from core.keys import Keys
from core.outbox import add_to_outbox
from core.settings import Settings
from tests.helpers import eventually, writer_channel
from tests.processes import ServerProcess, settings_env
from tests.test_verify import run_verify

if TYPE_CHECKING:
    from catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub as Stub

pytestmark = pytest.mark.slow
P, Q, R = "p0000011", "p0000012", "p0000013"


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """The test runs on both topologies (one Redis and a Redis Cluster)."""
    return topo_settings


@pytest.fixture
def e2e_settings(settings: Settings, fresh_database_url: str) -> Settings:
    return settings.replace(
        database_url=fresh_database_url, grpc_address="127.0.0.1:0", name_ttl_ms=3_600_000
    )


@pytest.fixture
def invalidator(e2e_settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    env = settings_env(e2e_settings) | {
        "CATALOG_INVALIDATOR_BLOCK_MS": "200",
        "CATALOG_INVALIDATOR_METRICS_PORT": "0",
        "CATALOG_INVALIDATOR_HEALTH_ADDRESS": "",
        "CATALOG_OUTBOX_POLL_MS": "60000",
    }
    proc = subprocess.Popen([sys.executable, "-m", "invalidator"], env=env)
    yield proc
    proc.terminate()
    assert proc.wait(30) == 0, "the invalidator leaves its group cleanly"


@pytest.fixture
async def running(
    e2e_settings: Settings, redis_client: Redis, invalidator: subprocess.Popen[bytes]
) -> AsyncIterator[tuple[ServerProcess, Stub]]:
    """The service process, once one warm-up event went through the outbox, relay and consumer
    (so the latencies printed exclude process start-up)."""
    stream = Keys(e2e_settings.key_namespace).stream
    engine = create_engine(e2e_settings)
    async with engine.begin() as conn:
        await add_to_outbox(conn, new_event(PRODUCT_UPDATED, product_id="warm-up"))
    await engine.dispose()

    async def warmed_up() -> bool:
        if not await redis_client.exists(stream):
            return False
        groups = await redis_client.xinfo_groups(stream)
        return any(g["entries-read"] == 1 and g["pending"] == 0 for g in groups)

    await eventually(warmed_up, timeout=30, what="the warm-up event to be processed")
    server = ServerProcess(e2e_settings).start()
    try:
        async with writer_channel(server.target) as channel:
            yield server, catalog_pb2_grpc.CatalogServiceStub(channel)
    finally:
        server.stop()


async def test_outbox_write_invalidates_exactly_what_changed_on_every_read_path(
    e2e_settings: Settings,
    running: tuple[ServerProcess, Stub],
    invalidator: subprocess.Popen[bytes],
    redis_client: Redis,
) -> None:
    server, stub = running
    keys = Keys(e2e_settings.key_namespace)
    engine = create_engine(e2e_settings)

    def gets(result: str) -> float:
        return server.metric("catalog_cache_requests_total", op="get", result=result)

    try:
        # A miss fills the product's entry; the next read is a hit with the same answer.
        product = await stub.GetProduct(pb.GetProductRequest(id=P))
        assert (gets("miss"), gets("hit")) == (1, 0)
        assert await stub.GetProduct(pb.GetProductRequest(id=P)) == product
        assert (gets("miss"), gets("hit")) == (1, 1)
        old_category, brand = product.category.id, product.brand.id

        async def page(category: str) -> list[pb.Product]:
            reply = await stub.ListProducts(
                pb.ListProductsRequest(page_size=100, category_id=category)
            )
            return list(reply.products)

        async def batch() -> list[pb.Product]:
            reply = await stub.BatchGetProducts(pb.BatchGetProductsRequest(ids=[P, Q]))
            return [r.product for r in reply.results]

        async def write(sql: str, params: dict[str, object]) -> float:
            async with engine.begin() as conn:
                await conn.execute(sa.text(sql), params)
            return time.perf_counter()

        async def gone(key: str, since: float, what: str) -> None:
            async def deleted() -> bool:
                return not await redis_client.exists(key)

            await eventually(deleted, what=f"{what}: {key} deleted", interval=0.001)
            print(
                f"\n{what}: commit -> key deleted in {(time.perf_counter() - since) * 1000:.1f} ms"
            )

        old_page_key = keys.page(old_category, "", "", 100)
        await page(old_category)
        await batch()
        q_before = await stub.GetProduct(pb.GetProductRequest(id=Q))

        # 1. An edit: only the product entry goes; pages keep their ids.
        committed = await write(
            "UPDATE products SET name = 'Edited', version = version + 1 WHERE id = :id",
            {"id": P},
        )
        await gone(keys.product(P), committed, "product.updated")
        assert await redis_client.exists(old_page_key), "an edit leaves list pages alone"
        assert await redis_client.exists(keys.product(Q)), "other products stay cached"
        assert (await stub.GetProduct(pb.GetProductRequest(id=P))).name == "Edited"
        assert [p.name for p in await page(old_category) if p.id == P] == ["Edited"]
        assert (await batch())[0].name == "Edited"
        assert await stub.GetProduct(pb.GetProductRequest(id=Q)) == q_before

        # An UpdateProduct writes through. Its own event may void the write-through's lease
        # before the fill (the relay is quick), so the next read may miss: it is never the old
        # product, and the one after it finds the entry cached again under the new version.
        await stub.GetProduct(pb.GetProductRequest(id=R))
        updated = await stub.UpdateProduct(
            pb.UpdateProductRequest(
                product=pb.Product(id=R, name="Written through"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            )
        )
        assert updated.name == "Written through"
        assert await stub.GetProduct(pb.GetProductRequest(id=R)) == updated
        assert await stub.GetProduct(pb.GetProductRequest(id=R)) == updated
        assert await redis_client.exists(keys.product(R)), "cached again, under the new version"

        # 2. A move to another category: the product and both categories' pages go.
        new_category = next(c for c in (await _categories(engine)) if c != old_category)
        new_page_key = keys.page(new_category, "", "", 100)
        await page(new_category)
        committed = await write(
            "UPDATE products SET category_id = :c, version = version + 1 WHERE id = :id",
            {"id": P, "c": new_category},
        )
        await gone(new_page_key, committed, "product.updated (moved)")
        assert not await redis_client.exists(old_page_key)
        assert P not in [p.id for p in await page(old_category)]
        assert P in [p.id for p in await page(new_category)]
        assert (await stub.GetProduct(pb.GetProductRequest(id=P))).category.id == new_category
        assert (await batch())[0].category.id == new_category

        # 3. A rename of that category: no cached value holds a name, so nothing is deleted;
        #    the invalidator announces it and the service drops that name from its table
        #    (its TTL is an hour here: only the announcement can make the next read see it).
        committed = await write(
            "UPDATE categories SET name = 'Renamed Category' WHERE id = :c",
            {"c": new_category},
        )

        async def renamed() -> bool:
            got = await stub.GetProduct(pb.GetProductRequest(id=P))
            return got.category.name == "Renamed Category"

        await eventually(renamed, what="category.updated: the new name served", interval=0.001)
        print(
            "\ncategory.updated: commit -> new name served in "
            f"{(time.perf_counter() - committed) * 1000:.1f} ms"
        )
        assert await redis_client.exists(keys.product(P)), "a rename deletes no cached value"
        assert {p.category.name for p in await page(new_category)} == {"Renamed Category"}
        assert (await batch())[0].category.name == "Renamed Category"

        # 4. A 90%-off rule on the brand, inserted now: the brand's cached products go, and the
        #    next read has the new final price (not the one cached before, for the TTL).
        cached = await stub.GetProduct(pb.GetProductRequest(id=P))
        committed = await write(
            "INSERT INTO price_rules (id, name, scope, target_id, kind, value, priority) "
            "VALUES ('e2e-rule', '90% off', 'brand', :b, 'percent_off', 9000, 1000000)",
            {"b": brand},
        )
        await gone(keys.product(P), committed, "price_rule.changed (brand)")
        ruled = await stub.GetProduct(pb.GetProductRequest(id=P))
        assert ruled.applied_rule.id == "e2e-rule"
        assert (
            ruled.final_price.amount_minor
            == cached.base_price.amount_minor
            - (cached.base_price.amount_minor * 9000 + 5000) // 10000
        )

        # 5. The rule's scope changes to another product: the old scope (P's brand) and the new
        #    one (Q) are both invalidated.
        await batch()
        committed = await write(
            "UPDATE price_rules SET scope = 'product', target_id = :q WHERE id = 'e2e-rule'",
            {"q": Q},
        )
        await gone(keys.product(P), committed, "price_rule.changed (old scope)")
        await gone(keys.product(Q), committed, "price_rule.changed (new scope)")
        p_after, q_after = await batch()
        assert p_after.applied_rule.id != "e2e-rule"
        assert q_after.applied_rule.id == "e2e-rule"

        # Nothing the cache holds differs from PostgreSQL.
        assert await stub.GetProduct(pb.GetProductRequest(id=R)) == updated
        done = run_verify(e2e_settings)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "stale: 0" in done.stdout, done.stdout
        assert "2 list pages checked" in done.stdout, done.stdout  # both categories' first pages
    finally:
        await engine.dispose()


async def _categories(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list(
            (await conn.execute(sa.text("SELECT id FROM categories ORDER BY id"))).scalars()
        )
