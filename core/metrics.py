"""Prometheus metrics shared by both processes. Children with fixed labels are bound once here so
the hot path pays one ``inc()``, not a label lookup.

The RPC (RED) metrics are the server's (:mod:`service.rpcmetrics`). Saturation gauges are read at
scrape time from the objects that know them (:func:`watch_pools`, :func:`watch_breaker`), so they
cost nothing per call; the event-loop lag is sampled by :func:`sample_loop_lag`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from core.settings import SettingsError

log = logging.getLogger(__name__)

CACHE_REQUESTS = Counter(
    "catalog_cache_requests", "Cache lookups by operation and result", ["op", "result"]
)
DB_LOADS = Counter("catalog_db_loads", "SQL round trips that load products, by operation", ["op"])
LEASE_WAITS = Counter("catalog_lease_waits", "Reads that waited for another reader's fill")
FILL_REFUSED = Counter(
    "catalog_fill_refused", "Fills refused because their lease was voided or had expired"
)
REFRESHES = Counter(
    "catalog_refreshes", "Background refreshes of stale or nearly expired entries", ["kind"]
)
NAME_BROADCASTS = Counter(
    "catalog_name_broadcasts", "Rename messages received on the names channel (fragments dropped)"
)
STALE_NAMES_SERVED = Counter(
    "catalog_stale_names_served",
    "Expired name fragments served because PostgreSQL could not be read to reload them",
)
REDIS_ERRORS = Counter("catalog_redis_errors", "Redis errors and timeouts seen by the read path")
BREAKER_OPEN = Counter("catalog_breaker_opened", "Times the Redis circuit breaker opened")
VIEWS_RECORDED = Counter("catalog_views_recorded", "Product views counted in Redis")
VIEWS_REFUSED = Counter(
    "catalog_views_refused", "Product views refused because the pending-views hash was full"
)
AUTH_REFUSED = Counter(
    "catalog_auth_refused",
    "Write calls refused by authorization, by method and reason",
    ["method", "reason"],
)
DB_POOL = Gauge(
    "catalog_db_pool_connections",
    "PostgreSQL pool connections: in_use, idle, max (pool size + overflow)",
    ["state"],
)
REDIS_POOL = Gauge(
    "catalog_redis_pool_connections", "Redis pool connections: in_use, idle, max", ["state"]
)
BREAKER_STATE = Gauge(
    "catalog_breaker_state", "Redis circuit breaker: 0 closed, 1 open (reads skip Redis)"
)
LOOP_LAG = Gauge(
    "catalog_event_loop_lag_seconds",
    "How late the event loop ran a timer at the last sample (every LOOP_LAG_INTERVAL_S)",
)
LOOP_LAG_INTERVAL_S = 0.5

#: Near-cache lookups by result, ``NEAR_LOOKUPS[HIT|MISS|SUSPENDED] += 1``: plain ints on the
#: event loop's thread (a hit is the hottest path there is; a ``Counter.inc`` takes a lock),
#: read by the scrape thread through :class:`_NearLookups`.
NEAR_LOOKUPS = [0, 0, 0]
HIT, MISS, SUSPENDED = 0, 1, 2


class _NearLookups(Collector):
    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "catalog_near_cache_requests",
            "Near-cache (in-process) lookups: hit, miss, or suspended (held but the "
            "invalidation channel's watermark was older than CATALOG_NEAR_CACHE_MAX_STALENESS_MS)",
            labels=("result",),
        )
        counts = list(NEAR_LOOKUPS)
        for result, n in zip(("hit", "miss", "suspended"), counts, strict=True):
            family.add_metric((result,), n)
        yield family


REGISTRY.register(_NearLookups())
NEAR_EVICTIONS = Counter(
    "catalog_near_cache_evictions", "Near-cache entries evicted to stay within its size bounds"
)
NEAR_INVALIDATIONS = Counter(
    "catalog_near_cache_invalidations",
    "Invalidation messages received from Redis for product keys (per key)",
)
NEAR_RESETS = Counter(
    "catalog_near_cache_resets",
    "Times the near cache was emptied: channel (re)built or lost, Redis flushed, nodes changed",
    ["reason"],
)
NEAR_ENTRIES = Gauge("catalog_near_cache_entries", "Entries in the near cache")
NEAR_BYTES = Gauge("catalog_near_cache_bytes", "Bytes the near cache accounts for")
NEAR_WATERMARK_AGE = Gauge(
    "catalog_near_cache_watermark_age_seconds",
    "Age of the oldest node's last heartbeat seen through the invalidation channel",
)
NEAR_SUSPENDED_SECONDS = Gauge(
    "catalog_near_cache_suspended_seconds",
    "Total seconds the near cache did not serve because its watermark was too old (monotonic)",
)


def _guarded(read: Callable[[], float]) -> Callable[[], float]:
    """A scrape-time reader that reports NaN instead of failing the whole scrape."""

    def value() -> float:
        try:
            return float(read())
        except Exception:
            return float("nan")

    return value


def watch_pools(engine: Any | None = None, redis: Any | None = None) -> None:
    """Point the pool gauges at ``engine`` (SQLAlchemy AsyncEngine) and ``redis`` (its pool).

    Read from the scrape thread; the reads are of sizes only (no locks, no I/O)."""
    if engine is not None:
        pool = engine.pool
        overflow = getattr(pool, "_max_overflow", 0)
        DB_POOL.labels("in_use").set_function(_guarded(pool.checkedout))
        DB_POOL.labels("idle").set_function(_guarded(pool.checkedin))
        DB_POOL.labels("max").set_function(_guarded(lambda: pool.size() + max(overflow, 0)))
    if redis is not None and hasattr(redis, "get_nodes"):  # a cluster: a pool per node
        nodes = redis.get_nodes

        def busy() -> float:
            return sum(len(n._connections) - len(n._free) for n in nodes())

        REDIS_POOL.labels("in_use").set_function(_guarded(busy))
        REDIS_POOL.labels("idle").set_function(_guarded(lambda: sum(len(n._free) for n in nodes())))
        REDIS_POOL.labels("max").set_function(
            _guarded(lambda: sum(n.max_connections for n in nodes()))
        )
    elif redis is not None:
        rpool = redis.connection_pool
        # redis-py keeps these as private lists/sets; their sizes are all that is read.
        REDIS_POOL.labels("in_use").set_function(_guarded(lambda: len(rpool._in_use_connections)))
        REDIS_POOL.labels("idle").set_function(_guarded(lambda: len(rpool._available_connections)))
        REDIS_POOL.labels("max").set_function(_guarded(lambda: rpool.max_connections))


def watch_near(near: Any) -> None:
    """Point the near-cache gauges at ``near`` (core.cache.near.NearCache)."""
    NEAR_ENTRIES.set_function(_guarded(lambda: len(near)))
    NEAR_BYTES.set_function(_guarded(lambda: near.size_bytes))
    NEAR_WATERMARK_AGE.set_function(_guarded(near.watermark_age))
    NEAR_SUSPENDED_SECONDS.set_function(_guarded(near.suspended_seconds))


def watch_breaker(is_open: Callable[[], bool]) -> None:
    BREAKER_STATE.set_function(_guarded(lambda: 1.0 if is_open() else 0.0))


async def sample_loop_lag(
    interval_s: float = LOOP_LAG_INTERVAL_S, stop: asyncio.Event | None = None
) -> None:
    """Until ``stop`` (or cancelled): wait ``interval_s`` and record how much later than asked
    the loop woke up. A loop blocked by CPU work (or a blocking call) shows here first."""
    loop = asyncio.get_running_loop()
    while stop is None or not stop.is_set():
        asked = loop.time()
        if stop is None:
            await asyncio.sleep(interval_s)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
        LOOP_LAG.set(max(0.0, loop.time() - asked - interval_s))


def start_metrics_server(port: int, address: str) -> None:
    """Serve ``/metrics`` on ``address:port`` in a daemon thread; port 0 disables it."""
    if port == 0:
        log.info("metrics endpoint disabled (port 0)")
        return
    try:
        start_http_server(port, addr=address)
    except OSError as exc:
        # A worker's port is the base + its index: it can meet another process's port (the
        # invalidator's 9465 beside `--workers 2` on 9464, say). Say so instead of a traceback.
        raise SettingsError(
            f"cannot serve metrics on {address}:{port} ({exc.strerror or exc}); with --workers N "
            "the service uses CATALOG_METRICS_PORT .. CATALOG_METRICS_PORT + N - 1"
        ) from None
    log.info("metrics on http://%s:%d/metrics", address, port)
