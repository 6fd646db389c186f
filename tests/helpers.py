"""Small helpers shared by tests: metric deltas, bounded waiting for a condition, and the
secrets every test service runs with (a page-token key and a write token)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from prometheus_client import REGISTRY

from core.redisclient import RedisClient, keys_in_namespace
from core.settings import Settings
from service.auth import insecure_writer_channel

#: Keeps a test of a module opted in to both topologies (its ``settings`` is ``topo_settings``)
#: on one Redis: it needs one Redis process (one it stops, or one server's state).
standalone_only = pytest.mark.parametrize("redis_topology", ["standalone"], indirect=True)

PAGE_TOKEN_SECRET = "test-page-token-secret-not-for-production"
WRITE_TOKEN = "test-write-token-0123456789abcdef"


def make_settings(**overrides: Any) -> Settings:
    """Settings from no environment at all, with the test secrets, then ``overrides``."""
    values: dict[str, Any] = {"page_token_secret": PAGE_TOKEN_SECRET, "write_tokens": WRITE_TOKEN}
    return Settings.from_env({}, **(values | overrides))


def writer_channel(target: str, token: str = WRITE_TOKEN) -> aio.Channel:
    """A plaintext channel whose every call presents ``token`` (writes are authorized)."""
    return insecure_writer_channel(target, token)


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


def proc_status_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of ``pid`` in KiB from /proc/<pid>/status (VmRSS now, VmHWM the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"process {pid} reports no {field}")


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


async def delete_namespace(client: RedisClient, namespace: str) -> None:
    """Delete every key a test made under its own namespace (never anything else), on every
    primary of a cluster."""
    made = [k async for k in keys_in_namespace(client, f"{namespace}:*")]
    for start in range(0, len(made), 1000):
        await client.delete(*made[start : start + 1000])
