"""Product view counting, write-behind: the RPC touches Redis only, in one round trip.

Invariants:

- :meth:`ViewCounter.record` adds each distinct id's count to the live hash
  (``Keys.views_pending``) with one ``HINCRBY`` per id inside one ``MULTI``/``EXEC``, sent as a
  single pipeline: one round trip, and a batch lands whole in one flush or the next.
- It never retries. A retry after a timeout could count a batch twice; the caller gets
  :class:`~core.errors.CountersUnavailable` (gRPC UNAVAILABLE) and decides.
- Ids are validated before this is called; whether they name a product is decided at flush time
  (``invalidator/viewflush.py``), so recording never reads PostgreSQL.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core import metrics
from core.errors import CountersUnavailable
from core.keys import Keys


class ViewCounter:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.key = keys.views_pending

    async def record(self, product_ids: Sequence[str]) -> int:
        """Count one view per occurrence in ``product_ids``; returns how many were counted."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for product_id, n in Counter(product_ids).items():
                    pipe.hincrby(self.key, product_id, n)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise CountersUnavailable(
                f"view counters unavailable ({type(exc).__name__}); retry later"
            ) from exc
        metrics.VIEWS_RECORDED.inc(len(product_ids))
        return len(product_ids)
