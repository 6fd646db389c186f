"""``catalog verify``: compare every cached entry of a namespace with PostgreSQL; report stale ones.

What counts as stale (compared exactly: a product's TTL is capped at its next price-rule
boundary, so no time-dependent field may legitimately differ while the entry lives):

* a product entry whose payload (category and brand ids, then the ``Product`` without names)
  differs from what :meth:`Repository.get_products` builds now, or whose product no longer
  exists. Names are not cached (each process appends them from PostgreSQL at serve time, see
  core/cache/names.py), so there is nothing of theirs to compare;
* a negative entry (no such product) whose product exists;
* a list page whose ids or next id differ from :meth:`Repository.list_page_ids` for its filter,
  position and size.

Race-awareness: an entry may change between the Redis read and the database read. A candidate is
re-checked once: the database is read again, then Redis; it is reported only if Redis still holds
the very bytes first read and they still differ from the second database read.

Pages: a page entry records the request that produced it (filter, position, size), so it is
recomputed exactly; an entry whose record does not hash to its own key is reported as stale too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from core.cache import entry
from core.db import is_connection_error
from core.keys import LEASE_SUFFIX, NEGATIVE, Keys
from core.redisclient import RedisClient, keys_in_namespace, mget
from core.repository import LoadedProduct, Repository

BATCH = 500


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
    #: Entries that could not be checked (unreadable, or a request PostgreSQL rejects).
    errors: list[Stale] = field(default_factory=list)


async def verify(redis: RedisClient, engine: AsyncEngine, keys: Keys, batch: int = BATCH) -> Report:
    """Check every product, negative and page entry under ``keys``; never writes anything."""
    report = Report()
    repo = Repository(engine)
    async for chunk in _scan(redis, keys.product_pattern, batch):
        await _check_products(redis, repo, keys, chunk, report)
    await _check_pages(redis, repo, keys, report)
    return report


async def _scan(redis: RedisClient, pattern: str, batch: int) -> AsyncIterator[list[str]]:
    """Value keys matching ``pattern`` (leases skipped, SCAN's duplicates dropped), in chunks."""
    seen: set[str] = set()
    chunk: list[str] = []
    async for raw in keys_in_namespace(redis, pattern):
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
    expected = entry.pack_product(found.base, found.category_id, found.brand_id, 0, 0, 0)
    if entry.payload(cached) != entry.payload(expected):
        return "cached bytes differ from PostgreSQL"
    return None


async def _check_products(
    redis: RedisClient, repo: Repository, keys: Keys, chunk: list[str], report: Report
) -> None:
    values = await mget(redis, chunk)
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
    again = await mget(redis, [cached[pid][0] for pid in suspects])
    for pid, now in zip(suspects, again, strict=True):
        key, first = cached[pid]
        problem = _product_problem(first, loaded.get(pid))
        if now == first and problem is not None:
            kind = "negative" if first == NEGATIVE else "product"
            report.stale.append(Stale(kind, key, pid, problem))


async def _check_pages(redis: RedisClient, repo: Repository, keys: Keys, report: Report) -> None:
    async for chunk in _scan(redis, keys.page_pattern, BATCH):
        values = await mget(redis, chunk)
        for page_key, raw in zip(chunk, values, strict=True):
            if raw is None:
                continue  # invalidated or expired since the scan
            report.pages += 1
            try:
                await _check_page(redis, repo, keys, page_key, raw, report)
            except Exception as exc:
                if is_connection_error(exc):
                    raise
                # One entry that cannot be checked is set aside; the others still are.
                what = f"cannot be checked ({type(exc).__name__})"
                report.errors.append(Stale("page", page_key, "?", what))


async def _check_page(
    redis: RedisClient, repo: Repository, keys: Keys, page_key: str, raw: bytes, report: Report
) -> None:
    page = entry.unpack_page(entry.payload(raw))
    if await _page_problem(repo, keys, page_key, page) is None:
        return
    problem = await _page_problem(repo, keys, page_key, page)  # database, then Redis
    if problem is not None and await redis.get(page_key) == raw:
        report.stale.append(Stale("page", page_key, _describe(page), problem))


def _describe(page: entry.PageBody) -> str:
    return (
        f"category={page.category_id or '*'} brand={page.brand_id or '*'} "
        f"after={page.after_id!r} size={page.size}"
    )


async def _page_problem(
    repo: Repository, keys: Keys, page_key: str, page: entry.PageBody
) -> str | None:
    if keys.page(page.category_id, page.brand_id, page.after_id, page.size) != page_key:
        return "the entry's recorded request does not match its key"
    rows = await repo.list_page_ids(
        page.category_id or None, page.brand_id or None, page.after_id, page.size + 1
    )
    expected_next = rows[page.size - 1] if len(rows) > page.size else ""
    if rows[: page.size] != page.ids:
        return f"ids differ from PostgreSQL ({len(page.ids)} cached, {len(rows[: page.size])} now)"
    if expected_next != page.next_after_id:
        return f"next id differs ({page.next_after_id!r} cached, {expected_next!r} now)"
    return None


def render(report: Report, namespace: str) -> str:
    """The human-readable report ``catalog verify`` prints."""
    lines = [
        f"namespace {namespace!r}: {report.products} product entries ({report.negatives} "
        f"negative), {report.pages} list pages checked",
        f"stale: {len(report.stale)}",
    ]
    lines += [f"  {s.kind} {s.what}: {s.detail} [{s.key}]" for s in report.stale]
    if report.errors:
        lines.append(f"errors: {len(report.errors)}")
        lines += [f"  {s.kind} {s.detail} [{s.key!r}]" for s in report.errors]
    return "\n".join(lines)
