"""The read paths: cache-aside over :class:`CacheStore` with leases, single-flight,
stale-while-revalidate, a breaker and a PostgreSQL fallback.

Invariants:
* a read never fails because of Redis: any Redis error or an open breaker serves from PostgreSQL;
* a value is written only under a lease taken before its database read (no stale set);
* a reader waits for another's fill at most ``lease_wait_ms``, then loads without caching; if
  the lease disappears with no value (a refused fill), it takes the lease itself at once;
* one process sends one lease attempt per key at a time (single-flight);
* an entry past its logical expiry (or picked by XFetch) is still served, and one background
  refresh per key reloads it; an invalidated entry is gone, never served stale;
* a cached product is served as its stored bytes followed by its category's and brand's name
  fragments from the name table (core/cache/names.py), and a product read from PostgreSQL with
  the fragments of the names it read: both paths answer with the same bytes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from core import deadlines, metrics
from core.cache import entry
from core.cache.breaker import CircuitBreaker
from core.cache.loader import EMPTY_PAGE, REDIS_FAILURES, Loader
from core.cache.names import NameTable
from core.cache.near import NearCache
from core.cache.singleflight import SingleFlight
from core.cache.store import CacheStore
from core.keys import Keys
from core.repository import Repository
from core.settings import Settings

log = logging.getLogger(__name__)
_H = entry.HEADER_LEN

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
        names: NameTable | None = None,
        near: NearCache | None = None,
    ) -> None:
        """``names`` defaults to a table of this reader's own; a process follows its renames
        with :meth:`NameTable.follow` (service.app). ``near``: the near cache, kept in step by
        :class:`core.cache.tracking.Tracking` (service.app); None: off."""
        self.store = store
        self.repo = repo
        self.keys = keys
        self.settings = settings
        self.breaker = breaker or CircuitBreaker(
            settings.breaker_failures, settings.breaker_reset_s
        )
        self.names = names if names is not None else NameTable(repo.get_names, settings.name_ttl_ms)
        self.near = near if store is not None else None
        self.loader = (
            Loader(store, repo, keys, settings, self._redis_failed, self.names)
            if store is not None
            else None
        )
        self._products: SingleFlight[bytes | None] = SingleFlight()
        self._pages: SingleFlight[bool] = SingleFlight()
        self._refreshes: SingleFlight[None] = SingleFlight()
        self._rand = random.Random()

    # -- GetProduct ---------------------------------------------------------------------------

    async def get_product(self, product_id: str) -> bytes | None:
        """The product's bytes, or None when no product has this id."""
        loader = self.loader
        near = self.near
        key = self.keys.product(product_id) if loader is not None else ""
        if near is not None:
            held = near.get(key)
            if held is not None:
                return self.names.complete(held) or await self._product_of(held)
        if loader is not None and self.breaker.allow():
            try:
                if near is None:
                    value = await loader.store.get(key)
                else:
                    value = await self._get_through(near, loader.store, key)
            except REDIS_FAILURES as exc:
                self._redis_failed(exc)
            else:
                self.breaker.success()
                if value:
                    _HIT["get"].inc()
                    self._refresh_product_if_due(product_id, value)
                    return self.names.complete(value) or (await self._with_names({"": value}))[""]
                if value is not None:
                    _NEG["get"].inc()
                    return None
                _MISS["get"].inc()
                return await self._products.do(key, lambda: self._fill_one(loader, product_id))
        _BYPASS["get"].inc()
        found = (await self.repo.get_products([product_id])).get(product_id)
        return found.data if found else None

    async def _fill_one(self, loader: Loader, product_id: str) -> bytes | None:
        deadline: float | None = None
        while True:
            try:
                acquired = await loader.acquire_products([product_id], "miss")
            except REDIS_FAILURES as exc:
                self._redis_failed(exc)
                break
            outcome = acquired.outcomes[0]
            if isinstance(outcome, bytes):
                return await self._product_of(outcome)
            if outcome:
                found = (await loader.load_products(acquired, [product_id])).get(product_id)
                return found.data if found else None
            metrics.LEASE_WAITS.inc()
            deadline = deadline or self._wait_deadline()
            waited = await self._wait_for(loader.store, self.keys.product(product_id), deadline)
            if isinstance(waited, bytes):
                return await self._product_of(waited)
            if not waited:
                break
            # True: the lease is gone and no value came; lease it ourselves at once.
        found = (await self.repo.get_products([product_id])).get(product_id)
        return found.data if found else None

    # -- BatchGetProducts ---------------------------------------------------------------------

    async def batch_get(self, ids: Sequence[str]) -> list[bytes | None]:
        """One result per id, in order (None: unknown id). One MGET, then one query for misses."""
        unique = list(dict.fromkeys(ids))
        loader = self.loader
        if loader is not None and self.breaker.allow():
            try:
                values = await self._mget_products(loader.store, unique)
            except REDIS_FAILURES as exc:
                self._redis_failed(exc)
            else:
                self.breaker.success()
                found = await self._cached_products(loader, unique, values, "batch")
                return [found[i] for i in ids]
        _BYPASS["batch"].inc(len(unique))
        loaded = await self.repo.get_products(unique)
        return [p.data if (p := loaded.get(i)) else None for i in ids]

    async def _cached_products(
        self, loader: Loader, ids: Sequence[str], values: Sequence[bytes | None], op: str
    ) -> dict[str, bytes | None]:
        """Each product of ``ids`` given its cached entry (None: not cached): named, None for
        negative entries, misses loaded in one query. Schedules due refreshes."""
        found: dict[str, bytes | None] = {}
        cached: dict[str, bytes] = {}
        misses: list[str] = []
        for product_id, value in zip(ids, values, strict=True):
            if value:
                self._refresh_product_if_due(product_id, value)
                cached[product_id] = value
            elif value is not None:
                found[product_id] = None
            else:
                misses.append(product_id)
        if op != "list":
            _MISS[op].inc(len(misses))
            _HIT[op].inc(len(ids) - len(misses))
        if misses:
            found.update(await self._resolve_misses(loader, misses, cached))
        if cached:
            found.update(await self._with_names(cached))
        return found

    async def _resolve_misses(
        self, loader: Loader, ids: list[str], cached: dict[str, bytes]
    ) -> dict[str, bytes | None]:
        """Load missing products in one query; fill those this call could lease. Entries that
        appeared meanwhile go to ``cached`` (named by the caller)."""
        try:
            acquired = await loader.acquire_products(ids, "miss")
        except REDIS_FAILURES as exc:
            self._redis_failed(exc)
            loaded = await self.repo.get_products(ids)
            return {i: p.data if (p := loaded.get(i)) else None for i in ids}
        out: dict[str, bytes | None] = {}
        leased: list[str] = []
        held: list[str] = []
        for product_id, outcome in zip(ids, acquired.outcomes, strict=True):
            if isinstance(outcome, bytes):
                if outcome:
                    cached[product_id] = outcome
                else:
                    out[product_id] = None
            else:
                (leased if outcome else held).append(product_id)
        if leased or held:
            loaded = await loader.load_products(acquired, leased, held)
            for product_id in (*leased, *held):
                p = loaded.get(product_id)
                out[product_id] = p.data if p else None
        return out

    # -- the near cache ----------------------------------------------------------------------

    @staticmethod
    async def _get_through(near: NearCache, store: CacheStore, key: str) -> bytes | None:
        """GET ``key`` from Redis and offer the value to the near cache under a ticket taken
        before the read (core/cache/near.py: a racing invalidation voids it)."""
        ticket = near.ticket(key)
        value = None
        try:
            value = await store.get(key)
        finally:
            near.put(key, value, ticket)
        return value

    async def _mget_products(self, store: CacheStore, ids: Sequence[str]) -> list[bytes | None]:
        """The cached entries of ``ids`` (None: not cached): from the near cache where it serves
        them, the rest in one MGET (per slot on a cluster), offered to the near cache."""
        keys = [self.keys.product(i) for i in ids]
        near = self.near
        if near is None:
            return await store.mget(keys)
        values = [near.get(k) for k in keys]
        wanted = [n for n, v in enumerate(values) if v is None]
        if not wanted:
            return values
        missing = [keys[n] for n in wanted]
        tickets = [near.ticket(k) for k in missing]
        fetched: list[bytes | None] = []
        try:
            fetched = await store.mget(missing)
        finally:
            for n, key in enumerate(missing):
                near.put(key, fetched[n] if fetched else None, tickets[n])
        for n, value in zip(wanted, fetched, strict=True):
            values[n] = value
        return values

    # -- names ---------------------------------------------------------------------------------

    async def _with_names(self, values: dict[str, bytes]) -> dict[str, bytes]:
        """Cached product entries served with their names (byte concatenation, no decode),
        loading every missing name of the request in one query."""
        named = self.names.complete_all(values.values())
        if named is not None:
            return dict(zip(values, named, strict=True))
        parts = {k: entry.product_parts(v) for k, v in values.items()}
        categories, brands = await self.names.fragments(
            {c for c, _, _ in parts.values()}, {b for _, b, _ in parts.values()}
        )
        return {
            k: b"".join((values[k][start:], categories.get(c, b""), brands.get(b, b"")))
            for k, (c, b, start) in parts.items()
        }

    async def _product_of(self, value: bytes) -> bytes | None:
        """A product entry found while filling (ACQUIRE, or a watched fill): None if negative."""
        if not value:
            return None
        return self.names.complete(value) or (await self._with_names({"": value}))[""]

    # -- ListProducts -------------------------------------------------------------------------

    async def list_page(
        self, category_id: str, brand_id: str, after_id: str, page_size: int
    ) -> Page:
        """A page of products ordered by id; "" filters mean any."""
        loader = self.loader
        if loader is not None and self.breaker.allow():
            page_key = self.keys.page(category_id, brand_id, after_id, page_size)

            args = (page_key, category_id, brand_id, after_id, page_size)
            empty = False
            try:
                page = await loader.store.get(page_key)
                if page is None:
                    _MISS["list"].inc()
                    empty = await self._pages.do(page_key, lambda: self._fill_page(loader, *args))
                    if not empty:
                        page = await loader.store.get(page_key)
                else:
                    _HIT["list"].inc()
                    if self._due(page, self.settings.page_xfetch_beta):
                        refresh = self._quietly(lambda: loader.fill_page(*args, "refresh"))
                        self._refreshes.launch(page_key, refresh)
                ids, next_after = self._page_ids(page) if page else ([], "")
                values = await self._mget_products(loader.store, ids)
            except REDIS_FAILURES as exc:
                self._redis_failed(exc)
            else:
                self.breaker.success()
                if empty:
                    return Page([], "")
                if page is not None:
                    found = await self._cached_products(loader, ids, values, "list")
                    # A product deleted after the page was cached is skipped; its event voids
                    # the page.
                    return Page([p for i in ids if (p := found[i])], next_after)
        else:
            _BYPASS["list"].inc()
        rows = await self.repo.list_page(
            category_id or None, brand_id or None, after_id, page_size + 1
        )
        next_after = rows[page_size - 1].id if len(rows) > page_size else ""
        return Page([p.data for p in rows[:page_size]], next_after)

    async def _fill_page(
        self,
        loader: Loader,
        page_key: str,
        category_id: str,
        brand_id: str,
        after_id: str,
        page_size: int,
    ) -> bool:
        """Make the page entry exist, or give up (the caller then reads PostgreSQL). True when
        the page is empty: such pages are never cached."""
        args = (page_key, category_id, brand_id, after_id, page_size)
        got = await loader.fill_page(*args, "miss")
        deadline: float | None = None
        while got is False:
            metrics.LEASE_WAITS.inc()
            deadline = deadline or self._wait_deadline()
            if await self._wait_for(loader.store, page_key, deadline) is not True:
                return False  # the page came, or time ran out
            got = await loader.fill_page(*args, "miss")  # the lease is gone and no page came
        return got == EMPTY_PAGE

    @staticmethod
    def _page_ids(page: bytes) -> tuple[list[str], str]:
        """(ids, next after-id) of a page entry: between its first two newlines, and before."""
        head, _, rest = page[_H:].partition(b"\n")
        id_list = rest.partition(b"\n")[0]
        return (id_list.decode().split(",") if id_list else []), head.decode()

    # -- shared pieces ------------------------------------------------------------------------

    def _due(self, value: bytes, beta: float) -> bool:
        return entry.due(value, time.time() * 1000.0, beta, self._rand)

    def _refresh_product_if_due(self, product_id: str, value: bytes) -> None:
        """Start one background refresh if the entry is stale or XFetch picks it; the key is
        built only then, so a batch or page of fresh hits builds none."""
        if self._due(value, self.settings.product_xfetch_beta) and self.loader is not None:
            loader = self.loader
            self._refreshes.launch(
                self.keys.product(product_id),
                self._quietly(lambda: loader.refresh_product(product_id)),
            )

    def _quietly(self, fn: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
        """A background refresh: its failure is logged and counted, never raised to a reader."""

        async def run() -> None:
            try:
                await fn()
            except REDIS_FAILURES as exc:
                self._redis_failed(exc)
            except Exception as exc:
                log.warning("background refresh failed: %s", type(exc).__name__)

        return run

    def _wait_deadline(self) -> float:
        """When a lease wait gives up: after lease_wait_ms, and at most half the caller's time
        left (:mod:`core.deadlines`), so the PostgreSQL read it falls back to still fits."""
        return time.monotonic() + deadlines.wait_budget(self.settings.lease_wait_ms / 1000.0)

    async def _wait_for(self, store: CacheStore, key: str, deadline: float) -> bytes | bool:
        """Watch another reader's fill, the value and its lease, until ``deadline``.

        Returns the value once it is there; True when the lease is gone and no value came (the
        holder's fill was refused after an invalidation, or its load failed): the caller leases
        the key itself at once, as memcache's leases do, instead of sleeping out the wait and
        reading PostgreSQL uncached; False when time ran out or Redis failed.
        """
        poll = self.settings.lease_poll_ms / 1000.0
        while time.monotonic() < deadline:
            await asyncio.sleep(poll)
            try:
                value, leased = await store.peek(key)
            except REDIS_FAILURES as exc:
                self._redis_failed(exc)
                return False
            if value is not None:
                return value
            if not leased:
                return True
        return False

    def _redis_failed(self, exc: BaseException) -> None:
        metrics.REDIS_ERRORS.inc()
        was_open = self.breaker.is_open
        self.breaker.failure()
        if self.breaker.is_open and not was_open:
            log.warning("Redis failing (%s); serving from PostgreSQL for now", type(exc).__name__)
