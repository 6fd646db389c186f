"""The read paths: cache-aside over :class:`CacheStore` with leases, single-flight, a breaker and
a PostgreSQL fallback. Values are serialized ``Product`` bytes, returned as they are.

Invariants:
* a read never fails because of Redis: any Redis error or an open breaker serves from PostgreSQL;
* a value is written only under a lease taken before its database read (no stale set);
* a reader waits for another's fill at most ``lease_wait_ms``, then loads without caching;
* one process sends one lease attempt per key at a time (single-flight).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from redis.exceptions import RedisError

from service import metrics
from service.cache import ttl
from service.cache.breaker import CircuitBreaker
from service.cache.singleflight import SingleFlight
from service.cache.store import CacheStore, FillItem
from service.keys import NEGATIVE, Keys, Tag
from service.repository import LoadedProduct, Repository
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
REDIS_FAILURES = (RedisError, OSError)

_HIT = {op: metrics.CACHE_REQUESTS.labels(op, "hit") for op in ("get", "batch", "list")}
_MISS = {op: metrics.CACHE_REQUESTS.labels(op, "miss") for op in ("get", "batch", "list")}
_NEG = {op: metrics.CACHE_REQUESTS.labels(op, "negative_hit") for op in ("get", "batch")}
_BYPASS = {op: metrics.CACHE_REQUESTS.labels(op, "bypass") for op in ("get", "batch", "list")}


@dataclass(frozen=True, slots=True)
class Page:
    """Products of one list page (serialized) and the id the next page starts after ("": last)."""

    products: list[bytes]
    next_after_id: str


class Reader:
    """Product, batch and page reads. ``store`` None means the cache is disabled."""

    def __init__(
        self,
        store: CacheStore | None,
        repo: Repository,
        keys: Keys,
        settings: Settings,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.store = store
        self.repo = repo
        self.keys = keys
        self.settings = settings
        self.breaker = breaker or CircuitBreaker(
            settings.breaker_failures, settings.breaker_reset_s
        )
        self._products: SingleFlight[bytes | None] = SingleFlight()
        self._pages: SingleFlight[None] = SingleFlight()
        self._rand = random.Random()

    # -- GetProduct ---------------------------------------------------------------------------

    async def get_product(self, product_id: str) -> bytes | None:
        """The product's bytes, or None when no product has this id."""
        store = self.store
        if store is not None and self.breaker.allow():
            key = self.keys.product(product_id)
            try:
                value = await store.get(key)
            except REDIS_FAILURES as exc:
                self._redis_failed(exc)
            else:
                self.breaker.success()
                if value:
                    _HIT["get"].inc()
                    return value
                if value is not None:
                    _NEG["get"].inc()
                    return None
                _MISS["get"].inc()
                return await self._products.do(key, lambda: self._fill_one(store, product_id))
        _BYPASS["get"].inc()
        return await self._load_one(product_id)

    async def _fill_one(self, store: CacheStore, product_id: str) -> bytes | None:
        key = self.keys.product(product_id)
        tag = self.keys.tag(Tag.product(product_id))
        try:
            acquired = await store.acquire([key], [[tag]])
        except REDIS_FAILURES as exc:
            self._redis_failed(exc)
            return await self._load_one(product_id)
        outcome = acquired.outcomes[0]
        if isinstance(outcome, bytes):
            return outcome or None
        if not outcome:
            metrics.LEASE_WAITS.inc()
            waited = await self._wait_for(store, key)
            return (waited or None) if waited is not None else await self._load_one(product_id)
        loaded = await self._load_leased(store, acquired.token, [key], [product_id])
        await self._fill(store, acquired.token, acquired.generation, loaded, [product_id])
        found = loaded.get(product_id)
        return found.data if found else None

    # -- BatchGetProducts ---------------------------------------------------------------------

    async def batch_get(self, ids: Sequence[str]) -> list[bytes | None]:
        """One result per id, in order (None: unknown id). One MGET, then one query for misses."""
        unique = list(dict.fromkeys(ids))
        store = self.store
        if store is not None and self.breaker.allow():
            try:
                values = await store.mget([self.keys.product(i) for i in unique])
            except REDIS_FAILURES as exc:
                self._redis_failed(exc)
            else:
                self.breaker.success()
                found = dict(zip(unique, values, strict=True))
                misses = [i for i, v in found.items() if v is None]
                _MISS["batch"].inc(len(misses))
                _HIT["batch"].inc(len(unique) - len(misses))
                if misses:
                    found.update(await self._resolve_misses(store, misses))
                return [found[i] or None for i in ids]
        _BYPASS["batch"].inc(len(unique))
        loaded = await self.repo.get_products(unique)
        return [p.data if (p := loaded.get(i)) else None for i in ids]

    async def _resolve_misses(self, store: CacheStore, ids: list[str]) -> dict[str, bytes | None]:
        """Load missing products in one query; fill those this call could lease."""
        keys = [self.keys.product(i) for i in ids]
        try:
            acquired = await store.acquire(keys, [[self.keys.tag(Tag.product(i))] for i in ids])
        except REDIS_FAILURES as exc:
            self._redis_failed(exc)
            loaded = await self.repo.get_products(ids)
            return {i: p.data if (p := loaded.get(i)) else None for i in ids}
        out: dict[str, bytes | None] = {}
        leased: list[str] = []
        to_load: list[str] = []
        for product_id, outcome in zip(ids, acquired.outcomes, strict=True):
            if isinstance(outcome, bytes):
                out[product_id] = outcome
            else:
                to_load.append(product_id)
                if outcome:
                    leased.append(product_id)
        if to_load:
            leased_keys = [self.keys.product(i) for i in leased]
            loaded = await self._load_leased(store, acquired.token, leased_keys, to_load)
            if leased:
                await self._fill(store, acquired.token, acquired.generation, loaded, leased)
            for product_id in to_load:
                p = loaded.get(product_id)
                out[product_id] = p.data if p else None
        return out

    # -- ListProducts -------------------------------------------------------------------------

    async def list_page(
        self, category_id: str, brand_id: str, after_id: str, page_size: int
    ) -> Page:
        """A page of products ordered by id; "" filters mean any."""
        store = self.store
        if store is not None and self.breaker.allow():
            page_key = self.keys.page(category_id, brand_id, after_id, page_size)
            try:
                reply = await store.assemble_page(page_key)
                if reply is None:
                    _MISS["list"].inc()
                    await self._pages.do(
                        page_key,
                        lambda: self._fill_page(
                            store, page_key, category_id, brand_id, after_id, page_size
                        ),
                    )
                    reply = await store.assemble_page(page_key)
                else:
                    _HIT["list"].inc()
            except REDIS_FAILURES as exc:
                self._redis_failed(exc)
            else:
                self.breaker.success()
                if reply is not None:
                    return await self._complete_page(store, reply)
        else:
            _BYPASS["list"].inc()
        rows = await self.repo.list_page(
            category_id or None, brand_id or None, after_id, page_size + 1
        )
        next_after = rows[page_size - 1].id if len(rows) > page_size else ""
        return Page([p.data for p in rows[:page_size]], next_after)

    async def _fill_page(
        self,
        store: CacheStore,
        page_key: str,
        category_id: str,
        brand_id: str,
        after_id: str,
        page_size: int,
    ) -> None:
        """Make the page entry exist, or give up (the caller then reads PostgreSQL)."""
        tags = [self.keys.tag(t) for t in _page_tags(category_id, brand_id)]
        acquired = await store.acquire([page_key], [tags])
        outcome = acquired.outcomes[0]
        if isinstance(outcome, bytes):
            return
        if not outcome:
            metrics.LEASE_WAITS.inc()
            await self._wait_for(store, page_key)
            return
        ids = await self._load_leased_ids(
            store, acquired.token, page_key, category_id, brand_id, after_id, page_size
        )
        next_after = ids[page_size - 1] if len(ids) > page_size else ""
        entry = (next_after + "\n" + ",".join(ids[:page_size])).encode()
        item = FillItem(page_key, entry, self._ttl(self.settings.page_ttl_s), tags)
        if not (await store.fill(acquired.token, acquired.generation, [item]))[0]:
            metrics.FILL_REFUSED.inc()

    async def _load_leased_ids(
        self,
        store: CacheStore,
        token: str,
        page_key: str,
        category_id: str,
        brand_id: str,
        after_id: str,
        page_size: int,
    ) -> list[str]:
        return await self._releasing(
            store,
            token,
            [page_key],
            self.repo.list_page_ids(category_id or None, brand_id or None, after_id, page_size + 1),
        )

    async def _complete_page(self, store: CacheStore, reply: list[bytes | None]) -> Page:
        head, _, id_list = (reply[0] or b"").partition(b"\n")
        values = reply[1:]
        if None in values:
            ids = id_list.decode().split(",")
            missing = [ids[n] for n, v in enumerate(values) if v is None]
            loaded = await self._resolve_misses(store, missing)
            values = [v if v is not None else loaded[ids[n]] for n, v in enumerate(values)]
        # A product deleted after the page was cached is skipped; its event voids the page.
        return Page([v for v in values if v], head.decode())

    # -- shared pieces ------------------------------------------------------------------------

    async def _load_one(self, product_id: str) -> bytes | None:
        found = (await self.repo.get_products([product_id])).get(product_id)
        return found.data if found else None

    async def _load_leased(
        self, store: CacheStore, token: str, leased_keys: list[str], ids: list[str]
    ) -> dict[str, LoadedProduct]:
        return await self._releasing(store, token, leased_keys, self.repo.get_products(ids))

    async def _releasing(
        self, store: CacheStore, token: str, leased_keys: list[str], load: Awaitable[T]
    ) -> T:
        """Await a database load; if it fails, release our leases so waiters stop waiting."""
        try:
            return await load
        except BaseException:
            try:
                await store.release(token, leased_keys)
            except REDIS_FAILURES as exc:
                self._redis_failed(exc)
            raise

    async def _fill(
        self,
        store: CacheStore,
        token: str,
        generation: bytes,
        loaded: dict[str, LoadedProduct],
        leased: list[str],
    ) -> None:
        now = datetime.now(UTC)
        items = [self._product_item(i, loaded.get(i), now) for i in leased]
        try:
            written = await store.fill(token, generation, items)
        except REDIS_FAILURES as exc:
            self._redis_failed(exc)
            return
        refused = written.count(False)
        if refused:
            metrics.FILL_REFUSED.inc(refused)

    def _product_item(self, product_id: str, p: LoadedProduct | None, now: datetime) -> FillItem:
        key = self.keys.product(product_id)
        tag = self.keys.tag(Tag.product(product_id))
        if p is None:
            return FillItem(key, NEGATIVE, self._ttl(self.settings.negative_ttl_s), [tag])
        cat, brand = Tag.category(p.category_id), Tag.brand(p.brand_id)
        tags = [tag, self.keys.tag(cat), self.keys.tag(brand)]
        ttl_ms = ttl.capped_ms(self._ttl(self.settings.product_ttl_s), p.price_changes_at, now)
        return FillItem(key, p.data, ttl_ms, tags)

    def _ttl(self, seconds: float) -> int:
        return ttl.jittered_ms(seconds, self.settings.ttl_jitter, self._rand)

    async def _wait_for(self, store: CacheStore, key: str) -> bytes | None:
        """Poll for another reader's fill, at most lease_wait_ms; None if it did not come."""
        poll = self.settings.lease_poll_ms / 1000.0
        deadline = time.monotonic() + self.settings.lease_wait_ms / 1000.0
        while time.monotonic() < deadline:
            await asyncio.sleep(poll)
            try:
                value = await store.get(key)
            except REDIS_FAILURES as exc:
                self._redis_failed(exc)
                return None
            if value is not None:
                return value
        return None

    def _redis_failed(self, exc: BaseException) -> None:
        metrics.REDIS_ERRORS.inc()
        was_open = self.breaker.is_open
        self.breaker.failure()
        if self.breaker.is_open and not was_open:
            log.warning("Redis failing (%s); serving from PostgreSQL for now", type(exc).__name__)


def _page_tags(category_id: str, brand_id: str) -> list[Tag]:
    tags = []
    if category_id:
        tags.append(Tag.list_category(category_id))
    if brand_id:
        tags.append(Tag.list_brand(brand_id))
    return tags or [Tag.list_all()]
