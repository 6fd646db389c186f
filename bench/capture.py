"""Change capture: commit -> key gone at a fixed commit rate, an idle invalidator's CPU, and what
a bulk UPDATE costs with the capture triggers.

1. Commits at ``rate``/s, each a plain one-row ``UPDATE`` (stock and version bumped) of a product
   whose entry is cached (written the way a fill leaves it), from ``WRITERS`` connections of this
   process. Nothing publishes by hand: the trigger writes the outbox row, its NOTIFY wakes the
   relay of one invalidator process, which XADDs; the consumer deletes the key. Redis keyspace
   notifications report each deletion to this process, which also timed the COMMIT, so "commit
   -> key gone" is measured on the committing client's clock, from the moment COMMIT was sent
   and from the moment it returned.
   Before that, ``SEQUENTIAL`` commits one at a time (the next once the key is gone): the path's
   own latency, without queueing behind other commits.
2. The invalidator's CPU time over ``IDLE_S`` seconds with nothing to do (``/proc``).
3. One ``UPDATE`` of every product (100k) with capture on and, for the baseline, off
   (``SET LOCAL catalog.capture = 'off'``): the statement-and-commit time and the outbox rows it
   wrote; then the time until every one of those products' cached entries is gone.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import psycopg
from redis.asyncio import Redis

from bench.environment import PRODUCTS, BenchEnv
from bench.invalidation import cache
from bench.measure import cpu_seconds, percentile
from bench.report import Row
from core.db import libpq_url
from core.keys import Keys
from core.redisclient import connect
from core.settings import Settings
from devtools.localservers import free_port, wait_for_port
from devtools.serverprocess import settings_env

WRITERS = 8
SEQUENTIAL = 200
IDLE_S = 30.0
UPDATE = "UPDATE products SET stock = stock + 1, version = version + 1 WHERE id = %s"
BULK = "UPDATE products SET stock = stock + 1"


@contextmanager
def invalidator(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    """One invalidator process (consumer, relay, view flusher) with default settings."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "invalidator"],
        env=settings_env(settings)
        | {
            "CATALOG_INVALIDATOR_METRICS_PORT": str(port),
            "CATALOG_INVALIDATOR_HEALTH_ADDRESS": "",
        },
    )
    try:
        wait_for_port(port, timeout=30)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


