"""A history checker for the near cache's staleness bound (delta-atomicity, one key at a time).

A test records every read (which product, the version it returned, when it started and ended)
and every committed write (which product, the version it made, when its commit was acknowledged),
all on one monotonic clock (``time.monotonic()`` is system-wide, so processes may share it).

The staleness of a read that returned version ``v`` of a product is how long before the read
started the first newer version had been acknowledged: ``read.start - min(w.committed)`` over
the writes ``w`` of that product with ``w.version > v`` and ``w.committed < read.start``; 0 when
there is none (no newer version was acknowledged before the read began, so returning ``v`` is
atomic). A history is ``delta``-atomic when no read's staleness exceeds ``delta``.

Writes whose acknowledgement the test did not see (failed, timed out) are simply not recorded:
a read that returns the version before them is not counted stale. Versions of a product are
assumed to be ordered like its commits (``products.version`` is bumped under the row lock), but
acknowledgements may arrive out of order, hence the minimum over all newer versions. Pure logic:
no I/O, no clock of its own.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Read:
    key: str
    version: int
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Write:
    key: str
    version: int
    committed: float


@dataclass(frozen=True, slots=True)
class Stale:
    """A read that returned an older version than one acknowledged ``staleness`` seconds
    before it started (``missed``: the earliest such write)."""

    read: Read
    missed: Write

    @property
    def staleness(self) -> float:
        return self.read.start - self.missed.committed


@dataclass
class History:
    """Reads and writes as a test records them (append-only; the order does not matter)."""

    reads: list[Read] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)

    def read(self, key: str, version: int, start: float, end: float) -> None:
        self.reads.append(Read(key, version, start, end))

    def write(self, key: str, version: int, committed: float) -> None:
        self.writes.append(Write(key, version, committed))

    def stale_reads(self) -> list[Stale]:
        return stale_reads(self.reads, self.writes)

    def worst(self) -> Stale | None:
        return worst(self.reads, self.writes)

    def worst_staleness(self) -> float:
        """Seconds; 0.0 when every read returned a version no newer one preceded."""
        found = self.worst()
        return found.staleness if found is not None else 0.0


class _Newer:
    """The writes of one key by version, with the earliest acknowledgement among all writes
    at or after each position (a suffix minimum)."""

    def __init__(self, writes: list[Write]) -> None:
        writes.sort(key=lambda w: w.version)
        self.versions = [w.version for w in writes]
        self.earliest: list[Write] = list(writes)
        for n in range(len(writes) - 2, -1, -1):
            if self.earliest[n + 1].committed < self.earliest[n].committed:
                self.earliest[n] = self.earliest[n + 1]

    def first_after(self, version: int) -> Write | None:
        """The earliest acknowledged write of a version above ``version``."""
        n = bisect.bisect_right(self.versions, version)
        return self.earliest[n] if n < len(self.earliest) else None


def stale_reads(reads: Iterable[Read], writes: Iterable[Write]) -> list[Stale]:
    """Every read with a staleness above 0, in the order given."""
    by_key: dict[str, list[Write]] = defaultdict(list)
    for w in writes:
        by_key[w.key].append(w)
    newer = {key: _Newer(ws) for key, ws in by_key.items()}
    out = []
    for r in reads:
        index = newer.get(r.key)
        missed = index.first_after(r.version) if index is not None else None
        if missed is not None and missed.committed < r.start:
            out.append(Stale(r, missed))
    return out


def worst(reads: Iterable[Read], writes: Iterable[Write]) -> Stale | None:
    """The stalest read (None: none was stale)."""
    return max(stale_reads(reads, writes), key=lambda s: s.staleness, default=None)
