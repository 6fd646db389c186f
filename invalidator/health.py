"""grpc.health.v1 for the invalidator process, and the sampler that feeds it and the group gauges.

SERVING means: the consumer is in its read loop (or consumption is disabled) and the last sample of
the group (XINFO GROUPS) succeeded. NOT_SERVING during start-up, after a failed sample and from
the moment a shutdown begins. The same sample sets the group lag and pending gauges and the
dead-letter stream's length.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from redis.exceptions import RedisError, ResponseError

from core.keys import Keys
from core.redisclient import RedisClient
from core.tls import add_port
from invalidator import metrics

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """The health servicer, optionally served on its own port."""

    def __init__(self) -> None:
        self.servicer = HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, address: str, credentials: grpc.ServerCredentials | None = None) -> None:
        """Serve on ``address`` (``host:0`` picks a port, see :attr:`port`); empty disables.
        With ``credentials`` (:func:`core.tls.server_credentials`) the port speaks TLS."""
        await self.set(False)
        if not address:
            return
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = add_port(self.server, address, credentials)
        await self.server.start()
        log.info("health on %s", address)

    async def set(self, ok: bool) -> None:
        await self.servicer.set("", SERVING if ok else NOT_SERVING)

    async def stop(self) -> None:
        await self.servicer.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(1.0)


async def sample_group(redis: RedisClient, keys: Keys) -> tuple[int, int]:
    """(lag, pending) of our group; lag is -1 when Redis cannot tell (trimmed past it)."""
    if not await redis.exists(keys.stream):
        return 0, 0  # nothing published and no consumer started yet
    for group in await redis.xinfo_groups(keys.stream):
        name = group["name"]
        if (name.decode() if isinstance(name, bytes) else name) == keys.group:
            lag = group.get("lag")
            return (-1 if lag is None else int(lag)), int(group["pending"])
    return 0, 0


async def monitor(
    redis: RedisClient,
    keys: Keys,
    health_: Health,
    ready: Any,
    interval_s: float,
    stop: asyncio.Event,
) -> None:
    """Until ``stop``: sample the group, set the gauges and health. ``ready()`` -> bool."""
    while not stop.is_set():
        try:
            lag, pending = await sample_group(redis, keys)
            metrics.GROUP_LAG.set(lag)
            metrics.GROUP_PENDING.set(pending)
            try:
                metrics.DEAD_LETTERS.set(await redis.xlen(keys.dead_letter_stream))
            except ResponseError:  # an ACL user from before XLEN was needed: gauge unknown only
                metrics.DEAD_LETTERS.set(float("nan"))
            await health_.set(bool(ready()))
        except RedisError as exc:
            log.warning("group sample failed: %s", exc)
            await health_.set(False)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
