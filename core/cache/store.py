"""Redis I/O of the cache: reads, leases, fills and tag invalidation, one round trip each.

This class has no policy: no breaker, no retries, no fallback. The read path
(``core.cache.reader``) adds those; the invalidator calls :meth:`CacheStore.invalidate`
directly and must see every error, because an invalidation that silently did nothing would leave
stale data behind.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from redis.asyncio import Redis

from core.cache import entry, scripts
from core.keys import LEASE_SUFFIX, Keys, Tag

# ACQUIRE's per-entry outcome: the value already cached, or whether this call got the lease.
Outcome = bytes | bool


@dataclass(frozen=True, slots=True)
class Acquired:
    """Result of one ACQUIRE: the lease token, the name generation it saw, one outcome per key."""

    token: str
    generation: bytes
    outcomes: list[Outcome]


@dataclass(frozen=True, slots=True)
class FillItem:
    """A value to write under a lease, with every tag set it depends on."""

    key: str
    data: bytes
    ttl_ms: int
    tags: Sequence[str]
    version: int = 0


class CacheStore:
    """Atomic cache operations over one Redis client."""

    def __init__(self, redis: Redis, keys: Keys, *, lease_ttl_ms: int, tag_margin_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.lease_ttl_ms = lease_ttl_ms
        self.tag_margin_ms = tag_margin_ms
        self._acquire = redis.register_script(scripts.ACQUIRE)
        self._fill = redis.register_script(scripts.FILL)
        self._release = redis.register_script(scripts.RELEASE)
        self._abandon = redis.register_script(scripts.ABANDON)
        self._drop_older = redis.register_script(scripts.DROP_OLDER)
        self._invalidate = redis.register_script(scripts.INVALIDATE)
        self._assemble_page = redis.register_script(scripts.ASSEMBLE_PAGE)
        self._page_args: list[str | int] = [*keys.product_key_parts, entry.HEADER_LEN]

    async def get(self, key: str) -> bytes | None:
        return cast(bytes | None, await self.redis.get(key))

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return cast(list[bytes | None], await self.redis.mget(keys))

    async def peek(self, key: str) -> tuple[bytes | None, bool]:
        """The value and whether its lease is held, in one round trip (one hash slot)."""
        value, lease = await self.redis.mget([key, key + LEASE_SUFFIX])
        return cast(bytes | None, value), lease is not None

    async def acquire(
        self,
        keys: Sequence[str],
        tags: Sequence[Sequence[str]],
        mode: Literal["miss", "refresh", "force"] = "miss",
    ) -> Acquired:
        """Take a lease per key and register the key in its tags (see ACQUIRE for ``mode``).

        Every entry must have the same number of tags (ACQUIRE reads them as fixed groups).
        """
        ntags = len(tags[0]) if tags else 0
        script_keys = [self.keys.generation]
        for key, key_tags in zip(keys, tags, strict=True):
            if len(key_tags) != ntags:
                raise ValueError("every entry of one acquire needs the same number of tags")
            script_keys += (key, key + LEASE_SUFFIX, *key_tags)
        token = secrets.token_hex(8)
        # The tag set must outlive the lease so the invalidation can still find the key.
        tag_ttl = self.lease_ttl_ms + self.tag_margin_ms
        reply = await self._acquire(
            keys=script_keys, args=[token, self.lease_ttl_ms, tag_ttl, ntags, mode]
        )
        outcomes: list[Outcome] = [r if isinstance(r, bytes) else r == 1 for r in reply[1:]]
        return Acquired(token, reply[0], outcomes)

    async def fill(self, token: str, generation: bytes, items: Sequence[FillItem]) -> list[bool]:
        """Write each item if its lease is still ``token``'s; False where it was refused."""
        script_keys: list[str] = [self.keys.generation]
        args: list[Any] = [token, generation, self.tag_margin_ms]
        for item in items:
            script_keys += (item.key, item.key + LEASE_SUFFIX, *item.tags)
            args += (len(item.tags), item.ttl_ms, item.version, item.data)
        reply = await self._fill(keys=script_keys, args=args)
        return [r == 1 for r in reply]

    async def drop_older(self, key: str, version: int) -> bool:
        """Delete ``key`` if the entry there is older than ``version``."""
        return bool(await self._drop_older(keys=[key], args=[version]))

    async def release(self, token: str, keys: Sequence[str]) -> int:
        """Drop leases still held by ``token`` (a failed load), so waiters stop waiting."""
        if not keys:
            return 0
        n: int = await self._release(keys=[k + LEASE_SUFFIX for k in keys], args=[token])
        return n

    async def abandon(self, token: str, key: str, tags: Sequence[str]) -> bool:
        """Drop a lease still held by ``token`` and ``key``'s registration in ``tags``: the
        load cached nothing, so it leaves no key behind."""
        return bool(await self._abandon(keys=[key + LEASE_SUFFIX, *tags], args=[token, key]))

    async def invalidate(
        self, tags: Iterable[Tag], min_versions: Mapping[Tag, int] | None = None
    ) -> int:
        """Delete every key depending on ``tags`` and void their leases, atomically.

        Renames (category or brand tags) also bump the name generation, which refuses fills whose
        lease predates them: those fills read the old name and are not yet in any category or
        brand tag set. ``min_versions`` (from events that carry the product's new version) keeps
        an entry already cached at that version or newer: a write-through that arrived first.
        Returns the number of keys (values and leases) deleted.
        """
        tag_list = list(tags)
        if not tag_list:
            return 0
        bump = "1" if any(t.embeds_name for t in tag_list) else "0"
        script_keys = [self.keys.generation, *(self.keys.tag(t) for t in tag_list)]
        versions = min_versions or {}
        args: list[str | int] = [bump, LEASE_SUFFIX, self.tag_margin_ms]
        for t in tag_list:
            args += (versions.get(t, 0), self.keys.product(t.product_id) if t.product_id else "")
        n: int = await self._invalidate(keys=script_keys, args=args)
        return n

    async def assemble_page(self, page_key: str) -> list[bytes | None] | None:
        """One round trip for a list page: None on a miss, else [page, product, ...]."""
        reply: list[bytes | None] | None = await self._assemble_page(
            keys=[page_key], args=self._page_args
        )
        return reply
