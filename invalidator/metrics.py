"""Prometheus metrics of the invalidator and the outbox relay (served by
:func:`core.metrics.start_metrics_server` on ``CATALOG_INVALIDATOR_METRICS_PORT``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter(
    "catalog_invalidator_events",
    "Stream entries by outcome: processed, failed (left pending), dead_lettered",
    ["outcome"],
)
PROCESSED = EVENTS.labels("processed")
FAILED = EVENTS.labels("failed")
DEAD_LETTERED = EVENTS.labels("dead_lettered")
RECLAIMED = Counter(
    "catalog_invalidator_reclaimed", "Entries taken over from idle consumers (XAUTOCLAIM)"
)
KEYS_DELETED = Counter(
    "catalog_invalidator_keys_deleted", "Cache values and leases deleted by invalidations"
)
REDIS_ERRORS = Counter("catalog_invalidator_redis_errors", "Failed Redis calls of the invalidator")
BATCH_SECONDS = Histogram(
    "catalog_invalidator_batch_duration_seconds",
    "Time from a batch read to its XACK",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
END_TO_END_SECONDS = Histogram(
    "catalog_invalidator_lag_seconds",
    "Per event: time from occurred_at to its keys being deleted",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 300.0),
)
GROUP_LAG = Gauge("catalog_invalidator_group_lag", "Entries not yet delivered to the group")
GROUP_PENDING = Gauge("catalog_invalidator_group_pending", "Entries delivered but not acked")
DEAD_LETTERS = Gauge(
    "catalog_invalidator_dead_letters",
    "Entries in the dead-letter stream (XLEN) at the last sample",
)
REPLICA_WAIT_SHORT = Counter(
    "catalog_replica_wait_short",
    "WAITs that fewer than CATALOG_REDIS_WAIT_REPLICAS replicas answered in time, by who waited "
    "(invalidator: the batch stays pending; relay: the rows are published again)",
    ["by"],
)
OUTBOX_PUBLISHED = Counter("catalog_outbox_published", "Outbox rows XADDed by the relay")
OUTBOX_ERRORS = Counter("catalog_outbox_errors", "Failed outbox relay transactions")
OUTBOX_FAILED = Counter(
    "catalog_outbox_failed", "Outbox rows set aside as unpublishable (catalog outbox failed)"
)
VIEWS_FLUSHED = Counter("catalog_views_flushed", "Views added to product_stats by this flusher")
VIEWS_DROPPED = Counter(
    "catalog_views_dropped", "Views of ids that name no product, dropped at flush"
)
VIEW_FLUSH_FAILURES = Counter(
    "catalog_view_flush_failures", "Flush cycles that failed (their flush is retried next cycle)"
)
VIEWS_PENDING = Gauge(
    "catalog_views_pending_products", "Distinct products with views pending at the last claim"
)
VIEW_FLUSHES_PENDING = Gauge(
    "catalog_view_flushes_pending", "Claimed flushes not yet written to PostgreSQL and released"
)
