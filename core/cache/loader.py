"""Lease-protected loads from PostgreSQL into the cache: misses, refreshes and write-throughs.

Every database read here happens under a lease taken *before* it (ACQUIRE), and every write is a
FILL that the store refuses if the lease was voided, the name generation moved or a newer version
is already cached. A failed load releases its leases so waiters stop waiting.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Literal, TypeVar

from redis.exceptions import RedisError

from core import metrics
from core.cache import entry, ttl
from core.cache.store import Acquired, CacheStore, FillItem
from core.keys import NEGATIVE, Keys, Tag
from core.repository import LoadedProduct, Repository
from core.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
REDIS_FAILURES = (RedisError, OSError)
Mode = Literal["miss", "refresh", "force"]
# fill_page's answer for a page with no products: nothing was cached (no entry is ever empty).
EMPTY_PAGE = b""


def page_tags(category_id: str, brand_id: str) -> list[Tag]:
    """The tags a page depends on, known before its database read."""
    tags = []
    if category_id:
        tags.append(Tag.list_category(category_id))
    if brand_id:
        tags.append(Tag.list_brand(brand_id))
    return tags or [Tag.list_all()]


class Loader:
    """Builds entries (TTLs, headers, tags) and loads them under leases."""

    def __init__(
        self,
        store: CacheStore,
        repo: Repository,
        keys: Keys,
        settings: Settings,
        on_redis_error: Callable[[BaseException], None],
    ) -> None:
        self.store = store
        self.repo = repo
        self.keys = keys
        self.settings = settings
        self.on_redis_error = on_redis_error
        self._rand = random.Random()

    async def acquire_products(self, ids: Sequence[str], mode: Mode) -> Acquired:
        """Lease product entries. They are registered in no tag set: the one member of a
        ``product:<id>`` tag is derivable, and INVALIDATE voids it even where no set exists, so
        an unknown id costs one key (its negative entry), not two."""
        keys = [self.keys.product(i) for i in ids]
        return await self.store.acquire(keys, [[] for _ in ids], mode)

    async def load_products(
        self, acquired: Acquired, leased: list[str], others: Sequence[str] = ()
    ) -> dict[str, LoadedProduct]:
        """Read ``leased`` and ``others`` in one query; fill the leased ones."""
        loaded, _ = await self._load_and_fill(acquired, leased, others, strict=False)
        return loaded

    async def _load_and_fill(
        self, acquired: Acquired, leased: list[str], others: Sequence[str], *, strict: bool
    ) -> tuple[dict[str, LoadedProduct], list[bool]]:
        """The products read, and per leased id whether its fill was written. A failed fill
        (Redis error) raises only when ``strict``: the write-through must know."""
        leased_keys = [self.keys.product(i) for i in leased]
        started = time.perf_counter()
        loaded = await self._releasing(
            acquired.token, leased_keys, self.repo.get_products([*leased, *others])
        )
        load_ms = max(1, round((time.perf_counter() - started) * 1000))
        written: list[bool] = []
        if leased:
            now = datetime.now(UTC)
            items = [self._product_item(i, loaded.get(i), now, load_ms) for i in leased]
            written = await self._fill(acquired, items, strict=strict)
        return loaded, written

    async def refresh_product(self, product_id: str, mode: Mode = "refresh") -> None:
        """Reload one product under a lease (stale-while-revalidate, or a write-through)."""
        acquired = await self.acquire_products([product_id], mode)
        if acquired.outcomes == [True]:
            metrics.REFRESHES.labels("product").inc()
            await self.load_products(acquired, [product_id])

    async def write_through(self, product_id: str) -> bytes | None:
        """Cache the committed product under a forcing lease (voiding fills in flight). If the
        fill is refused (a newer version is cached, or an overlapping write-through took the
        lease over), an entry older than what was read is deleted, so until the other write
        lands readers miss rather than see the old version. Returns the product read, or None."""
        acquired = await self.acquire_products([product_id], "force")
        loaded, written = await self._load_and_fill(acquired, [product_id], (), strict=True)
        found = loaded.get(product_id)
        if found is not None and written == [False]:
            await self.store.drop_older(self.keys.product(product_id), found.version)
        return found.data if found else None

    async def forget(self, product_id: str) -> None:
        """Delete a product entry whose write-through failed: a miss beats stale data."""
        try:
            await self.store.redis.delete(self.keys.product(product_id))
        except REDIS_FAILURES as exc:
            self.on_redis_error(exc)

    async def fill_page(
        self, page_key: str, category_id: str, brand_id: str, after_id: str, size: int, mode: Mode
    ) -> bytes | bool:
        """Lease and load a page's ids. Returns the entry found (miss mode), or whether this call
        held the lease (it then wrote the page, unless the fill was refused). An empty page is
        not cached (a filter naming no category or brand must leave no key): it returns
        ``EMPTY_PAGE`` and drops its lease and tag registrations."""
        tags = [self.keys.tag(t) for t in page_tags(category_id, brand_id)]
        acquired = await self.store.acquire([page_key], [tags], mode)
        outcome = acquired.outcomes[0]
        if not outcome or isinstance(outcome, bytes):
            return outcome
        started = time.perf_counter()
        ids = await self._releasing(
            acquired.token,
            [page_key],
            self.repo.list_page_ids(category_id or None, brand_id or None, after_id, size + 1),
        )
        if not ids:
            await self.store.abandon(acquired.token, page_key, tags)
            return EMPTY_PAGE
        load_ms = max(1, round((time.perf_counter() - started) * 1000))
        next_after = ids[size - 1] if len(ids) > size else ""
        body = entry.PageBody(next_after, ids[:size], category_id, brand_id, after_id, size)
        fresh_ms, ttl_ms = self._ttls(self.settings.page_ttl_s, self.settings.page_stale_s, None)
        data = entry.pack(entry.pack_page(body), 0, fresh_ms, load_ms)
        await self._fill(acquired, [FillItem(page_key, data, ttl_ms, tags)])
        return True

    def _product_item(
        self, product_id: str, p: LoadedProduct | None, now: datetime, load_ms: int
    ) -> FillItem:
        key = self.keys.product(product_id)
        tag = self.keys.tag(Tag.product(product_id))
        if p is None:
            negative_ms = ttl.jittered_ms(self.settings.negative_ttl_s, self.settings.ttl_jitter)
            return FillItem(key, NEGATIVE, negative_ms, [])  # its tag is derivable (see above)
        tags = [
            tag,
            self.keys.tag(Tag.category(p.category_id)),
            self.keys.tag(Tag.brand(p.brand_id)),
        ]
        fresh_ms, ttl_ms = self._ttls(
            self.settings.product_ttl_s, self.settings.product_stale_s, p.price_changes_at, now
        )
        return FillItem(
            key, entry.pack(p.data, p.version, fresh_ms, load_ms), ttl_ms, tags, p.version
        )

    def _ttls(
        self,
        ttl_s: float,
        stale_s: float,
        changes_at: datetime | None,
        now: datetime | None = None,
    ) -> tuple[int, int]:
        """(logical expiry as epoch ms, physical TTL in ms). A price boundary caps both: a
        price is never served, fresh or stale, past the instant its rule starts or ends."""
        fresh = ttl.jittered_ms(ttl_s, self.settings.ttl_jitter, self._rand)
        physical = fresh + int(stale_s * 1000)
        if changes_at is not None:
            now = now or datetime.now(UTC)
            fresh = ttl.capped_ms(fresh, changes_at, now)
            physical = ttl.capped_ms(physical, changes_at, now)
        return int(time.time() * 1000) + fresh, physical

    async def _fill(
        self, acquired: Acquired, items: list[FillItem], strict: bool = False
    ) -> list[bool]:
        """Per item, whether it was written ([] after a Redis error, unless ``strict``)."""
        try:
            written = await self.store.fill(acquired.token, acquired.generation, items)
        except REDIS_FAILURES as exc:
            self.on_redis_error(exc)
            if strict:
                raise
            return []
        refused = written.count(False)
        if refused:
            metrics.FILL_REFUSED.inc(refused)
        return written

    async def _releasing(self, token: str, leased_keys: list[str], load: Awaitable[T]) -> T:
        """Await a database load; if it fails, release our leases so waiters stop waiting."""
        try:
            return await load
        except BaseException:
            try:
                await self.store.release(token, leased_keys)
            except REDIS_FAILURES as exc:
                self.on_redis_error(exc)
            raise
