"""`catalog warm`: the most viewed products and the busiest categories' first pages become hits."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from redis.asyncio import Redis

from core.cache.reader import Reader
from core.db import create_engine, libpq_url
from core.keys import Keys
from core.repository import Repository
from core.settings import Settings
from ops.cli import main
from service.app import create_store
from tests.helpers import Delta, db_loads
from tests.processes import settings_env


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Tests of this module run on both topologies (one Redis and a Redis Cluster)."""
    return topo_settings


def record_views(url: str, views: dict[str, int]) -> None:
    with psycopg.connect(libpq_url(url)) as conn:
        for product_id, n in views.items():
            conn.execute(
                "INSERT INTO product_stats (product_id, views) VALUES (%s, %s)", (product_id, n)
            )


async def test_warm_top_100_makes_them_hits(
    settings: Settings,
    fresh_database_url: str,
    redis_client: Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warm_settings = settings.replace(database_url=fresh_database_url)
    top = [f"p{n:07d}" for n in range(101, 201)]
    record_views(fresh_database_url, {p: 1000 - i for i, p in enumerate(top)} | {"p0000001": 1})
    for name, value in settings_env(warm_settings).items():
        monkeypatch.setenv(name, value)

    args = ["warm", "--top", "100", "--categories", "2", "--rate", "0"]
    assert await asyncio.to_thread(main, args) == 0
    assert "warmed 100 products and 2 category pages" in capsys.readouterr().out

    engine = create_engine(warm_settings)
    try:
        keys = Keys(warm_settings.key_namespace)
        reader = Reader(
            create_store(redis_client, warm_settings), Repository(engine), keys, warm_settings
        )
        loads, hits = db_loads(), Delta("catalog_cache_requests_total", op="batch", result="hit")
        assert all(await reader.batch_get(top))
        assert (hits(), loads()) == (100, 0)
        busiest = (await Repository(engine).get_products([top[0]]))[top[0]].category_id
        page_hits = Delta("catalog_cache_requests_total", op="list", result="hit")
        await reader.list_page(busiest, "", "", 20)
        assert page_hits() == 1
    finally:
        await engine.dispose()
