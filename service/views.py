"""Product view counting, write-behind: the RPC touches Redis only, in one round trip.

Invariants:

- :meth:`ViewCounter.record` adds each distinct id's count to the live hash
  (``Keys.views_pending``) in one script (``RECORD_VIEWS``): one round trip, and a batch lands
  whole in one flush or the next, or not at all.
- The hash holds at most ``max_pending`` ids. A batch whose new ids would take it past that is
  refused whole (:class:`~core.errors.ResourceExhausted`, gRPC RESOURCE_EXHAUSTED), so no
  client can fill Redis with counters and push the cache out. Ids already pending always count.
- It never retries. A retry after a timeout could count a batch twice; the caller gets
  :class:`~core.errors.CountersUnavailable` (gRPC UNAVAILABLE) and decides.
- Ids are validated before this is called; whether they name a product is decided at flush time
  (``invalidator/viewflush.py``), so recording never reads PostgreSQL. An unknown id therefore
  costs one hash field until the next flush drops it, and nothing after.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from redis.exceptions import RedisError

from core import metrics
from core.cache import scripts
from core.errors import CountersUnavailable, ResourceExhausted
from core.keys import Keys
from core.redisclient import RedisClient
from core.redisscript import Script

RECORD_VIEWS = Script(scripts.RECORD_VIEWS)


class ViewCounter:
    def __init__(self, redis: RedisClient, keys: Keys, max_pending: int) -> None:
        self.redis = redis
        self.key = keys.views_pending
        self.max_pending = max_pending

    async def record(self, product_ids: Sequence[str]) -> int:
        """Count one view per occurrence in ``product_ids``; returns how many were counted."""
        args: list[str | int] = [self.max_pending]
        for product_id, n in Counter(product_ids).items():
            args += (product_id, n)
        try:
            added = await RECORD_VIEWS(self.redis, [self.key], args)
        except (RedisError, OSError) as exc:
            raise CountersUnavailable(
                f"view counters unavailable ({type(exc).__name__}); retry later"
            ) from exc
        if not added:
            metrics.VIEWS_REFUSED.inc(len(product_ids))
            raise ResourceExhausted(
                "too many distinct products have views waiting to be counted; retry later"
            )
        metrics.VIEWS_RECORDED.inc(len(product_ids))
        return len(product_ids)
