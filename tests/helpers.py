"""Small helpers shared by tests: metric deltas and bounded waiting for a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from prometheus_client import REGISTRY
from redis.asyncio import Redis


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """Counts how much metrics moved between construction and ``__call__``."""

    def __init__(self, name: str, **labels: str) -> None:
        self.name, self.labels = name, labels
        self.start = metric(name, **labels)

    def __call__(self) -> float:
        return metric(self.name, **self.labels) - self.start


CATALOG_SERVICE = "catalog.v1.CatalogService"


def handled(method: str, code: str, service: str = CATALOG_SERVICE) -> Delta:
    """Calls of a unary method completed with ``code`` (``grpc_server_handled_total``)."""
    return Delta(
        "grpc_server_handled_total",
        grpc_type="unary",
        grpc_service=service,
        grpc_method=method,
        grpc_code=code,
    )


def db_loads() -> Delta:
    return Delta("catalog_db_loads_total", op="get_products")


async def eventually(
    check: Callable[[], Awaitable[bool]],
    timeout: float = 15.0,
    what: str = "condition",
    interval: float = 0.02,
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` (a bound, not a timing claim)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(interval)


async def delete_namespace(client: Redis, namespace: str) -> None:
    """Delete every key a test made under its own namespace (never anything else)."""
    made = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
    if made:
        await client.delete(*made)
