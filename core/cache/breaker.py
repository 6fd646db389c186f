"""A circuit breaker for the cache: after ``failures`` consecutive errors, skip Redis for
``reset_s`` seconds, then let one probe through (half-open). Pure: the clock is injected.

A dead Redis then costs a comparison per read instead of a socket timeout per read.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from core.metrics import BREAKER_OPEN


class CircuitBreaker:
    __slots__ = ("_clock", "_failures", "_open_until", "failures", "reset_s")

    def __init__(
        self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0

    @property
    def is_open(self) -> bool:
        return self._failures >= self.failures

    def allow(self) -> bool:
        """May this call use Redis? Closed: yes. Open: no, until reset_s passed; then one probe
        per reset_s. A probe that never reports (its call was cancelled at its deadline) only
        costs one window: the next probe goes after reset_s, so the breaker cannot wedge open."""
        if self._failures < self.failures:
            return True
        now = self._clock()
        if now < self._open_until:
            return False
        self._open_until = now + self.reset_s
        return True

    def success(self) -> None:
        self._failures = 0

    def failure(self) -> None:
        self._failures += 1
        if self._failures >= self.failures:
            if self._failures == self.failures:
                BREAKER_OPEN.inc()
            self._open_until = self._clock() + self.reset_s