class Deletions:
    """Keyspace notifications of DEL, timed on arrival (``__keyevent@0__:del``)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.gone: dict[bytes, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Deletions:
        await self.redis.config_set("notify-keyspace-events", "Eg")
        self.pubsub = self.redis.pubsub()
        await self.pubsub.subscribe("__keyevent@0__:del")
        self._task = asyncio.create_task(self._listen())
        return self

    async def _listen(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] == "message":
                self.gone.setdefault(message["data"], time.perf_counter())

    async def wait_for(self, keys: set[bytes], within_s: float) -> None:
        deadline = time.perf_counter() + within_s
        while not keys <= self.gone.keys() and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]


async def rate_phase(
    redis: Redis, settings: Settings, rate: int, seconds: float
) -> tuple[list[float], list[float], int]:
    """Commit at ``rate``/s; latencies (s) from COMMIT sent and from COMMIT returned, and how
    many keys were never deleted."""
    keys = Keys(settings.key_namespace)
    n = int(rate * seconds)
    ids = [f"p{i:07d}" for i in range(1, min(n, PRODUCTS) + 1)]
    await cache(redis, keys, ids)
    url = libpq_url(settings.database_url)
    conns = [await psycopg.AsyncConnection.connect(url) for _ in range(WRITERS)]
    sent: dict[bytes, tuple[float, float]] = {}
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def writer(conn: psycopg.AsyncConnection[Any]) -> None:
        while (pid := await queue.get()) is not None:
            await conn.execute(UPDATE, (pid,))
            before = time.perf_counter()
            await conn.commit()
            sent[keys.product(pid).encode()] = (before, time.perf_counter())

    try:
        async with Deletions(redis) as deletions:
            workers = [asyncio.create_task(writer(c)) for c in conns]
            tick, per_tick = 0.01, max(1, rate // 100)
            start = time.perf_counter()
            for k in range(0, len(ids), per_tick):
                await asyncio.sleep(max(0.0, start + (k // per_tick) * tick - time.perf_counter()))
                for pid in ids[k : k + per_tick]:
                    queue.put_nowait(pid)
            for _ in workers:
                queue.put_nowait(None)
            await asyncio.gather(*workers)
            await deletions.wait_for(set(sent), within_s=15)
            gone = deletions.gone
    finally:
        for conn in conns:
            await conn.close()
    from_sent = sorted(gone[k] - t[0] for k, t in sent.items() if k in gone)
    from_returned = sorted(gone[k] - t[1] for k, t in sent.items() if k in gone)
    return from_sent, from_returned, len(sent) - len(from_sent)


async def sequential_phase(redis: Redis, settings: Settings, n: int) -> list[float]:
    """``n`` commits one at a time, each of a cached product; commit returned -> key gone (s)."""
    keys = Keys(settings.key_namespace)
    ids = [f"p{i:07d}" for i in range(PRODUCTS - n + 1, PRODUCTS + 1)]
    await cache(redis, keys, ids)
    latencies = []
    async with (
        await psycopg.AsyncConnection.connect(libpq_url(settings.database_url)) as conn,
        Deletions(redis) as deletions,
    ):
        for pid in ids:
            key = keys.product(pid).encode()
            await conn.execute(UPDATE, (pid,))
            await conn.commit()
            committed = time.perf_counter()
            await deletions.wait_for({key}, within_s=5)
            if key in deletions.gone:
                latencies.append(deletions.gone[key] - committed)
    return sorted(latencies)


async def idle_cpu(pid: int, seconds: float) -> float:
    """Cores the process used over ``seconds`` of nothing to do (after a short settle)."""
    await asyncio.sleep(2.0)
    before = cpu_seconds([pid])
    await asyncio.sleep(seconds)
    return (cpu_seconds([pid]) - before) / seconds


async def bulk_update(redis: Redis, settings: Settings) -> dict[str, float]:
    """One UPDATE of every product, capture off then on; with it on, until every entry is gone."""
    keys = Keys(settings.key_namespace)
    url = libpq_url(settings.database_url)
    out: dict[str, float] = {}
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute("SET LOCAL catalog.capture = 'off'")
        started = time.perf_counter()
        await conn.execute(BULK)
        await conn.commit()
        out["off_s"] = time.perf_counter() - started
        ids = [f"p{i:07d}" for i in range(1, PRODUCTS + 1)]
        await cache(redis, keys, ids)
        rows_before = await _outbox_rows(conn)
        async with Deletions(redis) as deletions:
            started = time.perf_counter()
            await conn.execute(BULK)
            await conn.commit()
            committed = time.perf_counter()
            out["on_s"] = committed - started
            await deletions.wait_for({keys.product(i).encode() for i in ids}, within_s=120)
            gone = [deletions.gone.get(keys.product(i).encode()) for i in ids]
        out["outbox_rows"] = await _outbox_rows(conn) - rows_before
        out["lost"] = sum(1 for g in gone if g is None)
        out["all_gone_s"] = max((g for g in gone if g is not None), default=committed) - committed
    return out


async def _outbox_rows(conn: psycopg.AsyncConnection[Any]) -> int:
    row = await (await conn.execute("SELECT coalesce(max(id), 0) FROM outbox")).fetchone()
    await conn.commit()
    return int(row[0]) if row else 0


def run(env: BenchEnv, seconds: float, rate: int = 1000, idle_s: float = IDLE_S) -> list[Row]:
    settings = env.settings()
    with invalidator(settings) as proc:
        one, sent, returned, lost, cores, bulk = asyncio.run(
            _phases(settings, proc.pid, rate, seconds, idle_s)
        )
    scenario = f"capture, plain UPDATE commits at {rate}/s for {seconds:.0f} s, 1 invalidator"
    bulk_scenario = f"capture, one UPDATE of {PRODUCTS // 1000}k products"
    alone = f"capture, {SEQUENTIAL} plain UPDATE commits one at a time, 1 invalidator"
    return [
        Row(alone, "commit returned -> key gone p50", percentile(one, 0.5) * 1000, "ms"),
        Row(alone, "commit returned -> key gone p99", percentile(one, 0.99) * 1000, "ms"),
        Row(scenario, "commit sent -> key gone p50", percentile(sent, 0.5) * 1000, "ms"),
        Row(scenario, "commit sent -> key gone p99", percentile(sent, 0.99) * 1000, "ms"),
        Row(scenario, "commit returned -> key gone p50", percentile(returned, 0.5) * 1000, "ms",
            target="<= 3"),
        Row(scenario, "commit returned -> key gone p99", percentile(returned, 0.99) * 1000, "ms",
            target="<= 10"),
        Row(scenario, "keys never deleted", lost, "keys", target="== 0"),
        Row(f"capture, idle invalidator for {idle_s:.0f} s", "CPU", cores * 100, "% of a core",
            target="<= 1"),
        Row.vs(bulk_scenario, "statement + commit, capture on (baseline: off)",
               bulk["on_s"] * 1000, "ms", bulk["off_s"] * 1000),
        Row(bulk_scenario, "outbox rows written", bulk["outbox_rows"], "rows"),
        Row(bulk_scenario, "commit -> every cached entry gone", bulk["all_gone_s"] * 1000, "ms"),
        Row(bulk_scenario, "entries never deleted", bulk["lost"], "keys", target="== 0"),
    ]  # fmt: skip


async def _phases(
    settings: Settings, pid: int, rate: int, seconds: float, idle_s: float
) -> tuple[list[float], list[float], list[float], int, float, dict[str, float]]:
    assert settings.redis_url
    redis = cast(Redis, connect(settings, socket_timeout=30))  # benchmarks: one Redis
    try:
        await _wait_ready(redis, Keys(settings.key_namespace))
        one = await sequential_phase(redis, settings, SEQUENTIAL)
        sent, returned, lost = await rate_phase(redis, settings, rate, seconds)
        cores = await idle_cpu(pid, idle_s)
        bulk = await bulk_update(redis, settings)
        return one, sent, returned, lost, cores, bulk
    finally:
        await redis.aclose()


async def _wait_ready(redis: Redis, keys: Keys) -> None:
    """Until the consumer joined its group (the relay listens before that)."""
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        if await redis.exists(keys.stream):
            groups = await redis.xinfo_groups(keys.stream)
            if groups and groups[0]["consumers"] >= 1:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError("the invalidator did not join the group")
