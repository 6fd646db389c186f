"""The invalidator process: builds its clients, runs the consumer, relay and monitor, shuts down.

:func:`run` owns start-up and shutdown. SIGTERM/SIGINT: health turns NOT_SERVING, the consumer
finishes the batch in hand, drains what was delivered to it and leaves the group only when it
holds nothing; the relay finishes its transaction; the view flusher flushes once more; then every
pool is closed (``finally``).
Exit status 0 after a clean leave, 1 when entries were left pending for others to reclaim.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Sequence

from core import entrypoint, tracing
from core.cache.store import CacheStore
from core.events import Invalidation
from core.metrics import sample_loop_lag, start_metrics_server, watch_pools
from core.publisher import Publisher
from core.redisclient import RedisClient, ReplicaWait, connect
from core.settings import Settings, otel_environ
from core.tls import server_credentials
from invalidator.consumer import Consumer, apply_invalidation
from invalidator.health import Health, monitor
from invalidator.outbox import OutboxRelay
from invalidator.scopes import DatabaseScopes
from invalidator.settings import InvalidatorSettings
from invalidator.viewflush import ViewFlusher

log = logging.getLogger(__name__)


def redis_clients(base: Settings, settings: InvalidatorSettings) -> tuple[RedisClient, RedisClient]:
    """(commands client, blocking-read client). The second has one connection (per node, in
    cluster mode) whose socket timeout is longer than BLOCK, so an idle wait never ends in a
    timeout error, and whose id :func:`core.redisclient.reader_id` can tell."""
    commands = connect(base, socket_timeout=settings.invalidator_socket_timeout_s)
    reader = connect(base, socket_timeout=settings.read_timeout_s, single_connection=True)
    return commands, reader


async def apply_and_replicate(
    store: CacheStore, replicas: ReplicaWait, invalidation: Invalidation
) -> None:
    """The relay's fast path: apply, then WAIT for ``CATALOG_REDIS_WAIT_REPLICAS`` replicas.
    A shortfall raises, and the relay leaves those entries unmarked: the consumer applies them
    again and waits before its ack, so a failover cannot lose an invalidation it marked."""
    await apply_invalidation(store, invalidation)
    await replicas.require(store.redis)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m invalidator`` (takes no arguments), with the exit-status contract of every
    command; invalidator settings errors exit 2 too."""
    import argparse

    argparse.ArgumentParser(
        prog="python -m invalidator",
        description="Consume cache-invalidation events (and relay the outbox) until SIGTERM.",
    ).parse_args(argv)
    return entrypoint.run(
        "catalog invalidator",
        lambda base: asyncio.run(run(base, InvalidatorSettings.from_env())),
    )


async def run(base: Settings, settings: InvalidatorSettings) -> int:
    keys = settings.keys(base)
    if tracing.configure(otel_environ(), "catalog-invalidator"):
        log.info("tracing on (OTEL_* variables)")
    redis, reader = redis_clients(base, settings)
    tracing.instrument_redis(redis)  # no-op unless tracing is on
    watch_pools(redis=redis)
    store = CacheStore(
        redis,
        keys,
        lease_ttl_ms=base.lease_ttl_ms,
        tag_margin_ms=int(base.tag_ttl_margin_s * 1000),
    )
    replicas = ReplicaWait.from_settings(base, keys)
    engine = None
    if settings.outbox_relay or settings.views_flush or settings.resolves_scopes:
        from core.db import create_engine

        engine = create_engine(base)  # connects on first use
        tracing.instrument_engine(engine)  # no-op unless tracing is on
        watch_pools(engine)
    consumer = (
        Consumer(
            redis,
            reader,
            store,
            keys,
            settings,
            settings.consumer_name(),
            DatabaseScopes(engine) if engine is not None and settings.resolves_scopes else None,
            replicas,
        )
        if settings.invalidator_consume
        else None
    )
    stop = asyncio.Event()
    health = Health()
    draining: list[asyncio.Task[None]] = []

    def request_stop() -> None:
        log.info("stopping: finishing the batch in hand")
        stop.set()
        if consumer is not None:
            consumer.stop()
        draining.append(asyncio.create_task(health.servicer.enter_graceful_shutdown()))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    clean = True
    try:
        start_metrics_server(settings.invalidator_metrics_port, base.metrics_address)
        await health.start(settings.invalidator_health_address, server_credentials(base))
        async with asyncio.TaskGroup() as tasks:
            if settings.outbox_relay:
                assert engine is not None
                relay = OutboxRelay(
                    engine,
                    Publisher(redis, keys, maxlen=settings.event_stream_maxlen, replicas=replicas),
                    batch_size=settings.outbox_batch_size,
                    poll_s=settings.outbox_poll_ms / 1000,
                    retention_s=settings.outbox_retention_s,
                    apply=(
                        functools.partial(apply_and_replicate, store, replicas)
                        if settings.outbox_relay_applies
                        else None
                    ),
                )
                tasks.create_task(relay.run(stop))
            if settings.views_flush:
                assert engine is not None
                interval = settings.views_flush_interval_s
                flusher = ViewFlusher(redis, engine, keys, interval_s=interval)
                tasks.create_task(flusher.run(stop))
            tasks.create_task(sample_loop_lag(stop=stop))
            ready = (lambda: consumer.ready) if consumer is not None else (lambda: True)
            tasks.create_task(
                monitor(redis, keys, health, ready, settings.invalidator_stats_interval_s, stop)
            )
            if consumer is not None:
                log.info("consumer %s joins %s on %s", consumer.name, keys.group, keys.stream)
                serving = tasks.create_task(consumer.serve())
        if consumer is not None:
            clean = serving.result()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            await health.stop()
        if engine is not None:
            await engine.dispose()
        await reader.aclose()
        await redis.aclose()
        tracing.shutdown()
    log.info("stopped (%s)", "left the group" if clean else "entries left pending for reclaim")
    return 0 if clean else 1
