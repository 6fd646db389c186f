"""Lease-protected loads from PostgreSQL into the cache: misses, refreshes and write-throughs.

Every database read here happens under a lease taken *before* it (ACQUIRE), and every write is a
FILL that the store refuses if the lease was voided or a newer version is already cached. A page
of a combined filter ``(c, b)`` is registered in the category's and the brand's registries
before its ACQUIRE, so an invalidation of ``(c, *)`` or ``(*, b)`` finds it. A failed load
releases its leases so waiters stop waiting. The names a product read returns are installed in
the process's name table under its epoch fence (core/cache/names.py); the cached entry holds
none.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from redis.exceptions import RedisError

from core import metrics
from core.cache import entry, ttl
from core.cache.names import NameTable
from core.cache.store import Acquired, CacheStore, FillItem, Mode
from core.keys import NEGATIVE, Keys
from core.repository import LoadedProduct, Names, Repository
from core.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
REDIS_FAILURES = (RedisError, OSError)
# fill_page's answer for a page with no products: nothing was cached (no entry is ever empty).
EMPTY_PAGE = b""


def names_of(products: Iterable[LoadedProduct]) -> Names:
    """The category and brand names read with these products."""
    names = Names({}, {})
    for p in products:
        names.categories[p.category_id] = p.category_name
        names.brands[p.brand_id] = p.brand_name
    return names


class Loader:
    """Builds entries (TTLs, headers) and loads them under leases."""

    def __init__(
        self,
        store: CacheStore,
        repo: Repository,
        keys: Keys,
        settings: Settings,
        on_redis_error: Callable[[BaseException], None],
        names: NameTable,
    ) -> None:
        self.store = store
        self.repo = repo
        self.keys = keys
        self.settings = settings
        self.on_redis_error = on_redis_error
        self.names = names
        self._rand = random.Random()
        # A registry outlives every page registered under it: lease, longest page life, margin.
        page_life_s = settings.page_ttl_s * (1 + settings.ttl_jitter) + settings.page_stale_s
        self.registry_ttl_ms = (
            settings.lease_ttl_ms + int(page_life_s * 1000) + int(settings.tag_ttl_margin_s * 1000)
        )

    async def acquire_products(self, ids: Sequence[str], mode: Mode) -> Acquired:
        """Lease product entries. They join no set: an event names the product, whose key is
        derivable, so an unknown id costs one key (its negative entry), not two."""
        return await self.store.acquire([self.keys.product(i) for i in ids], mode)

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
        epoch, loaded_at = self.names.epoch, self.names.now()  # both before the read
        started = time.perf_counter()
        loaded = await self._releasing(
            acquired.token, leased_keys, self.repo.get_products([*leased, *others])
        )
        load_ms = max(1, round((time.perf_counter() - started) * 1000))
        self.names.install(names_of(loaded.values()), epoch, loaded_at)
        written: list[bool] = []
        if leased:
            now = datetime.now(UTC)
            storable = [i for i in leased if self._storable(loaded.get(i))]
            items = [self._product_item(i, loaded.get(i), now, load_ms) for i in storable]
            written = await self._fill(acquired, items, strict=strict)
            if len(storable) < len(leased):
                # Served, not cached (see entry.storable_ids): free their leases for waiters.
                kept = dict(zip(storable, written, strict=False))  # written: [] after an error
                unstored = [self.keys.product(i) for i in leased if i not in kept]
                await self._release_quietly(acquired.token, unstored)
                written = [kept.get(i, False) for i in leased]
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
        pages = self.keys.pages(category_id, brand_id)
        if category_id and brand_id:
            if not await self.names.exist(category_id, brand_id):
                return EMPTY_PAGE  # matches nothing: no registry for ids a client made up
            # Before the ACQUIRE, hence before the read: an invalidation of (c, *) or (*, b)
            # that misses this registration ran before it, so before the read too.
            await self.store.register(
                [
                    (self.keys.category_registry(category_id), brand_id),
                    (self.keys.brand_registry(brand_id), category_id),
                ],
                self.registry_ttl_ms,
            )
        acquired = await self.store.acquire([page_key], mode, [pages])
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
            await self.store.abandon(acquired.token, page_key, pages)
            return EMPTY_PAGE
        load_ms = max(1, round((time.perf_counter() - started) * 1000))
        next_after = ids[size - 1] if len(ids) > size else ""
        body = entry.PageBody(next_after, ids[:size], category_id, brand_id, after_id, size)
        fresh_ms, ttl_ms = self._ttls(self.settings.page_ttl_s, self.settings.page_stale_s, None)
        data = entry.pack(entry.pack_page(body), 0, fresh_ms, load_ms)
        await self._fill(acquired, [FillItem(page_key, data, ttl_ms, pages)])
        return True

    @staticmethod
    def _storable(p: LoadedProduct | None) -> bool:
        return p is None or entry.storable_ids(p.category_id, p.brand_id)

    def _product_item(
        self, product_id: str, p: LoadedProduct | None, now: datetime, load_ms: int
    ) -> FillItem:
        key = self.keys.product(product_id)
        if p is None:
            negative_ms = ttl.jittered_ms(self.settings.negative_ttl_s, self.settings.ttl_jitter)
            return FillItem(key, NEGATIVE, negative_ms)
        fresh_ms, ttl_ms = self._ttls(
            self.settings.product_ttl_s, self.settings.product_stale_s, p.price_changes_at, now
        )
        data = entry.pack_product(p.base, p.category_id, p.brand_id, p.version, fresh_ms, load_ms)
        return FillItem(key, data, ttl_ms, version=p.version)

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
            written = await self.store.fill(acquired.token, items)
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
            await self._release_quietly(token, leased_keys)
            raise

    async def _release_quietly(self, token: str, leased_keys: list[str]) -> None:
        try:
            await self.store.release(token, leased_keys)
        except REDIS_FAILURES as exc:
            self.on_redis_error(exc)
