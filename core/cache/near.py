"""The near cache (L1): product entries in process memory, served only while this process is
provably up to date with Redis to within ``max_staleness``.

What it holds: the product entries a GetProduct or BatchGetProducts hit read from Redis, as
stored there (header, ids, ``Product`` bytes); the reader appends the name fragments when it
serves one (core/cache/names.py), so a rename needs nothing from this table. Bounded by entries
and by bytes, evicting the least recently used entry first.

Invariants (docs/architecture.md, "Near cache"):

* **Watermark.** :class:`core.cache.tracking.Tracking` receives every invalidation of a product
  key on every Redis node (``CLIENT TRACKING ... BCAST``), and a heartbeat key of this process
  through the same ordered channel. :meth:`advance` records, for a node, the instant a
  heartbeat whose invalidation has now arrived was written: every change that node made before
  that instant has been applied here. :meth:`get` serves only while ``now - watermark <=
  max_staleness`` for the oldest node's watermark, so a hit is never older than a change made
  in Redis more than ``max_staleness`` before the read began, however the channel fails (cut,
  stalled, slow): without fresh heartbeats the table stops serving, it does not serve old data.
* **No stale fill.** A reader takes a :meth:`ticket` before its Redis read and :meth:`put`
  installs the value only if no invalidation of that key (and no reset) arrived since: an
  invalidation racing the read is never undone by the read's older value.
* **Versions never go backwards**: a put never replaces a newer version of the entry.
* **Resets.** A (re)connected or broken channel, a flush of the Redis database, or a changed
  set of nodes clears everything and bumps the epoch, which voids every outstanding ticket.
* **Logical expiry.** An entry is served only before its ``fresh_until`` (which a price
  change caps); past it the reader goes to Redis, which refreshes it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import NamedTuple

from core import metrics
from core.cache import entry

_LOOKUPS = metrics.NEAR_LOOKUPS  # lookups by result, plain ints (core.metrics)
_HIT, _MISS, _SUSPENDED = metrics.HIT, metrics.MISS, metrics.SUSPENDED

# Bytes counted per entry beyond the value: the key, the tuple and the table's slot (CPython).
ENTRY_OVERHEAD = 200


class Ticket(NamedTuple):
    """What :meth:`NearCache.put` checks: the epoch and invalidation sequence at the read."""

    epoch: int
    seq: int


class _Entry(NamedTuple):
    raw: bytes
    fresh_until: float  # the entry's logical expiry on the monotonic clock
    version: int
    size: int


class NearCache:
    """Product entries by Redis key. Not thread-safe: one event loop uses it."""

    __slots__ = (
        "_bytes",
        "_clock",
        "_entries",
        "_inflight",
        "_max_age",
        "_max_bytes",
        "_max_entries",
        "_nodes",
        "_suspended_from",
        "_suspended_total",
        "_voided",
        "_wall_ms",
        "beat_due",
        "epoch",
        "idle",
        "on_due",
        "reads",
        "seq",
        "watermark",
    )

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        max_staleness_ms: float,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], float] = lambda: time.time() * 1000.0,
    ) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._max_age = max_staleness_ms / 1000.0
        self._clock = clock
        self._wall_ms = wall_ms
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        # Reads in flight by key, and the sequence number of the last invalidation of each
        # such key (only keys being read are remembered: bounded by concurrency).
        self._inflight: dict[str, int] = {}
        self._voided: dict[str, int] = {}
        #: Heartbeat watermark per node (monotonic seconds); no nodes: never serving.
        self._nodes: dict[Hashable, float] = {}
        #: The oldest node's watermark: :meth:`get` serves while ``now - watermark <= X``.
        self.watermark = float("-inf")
        self.epoch = 0
        self.seq = 0
        self._suspended_from: float | None = self._clock()
        self._suspended_total = 0.0
        #: Lookups so far: the channel beats only while they come (core/cache/tracking.py).
        self.reads = 0
        #: Set while the channel does not beat for want of lookups (not counted as suspended).
        self.idle = False
        #: From this instant (monotonic) the next lookup calls ``on_due``: the channel's next
        #: heartbeat rides on a lookup, not on a timer of its own (core/cache/tracking.py).
        self.beat_due = float("inf")
        self.on_due: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    # -- serving ----------------------------------------------------------------------------

    def serving(self) -> bool:
        return self._clock() - self.watermark <= self._max_age

    def get(self, key: str) -> bytes | None:
        """The entry, if held, fresh, and the channel is up to date; else None."""
        self.reads += 1
        now = self._clock()
        if now >= self.beat_due and self.on_due is not None:
            self.beat_due = float("inf")
            self.on_due()
        found = self._entries.get(key)
        if found is None:
            _LOOKUPS[_MISS] += 1
            return None
        if now - self.watermark > self._max_age:
            _LOOKUPS[_SUSPENDED] += 1
            return None
        if found.fresh_until <= now:
            _LOOKUPS[_MISS] += 1
            return None
        self._entries.move_to_end(key)
        _LOOKUPS[_HIT] += 1
        return found.raw

    # -- filling ----------------------------------------------------------------------------

    def ticket(self, key: str) -> Ticket:
        """Take before reading ``key`` from Redis; give to :meth:`put` (or :meth:`done`)."""
        self._inflight[key] = self._inflight.get(key, 0) + 1
        return Ticket(self.epoch, self.seq)

    def done(self, key: str) -> None:
        """The read of a :meth:`ticket` ended without a :meth:`put`."""
        left = self._inflight.get(key, 0) - 1
        if left > 0:
            self._inflight[key] = left
        else:
            self._inflight.pop(key, None)
            self._voided.pop(key, None)

    def put(self, key: str, raw: bytes | None, ticket: Ticket) -> bool:
        """Install a product entry read under ``ticket``, unless an invalidation of ``key`` or a
        reset came since, the channel is not up to date, or a newer version is held. Negative
        and missing entries are not kept. Returns whether it installed."""
        voided = self._voided.get(key, -1)
        self.done(key)
        if not raw or ticket.epoch != self.epoch or voided > ticket.seq or not self.serving():
            return False
        head = entry.header(raw)
        held = self._entries.get(key)
        if held is not None:
            if held.version > head.version:
                return False
            self._drop(key, held)
        size = len(raw) + len(key) + ENTRY_OVERHEAD
        if size > self._max_bytes:
            return False
        fresh_until = self._clock() + (head.fresh_until_ms - self._wall_ms()) / 1000.0
        self._entries[key] = _Entry(raw, fresh_until, head.version, size)
        self._bytes += size
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size
            metrics.NEAR_EVICTIONS.inc()
        return True

    # -- the channel ------------------------------------------------------------------------

    def invalidate(self, key: str) -> None:
        """A change of ``key`` in Redis: drop it, and void the tickets of reads of it."""
        self.seq += 1
        if key in self._inflight:
            self._voided[key] = self.seq
        held = self._entries.pop(key, None)
        if held is not None:
            self._bytes -= held.size

    def reset(self, nodes: list[Hashable] | None = None) -> None:
        """Forget everything (and void every ticket): the channel was (re)built or lost, or the
        database was flushed. ``nodes`` (when given) are the nodes whose heartbeats count from
        now on; until each has one, nothing is served."""
        self.epoch += 1
        self.seq += 1
        self._entries.clear()
        self._voided.clear()
        self._bytes = 0
        if nodes is not None:
            self._nodes = dict.fromkeys(nodes, float("-inf"))
        self._update_watermark()

    def advance(self, node: Hashable, written_at: float) -> None:
        """Every change ``node`` made before ``written_at`` (monotonic) has been applied."""
        if node in self._nodes and written_at > self._nodes[node]:
            self._nodes[node] = written_at
            self._update_watermark()

    def _update_watermark(self) -> None:
        now = self._clock()
        if self._suspended_from is None and now - self.watermark > self._max_age:
            # Suspended since the old watermark aged past the bound (or since now).
            crossed = self.watermark + self._max_age
            self._suspended_from = crossed if crossed > float("-inf") else now
        self.watermark = min(self._nodes.values(), default=float("-inf"))
        if self._suspended_from is not None and now - self.watermark <= self._max_age:
            self._suspended_total += max(0.0, now - self._suspended_from)
            self._suspended_from = None

    def set_idle(self, idle: bool) -> None:
        """The channel stops beating for want of lookups (True), or beats again (False): time
        idle is not time suspended (nobody was refused), and suspension counts again from the
        moment beats resume, until the first one comes back."""
        if idle == self.idle:
            return
        now = self._clock()
        if idle:
            self._suspended_total = self.suspended_seconds()
            self._suspended_from = None
        elif now - self.watermark > self._max_age:
            self._suspended_from = now
        self.idle = idle

    def suspended_seconds(self) -> float:
        """Total time the table did not serve because its watermark was too old (a metric)."""
        if self.idle:
            return self._suspended_total
        now = self._clock()
        since = self._suspended_from
        if since is None and now - self.watermark > self._max_age:
            crossed = self.watermark + self._max_age
            since = crossed if crossed > float("-inf") else now
        return self._suspended_total + (now - since if since is not None else 0.0)

    def watermark_age(self) -> float:
        """Seconds since the oldest node's last applied heartbeat (inf: none yet)."""
        return self._clock() - self.watermark

    def _drop(self, key: str, held: _Entry) -> None:
        del self._entries[key]
        self._bytes -= held.size
