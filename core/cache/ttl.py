"""TTL arithmetic: jitter against synchronized expiry, capped at the next price change."""

from __future__ import annotations

import random
from datetime import datetime

MIN_TTL_MS = 50


def jittered_ms(ttl_s: float, jitter: float, rand: random.Random | None = None) -> int:
    """``ttl_s`` in ms, scaled by a uniform factor in [1 - jitter, 1 + jitter]."""
    r = (rand or random).uniform(1.0 - jitter, 1.0 + jitter)
    return max(MIN_TTL_MS, int(ttl_s * 1000.0 * r))


def capped_ms(ttl_ms: int, changes_at: datetime | None, now: datetime) -> int:
    """Never cache a price past the instant a pricing rule starts or ends."""
    if changes_at is None:
        return ttl_ms
    until_ms = int((changes_at - now).total_seconds() * 1000.0)
    return max(MIN_TTL_MS, min(ttl_ms, until_ms))
