"""Wiring and lifecycle: the only place clients (Redis, PostgreSQL) are built.

:func:`run` owns a server process from start to exit: metrics, clients, the gRPC server with
health and reflection, the health monitor, and graceful shutdown on SIGTERM/SIGINT (health turns
NOT_SERVING, new RPCs are refused, in-flight ones get ``shutdown_grace_s``, pools are closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # the asyncio servicer (no public alias)
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer  # the asyncio servicer
from sqlalchemy.ext.asyncio import AsyncEngine

from core import tracing
from core.cache.near import NearCache
from core.cache.reader import Reader
from core.cache.store import CacheStore
from core.cache.tracking import Tracking
from core.db import create_engine
from core.keys import Keys
from core.metrics import (
    sample_loop_lag,
    start_metrics_server,
    watch_breaker,
    watch_near,
    watch_pools,
)
from core.pagetokens import PageTokens
from core.redisclient import RedisClient, connect
from core.repository import Repository
from core.settings import Settings, otel_environ
from core.tls import add_port, server_credentials
from service.auth import WritePolicy
from service.grpc_api import SERVICE_NAME, CatalogApi, generic_handler
from service.keepalive import server_options
from service.rpcmetrics import CallLimit, Counted
from service.views import ViewCounter
from service.writes import ProductWriter

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def create_redis(settings: Settings, *, socket_timeout: float | None = None) -> RedisClient:
    """A Redis client for the read path: short timeouts and no retries (the breaker decides).

    A burst of concurrent reads waits (up to ``redis_pool_timeout_s``) for one of
    ``redis_max_connections`` connections instead of failing at once, so it queues rather than
    tripping the breaker.
    """
    return connect(
        settings,
        socket_timeout=socket_timeout,
        max_connections=settings.redis_max_connections,
        pool_timeout=settings.redis_pool_timeout_s,
        retries=0,
    )


def create_store(redis: RedisClient, settings: Settings) -> CacheStore:
    return CacheStore(
        redis,
        Keys(settings.key_namespace),
        lease_ttl_ms=settings.lease_ttl_ms,
        tag_margin_ms=int(settings.tag_ttl_margin_s * 1000),
    )


@dataclass
class Service:
    """A started gRPC server and everything it holds."""

    settings: Settings
    server: aio.Server
    port: int
    redis: RedisClient
    engine: AsyncEngine
    reader: Reader
    health: HealthServicer
    _monitor: asyncio.Task[None]
    # Follows renames on the names channel (None with the cache off).
    _names: asyncio.Task[None] | None = None
    # Keeps the near cache in step with Redis (None with the near cache off).
    tracking: Tracking | None = None
    _tracking: asyncio.Task[None] | None = None

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, wait ``shutdown_drain_s``, refuse new RPCs, finish in-flight."""
        await self.health.enter_graceful_shutdown()
        if self.settings.shutdown_drain_s:
            await asyncio.sleep(self.settings.shutdown_drain_s)
        await self.server.stop(self.settings.shutdown_grace_s if grace is None else grace)
        for task in (self._monitor, self._names, self._tracking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.redis.aclose()
        await self.engine.dispose()


async def start(
    settings: Settings, repository: Callable[[AsyncEngine], Repository] = Repository
) -> Service:
    """Build clients and start serving on ``settings.grpc_address`` (port 0: any free port).

    ``repository`` lets tests pause or break database reads around the real queries.
    """
    settings.check_can_serve()
    writers = WritePolicy.from_settings(settings)
    credentials = server_credentials(settings)  # bad TLS files fail before any connection
    engine = create_engine(settings)
    redis = create_redis(settings)
    repo = repository(engine)
    keys = Keys(settings.key_namespace)
    store = create_store(redis, settings) if settings.cache_enabled else None
    near = None
    if store is not None and settings.near_cache_enabled:
        near = NearCache(
            settings.near_cache_max_entries,
            settings.near_cache_max_bytes,
            settings.near_cache_max_staleness_ms,
        )
        watch_near(near)
    reader = Reader(store, repo, keys, settings, near=near)
    tracing.instrument_engine(engine)  # no-ops unless tracing is on
    tracing.instrument_redis(redis)
    watch_pools(engine, redis)
    watch_breaker(lambda: reader.breaker.is_open)
    writer = ProductWriter(engine, repo, reader.loader, reader.breaker, reader.near)
    views = ViewCounter(redis, keys, settings.views_max_pending)
    api = CatalogApi(reader, PageTokens(settings.page_token_secret), writer, views)

    # The in-flight limit is ours (service.rpcmetrics.CallLimit), so refusals are counted.
    calls = CallLimit(settings.max_concurrent_rpcs)
    server = aio.server(
        options=[
            # Refused (RESOURCE_EXHAUSTED) before it is parsed: memory a client cannot inflate.
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # Off unless several workers share the port: two servers must not share it by chance.
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            *server_options(settings),  # keepalive, maximum connection age
        ],
    )
    server.add_generic_rpc_handlers((generic_handler(api, calls, writers),))
    health_servicer = HealthServicer()
    counted = Counted(server, calls)  # the standard services counted and limited like ours
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, counted)
    if settings.reflection:
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)),
            counted,
        )
    port = add_port(server, settings.grpc_address, credentials)
    if port == 0:
        raise RuntimeError(f"cannot listen on {settings.grpc_address}")
    await _check_health(repo, health_servicer, settings)
    names = None
    if store is not None:
        # Follow renames before serving; a Redis that is down only delays this by its connect
        # timeout (names are then re-read every CATALOG_NAME_TTL_MS until it is back).
        names = asyncio.create_task(reader.names.follow(redis, keys.names_channel))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.names.following.wait(), settings.redis_connect_timeout_s)
    tracking = tracking_task = None
    if near is not None:
        tracking = near_cache_tracking(redis, near, keys, settings)
        tracking_task = asyncio.create_task(tracking.run())
        with contextlib.suppress(TimeoutError):  # until then, reads skip the near cache
            await asyncio.wait_for(tracking.tracking.wait(), settings.redis_connect_timeout_s)
    await server.start()
    monitor = asyncio.create_task(_monitor_health(repo, health_servicer, settings))
    log.info(
        "serving catalog.v1 on port %d (cache %s, %s, reflection %s)",
        port,
        "on" if store else "off",
        "mTLS" if settings.tls_client_ca_file else "TLS" if credentials else "plaintext",
        "on" if settings.reflection else "off",
    )
    (log.warning if writers.read_only else log.info)("%s", writers.describe())
    return Service(
        settings,
        server,
        port,
        redis,
        engine,
        reader,
        health_servicer,
        monitor,
        names,
        tracking,
        tracking_task,
    )


