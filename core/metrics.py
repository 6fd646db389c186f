"""Prometheus metrics of the service. Children with fixed labels are bound once here so the hot
path pays one ``inc()``, not a label lookup."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

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
RPC_LATENCY = Histogram(
    "catalog_rpc_duration_seconds",
    "Server-side RPC latency by method and status code",
    ["method", "code"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)


def start_metrics_server(port: int, address: str) -> None:
    """Serve ``/metrics`` on ``address:port`` in a daemon thread; port 0 disables it."""
    if port == 0:
        log.info("metrics endpoint disabled (port 0)")
        return
    start_http_server(port, addr=address)
    log.info("metrics on http://%s:%d/metrics", address, port)
