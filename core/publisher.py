"""Publishing events straight to the stream (for writers without access to our database).

Writers that change our PostgreSQL should use the outbox (:mod:`invalidator.outbox`) instead: a
direct XADD after COMMIT is lost if the process dies between the two. Every entry is validated by
:func:`core.events.new_event` before it is written, and the stream is trimmed with
``MAXLEN ~`` (approximate: O(1) amortised) on every XADD.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.events import PRODUCT_UPDATED, Event, new_event, to_fields
from core.keys import Keys
from core.redisclient import RedisClient, ReplicaWait


@dataclass(frozen=True, slots=True)
class ProductUpdate:
    """Arguments of one ``product.updated`` (see :meth:`Publisher.publish_product_updated`)."""

    product_id: str
    version: int = 0
    category_id: str = ""
    previous_category_id: str = ""
    brand_id: str = ""
    previous_brand_id: str = ""


class Publisher:
    def __init__(
        self, redis: RedisClient, keys: Keys, *, maxlen: int, replicas: ReplicaWait | None = None
    ) -> None:
        """``replicas``: what :meth:`replicated` waits for (nothing by default)."""
        self.redis = redis
        self.keys = keys
        self.maxlen = maxlen
        self.replicas = replicas or ReplicaWait(keys)

    async def replicated(self, streams: Iterable[str]) -> None:
        """Return once what was published to ``streams`` ("" = the event stream) is on
        ``CATALOG_REDIS_WAIT_REPLICAS`` replicas (``WAIT``; nothing when 0); else raise
        :class:`~core.redisclient.ReplicationShortfall`."""
        await self.replicas.require(self.redis, {s or self.keys.stream for s in streams})

    async def publish(self, event: Event) -> str:
        """XADD one event; returns its stream id."""
        return (await self.publish_many([event]))[0]

    async def publish_many(self, events: Iterable[Event]) -> list[str]:
        """XADD several events in one round trip, in order."""
        return await self.publish_fields(to_fields(e) for e in events)

    async def publish_fields(
        self, entries: Iterable[Mapping[str, str]], stream: str = ""
    ) -> list[str]:
        """XADD already-encoded entries (the outbox relay's path) in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for fields in entries:
                target = stream or self.keys.stream
                pipe.xadd(target, dict(fields), maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            ids: list[Any] = await pipe.execute()
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def publish_entries(self, entries: Sequence[tuple[str, Mapping[str, str]]]) -> list[Any]:
        """XADD ``(stream, fields)`` pairs (empty stream = the event stream) in one round trip.

        Per entry: its stream id, or the error Redis returned for it (a refused entry does not
        stop the others; a lost connection raises)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, fields in entries:
                target = stream or self.keys.stream
                pipe.xadd(target, dict(fields), maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def publish_product_updated(
        self,
        product_id: str,
        *,
        version: int = 0,
        category_id: str = "",
        previous_category_id: str = "",
        brand_id: str = "",
        previous_brand_id: str = "",
    ) -> str:
        """One ``product.updated``. Give ``previous_*`` only when the product moved."""
        return (
            await self.publish_products_updated(
                [
                    ProductUpdate(
                        product_id,
                        version,
                        category_id,
                        previous_category_id,
                        brand_id,
                        previous_brand_id,
                    )
                ]
            )
        )[0]

    async def publish_products_updated(self, updates: Iterable[ProductUpdate]) -> list[str]:
        """Many ``product.updated`` events in one round trip."""
        return await self.publish_many(
            new_event(
                PRODUCT_UPDATED,
                product_id=u.product_id,
                version=u.version,
                category_id=u.category_id,
                previous_category_id=u.previous_category_id,
                brand_id=u.brand_id,
                previous_brand_id=u.previous_brand_id,
            )
            for u in updates
        )