def near_cache_tracking(
    redis: RedisClient, near: NearCache, keys: Keys, settings: Settings
) -> Tracking:
    """The invalidation channel of ``near``: a heartbeat every ``near_cache_heartbeat_ms``,
    and a channel whose heartbeat has not come back within 20 staleness bounds (at least a
    second) is rebuilt (core/cache/tracking.py)."""
    return Tracking(
        redis,
        near,
        keys,
        heartbeat_s=settings.near_cache_heartbeat_ms / 1000.0,
        broken_after_s=max(1.0, 20 * settings.near_cache_max_staleness_ms / 1000.0),
    )


async def _check_health(repo: Repository, servicer: HealthServicer, settings: Settings) -> None:
    """SERVING only while PostgreSQL, the source of truth, answers. Redis is optional."""
    try:
        async with asyncio.timeout(settings.db_connect_timeout_s):
            await repo.ping()
        status = SERVING
    except Exception as exc:
        log.warning("health: PostgreSQL not answering (%s)", type(exc).__name__)
        status = NOT_SERVING
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


async def _monitor_health(repo: Repository, servicer: HealthServicer, settings: Settings) -> None:
    while True:
        await asyncio.sleep(settings.health_check_interval_s)
        await _check_health(repo, servicer, settings)


async def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    settings.check_can_serve()
    # Signals first: a SIGTERM that arrives while the server starts (a supervisor stopping a
    # group of workers, one of them still starting) must stop it gracefully, not kill it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    start_metrics_server(settings.metrics_port, settings.metrics_address)
    if tracing.configure(otel_environ(), "catalog"):  # in each worker: after the fork
        log.info("tracing on (OTEL_* variables)")
    service = await start(settings)
    lag = asyncio.create_task(sample_loop_lag())
    # What start-up built (modules, clients, the server) lives as long as the process: freeze
    # it, so the collector's passes scan only what requests allocate (each call leaves a few
    # cyclic objects of gRPC's and redis-py's, so collections run all the time under load).
    gc.collect()
    gc.freeze()
    try:
        await stop.wait()
        log.info("shutting down: draining for up to %.1fs", settings.shutdown_grace_s)
    finally:
        lag.cancel()
        await service.stop()
        tracing.shutdown()
    log.info("stopped")


__all__ = ["Service", "create_redis", "create_store", "run", "start"]
