"""50,000 views sent concurrently through two server processes while two invalidator processes
flush every 10 ms: PostgreSQL ends with exactly the views sent, and flushes ran during the load.
Conditions are polled with a bound; timing is never asserted."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from redis.asyncio import Redis

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.db import libpq_url
from core.keys import Keys
from core.settings import Settings
from devtools.localservers import free_port, wait_for_port
from devtools.serverprocess import ServerProcess, scrape, settings_env
from tests.helpers import eventually, writer_channel

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
KNOWN = [f"p{n:07d}" for n in range(1, 201)]
GHOSTS = ["ghost-1", "ghost-2"]


@dataclass
class Stack:
    servers: list[ServerProcess]
    flushers: list[subprocess.Popen[bytes]]
    flusher_metrics: list[int]
    db: str


@pytest.fixture
def stack(settings: Settings, fresh_database_url: str) -> Iterator[Stack]:
    base = settings.replace(database_url=fresh_database_url)
    stack = Stack([], [], [], libpq_url(fresh_database_url))
    try:
        for _ in range(2):
            stack.servers.append(ServerProcess(base).start())
        for n in range(2):
            port = free_port()
            env = settings_env(base) | {
                "CATALOG_INVALIDATOR_CONSUMER": f"flusher-{n}",
                "CATALOG_INVALIDATOR_METRICS_PORT": str(port),
                "CATALOG_INVALIDATOR_HEALTH_ADDRESS": "",
                "CATALOG_OUTBOX_RELAY": "false",
                "CATALOG_VIEWS_FLUSH_INTERVAL_S": "0.01",
                "CATALOG_LOG_LEVEL": "WARNING",
            }
            cmd = [sys.executable, "-m", "invalidator"]
            stack.flushers.append(subprocess.Popen(cmd, env=env, cwd=ROOT))
            stack.flusher_metrics.append(port)
        for port in stack.flusher_metrics:
            wait_for_port(port, timeout=30)
        yield stack
    finally:
        for server in stack.servers:
            server.stop()
        for proc in stack.flushers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def query(url: str, sql: str) -> list[tuple[str, int]]:
    with psycopg.connect(url) as conn:
        return [(str(r[0]), int(r[1])) for r in conn.execute(sql).fetchall()]


def flush_records(url: str) -> int:
    return query(url, "SELECT 'n', count(*) FROM view_flushes")[0][1]


def at_least(value: Callable[[], int], n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return value() >= n

    return check


async def test_50k_concurrent_views_over_processes_reach_postgresql_exactly(
    stack: Stack, redis: Redis, settings: Settings
) -> None:
    rng = random.Random(7)
    batches = [
        [rng.choice(GHOSTS) if rng.random() < 0.01 else rng.choice(KNOWN) for _ in range(100)]
        for _ in range(500)
    ]
    sent = Counter(product_id for batch in batches for product_id in batch)
    assert sent.total() == 50_000
    channels = [writer_channel(s.target) for s in stack.servers]
    stubs = [catalog_pb2_grpc.CatalogServiceStub(c) for c in channels]
    try:
        # A first view, flushed: both flusher loops are running before the load starts.
        await stubs[0].RecordProductViews(pb.RecordProductViewsRequest(product_ids=["p0000001"]))
        sent["p0000001"] += 1
        await eventually(at_least(lambda: flush_records(stack.db), 1), 60, "a first flush")
        before = flush_records(stack.db)

        limit = asyncio.Semaphore(64)

        async def send(n: int, batch: list[str]) -> None:
            async with limit:
                request = pb.RecordProductViewsRequest(product_ids=batch)
                reply = await stubs[n % 2].RecordProductViews(request, timeout=60)
                assert reply.recorded == len(batch)

        await asyncio.gather(*(send(n, batch) for n, batch in enumerate(batches)))
        during = flush_records(stack.db) - before
    finally:
        for channel in channels:
            await channel.close(None)

    expected = {k: v for k, v in sent.items() if k in KNOWN}
    total = sum(expected.values())

    def flushed() -> int:
        return query(stack.db, "SELECT 'n', coalesce(sum(views), 0) FROM product_stats")[0][1]

    await eventually(at_least(flushed, total), 60, "every view flushed")
    assert dict(query(stack.db, "SELECT product_id, views FROM product_stats")) == expected
    keys = Keys(settings.key_namespace)
    assert await redis.hlen(keys.views_pending) == 0
    assert await redis.scard(keys.views_flushes) == 0
    assert during >= 2, f"only {during} flushes ran during the load"

    ghosts = sum(sent[g] for g in GHOSTS)

    def dropped() -> int:
        return int(sum(scrape(p, "catalog_views_dropped_total") for p in stack.flusher_metrics))

    await eventually(at_least(dropped, ghosts), 30, "unknown ids dropped")
    assert dropped() == ghosts
