"""``catalog verify``: a cache the service filled is clean; entries planted stale are reported."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING, cast

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from core.cache.entry import product_parts
from core.keys import NEGATIVE, Keys
from core.settings import Settings
from ops.verify import verify
from tests.processes import settings_env

if TYPE_CHECKING:
    from catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub as Stub


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Tests of this module run on both topologies (one Redis and a Redis Cluster)."""
    return topo_settings


async def _fill(stub: Stub) -> None:
    """Products, a negative entry and two pages of two filters, as callers would cache them."""
    for pid in ("p0000001", "p0000002", "p0000003"):
        await stub.GetProduct(pb.GetProductRequest(id=pid))
    await stub.BatchGetProducts(pb.BatchGetProductsRequest(ids=["p0000004", "nope"]))
    first = await stub.ListProducts(pb.ListProductsRequest(page_size=7))
    await stub.ListProducts(pb.ListProductsRequest(page_size=7, page_token=first.next_page_token))
    category = first.products[0].category.id
    await stub.ListProducts(pb.ListProductsRequest(page_size=3, category_id=category))


def run_verify(settings: Settings) -> subprocess.CompletedProcess[str]:
    """``python -m ops verify`` on ``settings``, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "ops", "verify"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_cache_filled_by_the_service_has_no_stale_entry(
    settings: Settings, stub: Stub, redis_client: Redis, engine: AsyncEngine
) -> None:
    await _fill(stub)
    report = await verify(redis_client, engine, Keys(settings.key_namespace))
    assert report.stale == []
    assert report.products >= 5  # pages cache their products too
    assert (report.negatives, report.pages) == (1, 3)
    done = run_verify(settings)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stale: 0" in done.stdout


async def test_planted_stale_entries_are_reported_with_their_ids(
    settings: Settings, stub: Stub, redis_client: Redis, engine: AsyncEngine
) -> None:
    await _fill(stub)
    keys = Keys(settings.key_namespace)
    # A product entry with an old name (kept under its current TTL).
    key = keys.product("p0000002")
    raw = cast(bytes, await redis_client.get(key))
    assert raw
    _, _, start = product_parts(raw)
    old = pb.Product.FromString(raw[start:])
    assert not old.category.name, "names are not cached"
    old.name = "Name before an update whose event was lost"
    await redis_client.set(key, raw[:start] + old.SerializeToString(), keepttl=True)
    # A product entry still naming the category it was moved out of (ids before the bytes).
    key = keys.product("p0000001")
    raw = cast(bytes, await redis_client.get(key))
    category, _, _ = product_parts(raw)
    moved = raw.replace(b"\n", b"-elsewhere\n", 1)
    assert product_parts(moved)[0] == category + b"-elsewhere"
    await redis_client.set(key, moved, keepttl=True)
    # A negative entry for a product that exists.
    await redis_client.set(keys.product("p0000005"), NEGATIVE, px=60_000)
    # A page missing one of its products.
    page_key = keys.page("", "", "", 7)
    page = cast(bytes, await redis_client.get(page_key))
    assert page
    await redis_client.set(page_key, page.replace(b"p0000003,", b""), keepttl=True)

    report = await verify(redis_client, engine, Keys(settings.key_namespace))
    found = sorted((s.kind, s.what) for s in report.stale)
    assert found == [
        ("negative", "p0000005"),
        ("page", "category=* brand=* after='' size=7"),
        ("product", "p0000001"),
        ("product", "p0000002"),
    ]
    done = run_verify(settings)
    assert done.returncode == 1
    assert "stale: 4" in done.stdout
    assert "p0000002" in done.stdout and "p0000005" in done.stdout
