"""``catalog verify``: compare every cached entry of a namespace with PostgreSQL; report stale ones.

What counts as stale (compared exactly: a product's TTL is capped at its next price-rule
boundary, so no time-dependent field may legitimately differ while the entry lives):

* a product entry whose payload differs from what :meth:`Repository.get_products` builds now, or
  whose product no longer exists;
* a negative entry (no such product) whose product exists;
* a list page whose ids or next id differ from :meth:`Repository.list_page_ids` for its filter,
  position and size.

Known exception, not a protocol failure: a ``price_rules`` edit publishes no event, so entries
of the products it affects stay as they were until their TTL (they are reported).

Race-awareness: an entry may change between the Redis read and the database read. A candidate is
re-checked once: the database is read again, then Redis; it is reported only if Redis still holds
the very bytes first read and they still differ from the second database read.

Pages: a page key is a hash of (category, brand, after id, size), so the filter is recovered from
the list tag sets the page is registered in (every live page is in its tag sets: that is what
lets an invalidation reach it), and the position and size by hashing candidates: the start, the
next ids of the other cached pages and the ids just before the page's first id in PostgreSQL, and
every size that fits. A page no candidate hashes to is reported as unverified, not stale.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from service.keys import LEASE_SUFFIX, NEGATIVE, Keys
from service.repository import LoadedProduct, Repository

BATCH = 500
MAX_PAGE_SIZE = 100
# How many ids before a page's first id are tried as its start (covers products created since).
PREDECESSORS = 4

_products = sa.table(
    "products", sa.column("id", sa.Text), sa.column("category_id"), sa.column("brand_id")
)


@dataclass(frozen=True, slots=True)
class Stale:
    kind: str  # "product", "negative" or "page"
    key: str
    what: str  # the product id, or the page's filter and position
    detail: str


@dataclass(slots=True)
class Report:
    products: int = 0
    negatives: int = 0
    pages: int = 0
    stale: list[Stale] = field(default_factory=list)
    unverified: list[tuple[str, str]] = field(default_factory=list)  # (page key, why)


@dataclass(frozen=True, slots=True)
class _Position:
    category: str
    brand: str
    after: str
    size: int

    def describe(self) -> str:
        return (
            f"category={self.category or '*'} brand={self.brand or '*'} "
            f"after={self.after!r} size={self.size}"
        )


def payload(raw: bytes) -> bytes:
    """The payload of a cached value: entries may carry a fixed header (``E`` + 45 digits)."""
    if raw[:1] == b"E" and len(raw) >= 46 and raw[1:46].isdigit():
        return raw[46:]
    return raw


async def verify(redis: Redis, engine: AsyncEngine, keys: Keys, batch: int = BATCH) -> Report:
    """Check every product, negative and page entry under ``keys``; never writes anything."""
    report = Report()
    repo = Repository(engine)
    async for chunk in _scan(redis, keys.product_pattern, batch):
        await _check_products(redis, repo, keys, chunk, report)
    await _check_pages(redis, engine, repo, keys, report)
    return report


async def _scan(redis: Redis, pattern: str, batch: int) -> AsyncIterator[list[str]]:
    """Value keys matching ``pattern`` (leases skipped, SCAN's duplicates dropped), in chunks."""
    seen: set[str] = set()
    chunk: list[str] = []
    async for raw in redis.scan_iter(match=pattern, count=1000):
        key = raw.decode()
        if key.endswith(LEASE_SUFFIX) or key in seen:
            continue
        seen.add(key)
        chunk.append(key)
        if len(chunk) >= batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _product_problem(cached: bytes, found: LoadedProduct | None) -> str | None:
    if cached == NEGATIVE:
        return "cached as missing, but the product exists" if found is not None else None
    if found is None:
        return "cached, but the product no longer exists"
    if payload(cached) != found.data:
        return "cached bytes differ from PostgreSQL"
    return None


async def _check_products(
    redis: Redis, repo: Repository, keys: Keys, chunk: list[str], report: Report
) -> None:
    values = cast(list[bytes | None], await redis.mget(chunk))
    cached = {
        pid: (key, value)
        for key, value in zip(chunk, values, strict=True)
        if value is not None and (pid := keys.product_id(key)) is not None
    }
    report.products += len(cached)
    report.negatives += sum(1 for _, v in cached.values() if v == NEGATIVE)
    loaded = await repo.get_products(list(cached))
    suspects = [pid for pid, (_, v) in cached.items() if _product_problem(v, loaded.get(pid))]
    if not suspects:
        return
    # Re-check: the database again, then Redis; only an entry unchanged throughout counts.
    loaded = await repo.get_products(suspects)
    again = cast(list[bytes | None], await redis.mget([cached[pid][0] for pid in suspects]))
    for pid, now in zip(suspects, again, strict=True):
        key, first = cached[pid]
        problem = _product_problem(first, loaded.get(pid))
        if now == first and problem is not None:
            kind = "negative" if first == NEGATIVE else "product"
            report.stale.append(Stale(kind, key, pid, problem))


def _parse_page(raw: bytes) -> tuple[str, list[str]]:
    head, _, id_list = payload(raw).decode().partition("\n")
    return head, [i for i in id_list.split(",") if i]


async def _check_pages(
    redis: Redis, engine: AsyncEngine, repo: Repository, keys: Keys, report: Report
) -> None:
    pages: dict[str, bytes] = {}
    async for chunk in _scan(redis, keys.page_pattern, BATCH):
        values = cast(list[bytes | None], await redis.mget(chunk))
        pages.update((k, v) for k, v in zip(chunk, values, strict=True) if v is not None)
    if not pages:
        return
    # Tag sets are read after the pages: a page filled meanwhile is simply not checked twice.
    filters: dict[str, set[tuple[str, str]]] = defaultdict(set)
    async for chunk in _scan(redis, keys.list_tag_pattern, BATCH):
        for tag_key in chunk:
            tag = keys.tag_of(tag_key)
            kind = tag.list_filter if tag is not None else None
            if kind is None:
                continue
            for member in cast(set[bytes], await redis.smembers(tag_key)):
                filters[member.decode()].add(kind)
    nexts = {_parse_page(raw)[0] for raw in pages.values()} | {""}
    for page_key, raw in pages.items():
        if page_key not in filters:
            if await redis.get(page_key) is not None:  # else invalidated while we looked
                report.unverified.append((page_key, "in no list tag set"))
            continue
        report.pages += 1
        category = next((c for c, _ in filters[page_key] if c), "")
        brand = next((b for _, b in filters[page_key] if b), "")
        _, ids = _parse_page(raw)
        before = await _ids_before(engine, category, brand, ids[0] if ids else None)
        position = _find_position(keys, page_key, category, brand, nexts | set(before), ids)
        if position is None:
            report.unverified.append((page_key, "filter or position not recognised"))
            continue
        if await _page_problem(repo, position, raw) is None:
            continue
        problem = await _page_problem(repo, position, raw)  # re-check: database, then Redis
        if problem is not None and await redis.get(page_key) == raw:
            report.stale.append(Stale("page", page_key, position.describe(), problem))


def _find_position(
    keys: Keys,
    page_key: str,
    category: str,
    brand: str,
    afters: set[str],
    ids: Sequence[str],
) -> _Position | None:
    # A fresh page with a next id is full and the last page may be shorter, but a stale page may
    # have lost ids: every size is tried, the likeliest first (a hash costs a microsecond).
    likely = max(len(ids), 1)
    sizes = [likely, *(n for n in range(1, MAX_PAGE_SIZE + 1) if n != likely)]
    for after in afters:
        for size in sizes:
            if keys.page(category, brand, after, size) == page_key:
                return _Position(category, brand, after, size)
    return None


async def _page_problem(repo: Repository, p: _Position, raw: bytes) -> str | None:
    head, ids = _parse_page(raw)
    rows = await repo.list_page_ids(p.category or None, p.brand or None, p.after, p.size + 1)
    expected_next = rows[p.size - 1] if len(rows) > p.size else ""
    if rows[: p.size] != ids:
        return f"ids differ from PostgreSQL ({len(ids)} cached, {len(rows[: p.size])} now)"
    if expected_next != head:
        return f"next id differs ({head!r} cached, {expected_next!r} now)"
    return None


async def _ids_before(
    engine: AsyncEngine, category: str, brand: str, first: str | None
) -> list[str]:
    """Up to PREDECESSORS ids of the filter just before ``first`` (None: the filter's last)."""
    c = _products.c
    stmt = sa.select(c.id).order_by(c.id.desc()).limit(PREDECESSORS)
    if first is not None:
        stmt = stmt.where(c.id < first)
    if category:
        stmt = stmt.where(c.category_id == category)
    if brand:
        stmt = stmt.where(c.brand_id == brand)
    async with engine.connect() as conn:
        return list((await conn.execute(stmt)).scalars())


def render(report: Report, namespace: str) -> str:
    """The human-readable report ``catalog verify`` prints."""
    lines = [
        f"namespace {namespace!r}: {report.products} product entries ({report.negatives} "
        f"negative), {report.pages} list pages checked",
        f"stale: {len(report.stale)}",
    ]
    lines += [f"  {s.kind} {s.what}: {s.detail} [{s.key}]" for s in report.stale]
    if report.unverified:
        lines.append(f"unverified pages: {len(report.unverified)}")
        lines += [f"  {key}: {why}" for key, why in report.unverified]
    return "\n".join(lines)
