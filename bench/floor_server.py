"""The floors the service is measured against, in the service's own process model.

``python -m bench.floor_server redis KEY``: a bare ``grpc.aio`` server whose GetProduct handler
does one Redis GET of ``KEY`` (a cached product's bytes) and returns them; no validation, no
metrics, no cache protocol. ``echo KEY``: the same server returning those bytes from memory, with
no Redis at all. Settings (address, Redis URL and pool) come from ``CATALOG_*`` like the service's,
and the Redis client is the service's own (:func:`service.app.create_redis`).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any, cast

import grpc
from grpc import aio

from core.metrics import start_metrics_server
from core.settings import Settings
from service.app import create_redis
from service.grpc_api import SERVICE_NAME


async def serve(mode: str, key: str, settings: Settings) -> None:
    redis = create_redis(settings)
    cached = cast(bytes | None, await redis.get(key))
    if not cached:
        raise SystemExit(f"floor server: {key!r} is not cached")

    async def from_redis(request: bytes, context: Any) -> bytes | None:
        return cast(bytes | None, await redis.get(key))

    async def from_memory(request: bytes, context: Any) -> bytes:
        return cached

    handler = grpc.unary_unary_rpc_method_handler(
        from_redis if mode == "redis" else from_memory,
        request_deserializer=None,
        response_serializer=None,
    )
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"GetProduct": handler}),)
    )
    server.add_insecure_port(settings.grpc_address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)
    await redis.aclose()


def main() -> None:
    mode, key = sys.argv[1], sys.argv[2]
    if mode not in ("redis", "echo"):
        raise SystemExit("usage: python -m bench.floor_server redis|echo KEY")
    settings = Settings.from_env()
    start_metrics_server(settings.metrics_port, settings.metrics_address)
    asyncio.run(serve(mode, key, settings))


if __name__ == "__main__":
    main()
