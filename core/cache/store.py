"""Redis I/O of the cache: reads, leases, fills and invalidation, each one script per hash slot.

This class has no policy: no breaker, no retries, no fallback. The read path
(``core.cache.reader``) adds those; the invalidator calls :meth:`CacheStore.invalidate`
directly and must see every error, because an invalidation that silently did nothing would leave
stale data behind.

Every script call goes through :meth:`CacheStore._eval`, and every call that takes several
entries first splits them with :func:`slot_groups`: one group per hash slot when ``per_slot``
(Redis Cluster, groups sent concurrently), one group for everything otherwise, so a batch keeps
its single round trip on one Redis.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from redis.crc import key_slot

from core.cache import scripts
from core.keys import LEASE_SUFFIX, Keys, Tag
from core.redisclient import RedisClient, is_cluster, mget
from core.redisscript import Script

# ACQUIRE's per-entry outcome: the value already cached, or whether this call got the lease.
Outcome = bytes | bool
Mode = Literal["miss", "refresh", "force"]
# INVALIDATE_PAGES rounds before giving up (each round deletes what the previous one found; only
# ACQUIREs racing the invalidation add members, so more than a few rounds means a flood).
MAX_PAGE_ROUNDS = 100

# One Script per source, shared by every store and client (loaded on every primary of a cluster).
ACQUIRE = Script(scripts.ACQUIRE)
FILL = Script(scripts.FILL)
RELEASE = Script(scripts.RELEASE)
ABANDON = Script(scripts.ABANDON)
DROP_OLDER = Script(scripts.DROP_OLDER)
INVALIDATE_PRODUCTS = Script(scripts.INVALIDATE_PRODUCTS)
INVALIDATE_PAGES = Script(scripts.INVALIDATE_PAGES)
REGISTER = Script(scripts.REGISTER)


def slot_groups(first_keys: Sequence[str], per_slot: bool) -> list[list[int]]:
    """Indexes of the entries whose first keys are given, grouped by Redis Cluster hash slot
    (groups and members in first-seen order). Without ``per_slot``, one group of all of them.

    Every key of one entry shares its first key's slot (core/keys.py), so one script per group
    never touches two slots."""
    if not per_slot:
        return [list(range(len(first_keys)))] if first_keys else []
    groups: dict[int, list[int]] = {}
    for i, key in enumerate(first_keys):
        groups.setdefault(key_slot(key.encode()), []).append(i)
    return list(groups.values())


@dataclass(frozen=True, slots=True)
class Acquired:
    """Result of one ACQUIRE: the lease token and one outcome per key."""

    token: str
    outcomes: list[Outcome]


@dataclass(frozen=True, slots=True)
class FillItem:
    """A value to write under a lease; ``pages`` is a page's filter page set ("" for a
    product, which is in no set)."""

    key: str
    data: bytes
    ttl_ms: int
    pages: str = ""
    version: int = 0


class CacheStore:
    """Atomic cache operations over one Redis or a Redis Cluster (``redis``, any client of
    :mod:`core.redisclient`). ``per_slot`` (default: whether ``redis`` is a cluster client)
    splits every batch into one script per hash slot."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        *,
        lease_ttl_ms: int,
        tag_margin_ms: int,
        per_slot: bool | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.lease_ttl_ms = lease_ttl_ms
        self.tag_margin_ms = tag_margin_ms
        self.cluster = is_cluster(redis)
        self.per_slot = self.cluster if per_slot is None else per_slot

    # -- the one place scripts run -----------------------------------------------------------

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script whose keys all share one hash slot (on a cluster, on its primary)."""
        return await script(self.redis, keys, args)

    async def _grouped(
        self,
        script: Script,
        entry_keys: Sequence[Sequence[str]],
        entry_args: Sequence[Sequence[Any]],
        head_args: Sequence[Any],
    ) -> list[tuple[list[int], Any]]:
        """Run ``script`` once per slot group of the entries (KEYS and ARGV are the entries'
        concatenated, ARGV after ``head_args``), concurrently. Returns (entry indexes, reply)
        per group."""
        groups = slot_groups([k[0] for k in entry_keys], self.per_slot)

        def call(group: list[int]) -> tuple[list[str], list[Any]]:
            keys = [k for i in group for k in entry_keys[i]]
            return keys, [*head_args, *(a for i in group for a in entry_args[i])]

        if len(groups) == 1:
            return [(groups[0], await self._eval(script, *call(groups[0])))]
        if self.cluster:  # one pipeline: a request per node, not one per slot
            replies = await self._eval_many(script, [call(g) for g in groups])
            return list(zip(groups, replies, strict=True))

        async def run(group: list[int]) -> tuple[list[int], Any]:
            return group, await self._eval(script, *call(group))

        return list(await asyncio.gather(*(run(g) for g in groups)))

    async def _eval_many(
        self, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Several calls of one script, each within one slot: one pipeline per node on a
        cluster (:meth:`core.redisscript.Script.many`)."""
        return await script.many(self.redis, calls)

    # -- reads -------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        return cast(bytes | None, await self.redis.get(key))

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """One MGET on one Redis; one per slot on a cluster (concurrent, not atomic across
        slots), values in the order of ``keys``."""
        return await mget(self.redis, list(keys)) if keys else []

    async def peek(self, key: str) -> tuple[bytes | None, bool]:
        """The value and whether its lease is held, in one round trip (one hash slot)."""
        value, lease = await self.redis.mget([key, key + LEASE_SUFFIX])
        return cast(bytes | None, value), lease is not None

    # -- leases and fills --------------------------------------------------------------------

    async def acquire(
        self, keys: Sequence[str], mode: Mode = "miss", sets: Sequence[str] | None = None
    ) -> Acquired:
        """Take a lease per key (see ACQUIRE for ``mode``); ``sets``, one per key, are the
        pages' filter page sets the keys join in the same step."""
        token = secrets.token_hex(8)
        if not keys:
            return Acquired(token, [])
        nsets = 0 if sets is None else 1
        entry_keys = [
            (key, key + LEASE_SUFFIX) if sets is None else (key, key + LEASE_SUFFIX, sets[i])
            for i, key in enumerate(keys)
        ]
        if sets is not None and len(sets) != len(keys):
            raise ValueError("one set per key")
        # The page set must outlive the lease so the invalidation can still find the page.
        set_ttl = self.lease_ttl_ms + self.tag_margin_ms
        replies = await self._grouped(
            ACQUIRE,
            entry_keys,
            [() for _ in keys],
            [token, self.lease_ttl_ms, set_ttl, nsets, mode],
        )
        outcomes: list[Outcome] = [False] * len(keys)
        for group, reply in replies:
            for i, r in zip(group, reply, strict=True):
                outcomes[i] = r if isinstance(r, bytes) else r == 1
        return Acquired(token, outcomes)

    async def fill(self, token: str, items: Sequence[FillItem]) -> list[bool]:
        """Write each item if its lease is still ``token``'s; False where it was refused."""
        if not items:
            return []
        entry_keys = [
            (i.key, i.key + LEASE_SUFFIX, i.pages) if i.pages else (i.key, i.key + LEASE_SUFFIX)
            for i in items
        ]
        entry_args = [(1 if i.pages else 0, i.ttl_ms, i.version, i.data) for i in items]
        replies = await self._grouped(FILL, entry_keys, entry_args, [token, self.tag_margin_ms])
        written = [False] * len(items)
        for group, reply in replies:
            for i, r in zip(group, reply, strict=True):
                written[i] = r == 1
        return written

    async def drop_older(self, key: str, version: int) -> bool:
        """Delete ``key`` if the entry there is older than ``version``."""
        return bool(await self._eval(DROP_OLDER, [key], [version]))

    async def release(self, token: str, keys: Sequence[str]) -> int:
        """Drop leases still held by ``token`` (a failed load), so waiters stop waiting."""
        if not keys:
            return 0
        replies = await self._grouped(
            RELEASE, [(k + LEASE_SUFFIX,) for k in keys], [() for _ in keys], [token]
        )
        return sum(int(n) for _, n in replies)

    async def abandon(self, token: str, key: str, pages: str) -> bool:
        """Drop a lease still held by ``token`` and the page's membership in its filter's page
        set: the load cached nothing, so it leaves no key behind."""
        return bool(await self._eval(ABANDON, [key + LEASE_SUFFIX, pages, key], [token]))

    async def register(self, members: Sequence[tuple[str, str]], ttl_ms: int) -> None:
        """Add each (registry set, member) and raise the set's TTL to ``ttl_ms``. Awaited before
        the ACQUIRE of a combined filter's page, hence before its database read."""
        if members:
            await self._grouped(
                REGISTER, [(s,) for s, _ in members], [(m,) for _, m in members], [ttl_ms]
            )

    # -- invalidation ------------------------------------------------------------------------

    async def invalidate(
        self, tags: Iterable[Tag], min_versions: Mapping[Tag, int] | None = None
    ) -> int:
        """Void every cached value that depends on ``tags`` and the leases of fills in flight.

        Product tags void the product's entry and lease (``min_versions``, from events that carry
        the product's new version, keeps an entry already cached at that version or newer: a
        write-through that arrived first). List tags void every page of their filters, found in
        the filters' page sets and, for a category or brand, in its registry of combined filters.
        Category and brand tags (renames) change no cached value: they are announced on the names
        channel after everything else, and every process drops that name. Returns the number of
        keys (values and leases) deleted.
        """
        tag_list = list(tags)
        versions = min_versions or {}
        products = [(t.product_id, versions.get(t, 0)) for t in tag_list if t.product_id]
        filters = [f for t in tag_list if (f := t.list_filter) is not None]
        renamed = [m for t in tag_list if (m := t.renamed)]
        counts = await asyncio.gather(
            self._invalidate_product_entries(products), self._invalidate_filters(filters)
        )
        if renamed:
            await self._announce(renamed)
        return sum(counts)

    async def _invalidate_product_entries(self, products: Sequence[tuple[str, int]]) -> int:
        if not products:
            return 0
        keys = [self.keys.product(pid) for pid, _ in products]
        replies = await self._grouped(
            INVALIDATE_PRODUCTS,
            [(k, k + LEASE_SUFFIX) for k in keys],
            [(v,) for _, v in products],
            [],
        )
        return sum(int(n) for _, n in replies)

    async def _invalidate_filters(self, filters: Sequence[tuple[str, str]]) -> int:
        """Void every page of ``filters`` (``(c, "")`` / ``("", b)`` include every combined
        filter ``(c, b)`` found in the category's / brand's registry)."""
        if not filters:
            return 0
        wanted = dict.fromkeys(filters)
        # (c, *) and (*, b) also stand for every (c, b) in the category's or brand's registry.
        lookups = [
            (c, b, self.keys.category_registry(c) if c else self.keys.brand_registry(b))
            for c, b in wanted
            if bool(c) != bool(b)
        ]
        found = await self._smembers([registry for _, _, registry in lookups])
        for (c, b, _), registered in zip(lookups, found, strict=True):
            for m in registered:
                other = m.decode()
                wanted[(c, other) if c else (other, b)] = None
        sets = [self.keys.pages(c, b) for c, b in wanted]
        members = await self._smembers(sets)
        pending = {s: [m.decode() for m in ms] for s, ms in zip(sets, members, strict=True) if ms}
        deleted, rounds = 0, 0
        while pending:
            rounds += 1
            if rounds > MAX_PAGE_ROUNDS:
                raise RuntimeError(f"page sets kept growing for {MAX_PAGE_ROUNDS} rounds")
            order = list(pending)
            replies = await self._grouped(
                INVALIDATE_PAGES,
                [(s, *(k for p in pending[s] for k in (p, p + LEASE_SUFFIX))) for s in order],
                [(len(pending[s]),) for s in order],
                [],
            )
            pending = {}
            for group, reply in replies:
                deleted += int(reply[0])
                at = 1
                for i in group:
                    n = int(reply[at])
                    if n:
                        pending[order[i]] = [m.decode() for m in reply[at + 1 : at + 1 + n]]
                    at += 1 + n
        return deleted

    async def _smembers(self, sets: Sequence[str]) -> list[list[bytes]]:
        """SMEMBERS of each set, in one round trip on one Redis and one per node on a cluster (a
        pipeline, not a transaction: each set is read atomically, and nothing here needs them
        read at one instant)."""
        if not sets:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for s in sets:
                pipe.smembers(s)
            replies = await pipe.execute()
        return [list(r) for r in replies]

    async def _announce(self, renamed: Sequence[str]) -> None:
        """Publish each rename (``c:<id>`` / ``b:<id>``) on the names channel. On a cluster a
        PUBLISH on any node reaches the subscribers of every node; each is sent on its own."""
        if self.cluster:
            for message in renamed:
                await self.redis.publish(self.keys.names_channel, message)
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for message in renamed:
                pipe.publish(self.keys.names_channel, message)
            await pipe.execute()
