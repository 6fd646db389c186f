"""The caller's deadline, visible to the read path without passing it through every call.

The gRPC layer records the absolute deadline of each call in a context variable; tasks started
for the call (single-flight loads) inherit it. A reader waiting for another's fill spends at most
half of the time left, so the database read it falls back to still fits in the deadline: a lease
left behind by a timed-out ACQUIRE (Redis paused, the command ran later) then costs the caller a
shorter wait, never its deadline.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token

_DEADLINE: ContextVar[float | None] = ContextVar("catalog_deadline", default=None)


def set_remaining(seconds: float | None) -> Token[float | None]:
    """Record that the current call must finish within ``seconds`` (None: no deadline)."""
    return _DEADLINE.set(None if seconds is None else time.monotonic() + seconds)


def reset(token: Token[float | None]) -> None:
    _DEADLINE.reset(token)


def wait_budget(limit_s: float) -> float:
    """Seconds a lease wait may take: ``limit_s``, capped at half the caller's time left."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return limit_s
    return max(0.0, min(limit_s, (deadline - time.monotonic()) / 2))
