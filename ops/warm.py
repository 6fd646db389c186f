"""Cache warming: load the most viewed products and the first pages of the busiest categories
through the normal fill path (leases, tags, TTLs), so a cold cache after a deploy or a Redis
restart does not send the first burst of traffic to PostgreSQL.

Popularity comes from ``product_stats`` (the write-behind view counters). Without any views yet
(a new install) the first products by id stand in. Loads go in batches of up to 100 ids (one MGET
and one SQL query each) and are rate-limited so warming never competes with live traffic.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from core.cache.reader import Reader
from core.keys import Keys
from core.repository import Repository
from core.settings import Settings

BATCH = 100
PAGE_SIZE = 20

_TOP_PRODUCTS = sa.text(
    "SELECT s.product_id FROM product_stats s ORDER BY s.views DESC, s.product_id LIMIT :n"
)
_FIRST_PRODUCTS = sa.text("SELECT id FROM products ORDER BY id LIMIT :n")
_BUSIEST_CATEGORIES = sa.text(
    "SELECT p.category_id FROM product_stats s JOIN products p ON p.id = s.product_id "
    "GROUP BY p.category_id ORDER BY sum(s.views) DESC, p.category_id LIMIT :n"
)


@dataclass(frozen=True, slots=True)
class Warmed:
    products: int
    pages: int
    seconds: float
    from_stats: bool


async def warm(
    engine: AsyncEngine,
    reader: Reader,
    top: int,
    categories: int,
    rate: float,
    out: TextIO | None = None,
) -> Warmed:
    """Warm ``top`` products and the first page of ``categories`` categories, at most ``rate``
    products per second (0: unlimited), printing progress to ``out`` (``sys.stderr`` as it is
    at the call, not at import: a caller may have replaced it since)."""
    out = sys.stderr if out is None else out
    started = time.monotonic()
    async with engine.connect() as conn:
        ids = list((await conn.execute(_TOP_PRODUCTS, {"n": top})).scalars())
        from_stats = bool(ids)
        if not ids:
            ids = list((await conn.execute(_FIRST_PRODUCTS, {"n": top})).scalars())
        busiest = list((await conn.execute(_BUSIEST_CATEGORIES, {"n": categories})).scalars())
    for done in range(0, len(ids), BATCH):
        chunk = ids[done : done + BATCH]
        await reader.batch_get(chunk)
        _progress(out, "products", done + len(chunk), len(ids))
        if rate > 0:
            # Sleep off the time this many products should have taken at the limit.
            ahead = (done + len(chunk)) / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
    for n, category_id in enumerate(busiest, 1):
        await reader.list_page(category_id, "", "", PAGE_SIZE)
        _progress(out, "category pages", n, len(busiest))
    return Warmed(len(ids), len(busiest), time.monotonic() - started, from_stats)


def _progress(out: TextIO, what: str, done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(
        f"\r{what:>15} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=out
    )
    out.flush()


async def warm_cache(settings: Settings, top: int, categories: int, rate: float) -> Warmed:
    """``catalog warm``: build the clients the service uses, warm, close them."""
    from core.db import create_engine
    from service.app import create_redis, create_store

    engine = create_engine(settings)
    redis = create_redis(settings, socket_timeout=5.0)
    try:
        store = create_store(redis, settings)
        reader = Reader(store, Repository(engine), Keys(settings.key_namespace), settings)
        return await warm(engine, reader, top, categories, rate)
    finally:
        await redis.aclose()
        await engine.dispose()
