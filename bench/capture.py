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

Scenario ``price_rule`` (:func:`run_price_rule`): a price rule inserted for a category of
``WIDE`` products (a category of its own, loaded with capture off and removed after), capture on
and off, ``RULE_REPEATS`` times each: the statement-and-commit time, the outbox rows (the
trigger names the category's products, 100 per entry), and, with every product of the category
cached, the time from the commit until all their entries are gone.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
WIDE = 100_000
WIDE_CATEGORY = "bench-wide"
RULE_REPEATS = 5
RULE = (
    "INSERT INTO price_rules (id, name, scope, target_id, kind, value, priority) "
    "VALUES ('bench-wide-rule', 'bench', 'category', 'bench-wide', 'percent_off', 100, 1)"
)


@contextmanager
def invalidators(settings: Settings, split: bool) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One invalidator process (consumer, relay, view flusher) with default settings, or with
    ``split`` two: a relay-only one and a consumer-only one (docs/operations.md)."""
    roles = (
        [{"CATALOG_INVALIDATOR_CONSUME": "false"}, {"CATALOG_OUTBOX_RELAY": "false"}]
        if split
        else [{}]
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for role in roles:
            port = free_port()
            env = settings_env(settings) | role
            env |= {"CATALOG_INVALIDATOR_METRICS_PORT": str(port)}
            env |= {"CATALOG_INVALIDATOR_HEALTH_ADDRESS": ""}
            procs.append(subprocess.Popen([sys.executable, "-m", "invalidator"], env=env))
            wait_for_port(port, timeout=30)
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


class Deletions:
    """Key deletions timed by ``python -m bench.deletions``, a process of its own: keyspace
    notifications of DEL (``__keyevent@0__:del``), read off the load generator's event loop."""

    def __init__(self, redis: Redis, url: str) -> None:
        self.redis = redis
        self.url = url
        self.gone: dict[bytes, float] = {}

    async def __aenter__(self) -> Deletions:
        await self.redis.config_set("notify-keyspace-events", "Eg")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.deletions", self.url,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        ready = await self.proc.stdout.readline()
        if ready.strip() != b"ready":
            raise RuntimeError("the deletion listener did not start")
        return self

    async def wait_for(self, keys: set[bytes], within_s: float) -> None:
        """Until every key in ``keys`` was deleted or ``within_s`` passed (polls Redis)."""
        deadline = time.perf_counter() + within_s
        pending = list(keys)
        while pending and time.perf_counter() < deadline:
            present = await self.redis.exists(*pending[:1000])
            if present == 0:
                pending = pending[1000:]
            else:
                await asyncio.sleep(0.005)

    async def __aexit__(self, *exc: object) -> None:
        out, _ = await self.proc.communicate(b"")
        for line in out.decode().splitlines():
            at, _, key = line.partition(" ")
            self.gone[key.encode()] = float(at)


@dataclass(frozen=True)
class RatePhase:
    """Latencies (s) from COMMIT sent and from COMMIT returned, keys never deleted, and the CPU
    seconds the invalidator and the load generator used meanwhile."""

    from_sent: list[float]
    from_returned: list[float]
    lost: int
    commits: int
    invalidator_cpu_s: float
    generator_cpu_s: float
    elapsed_s: float


async def rate_phase(
    redis: Redis, settings: Settings, rate: int, seconds: float, invalidator_pids: list[int]
) -> RatePhase:
    """Commit at ``rate``/s from ``WRITERS`` connections."""
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
        async with Deletions(redis, settings.redis_url or "") as deletions:
            cpu0 = (cpu_seconds(invalidator_pids), time.process_time(), time.perf_counter())
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
            cpu1 = (cpu_seconds(invalidator_pids), time.process_time(), time.perf_counter())
    finally:
        for conn in conns:
            await conn.close()
    gone = deletions.gone
    from_sent = sorted(gone[k] - t[0] for k, t in sent.items() if k in gone)
    from_returned = sorted(gone[k] - t[1] for k, t in sent.items() if k in gone)
    return RatePhase(
        from_sent,
        from_returned,
        len(sent) - len(from_sent),
        len(sent),
        cpu1[0] - cpu0[0],
        cpu1[1] - cpu0[1],
        cpu1[2] - cpu0[2],
    )


async def sequential_phase(redis: Redis, settings: Settings, n: int) -> list[float]:
    """``n`` commits one at a time, each of a cached product; commit returned -> key gone (s)."""
    keys = Keys(settings.key_namespace)
    ids = [f"p{i:07d}" for i in range(PRODUCTS - n + 1, PRODUCTS + 1)]
    await cache(redis, keys, ids)
    stamps: list[tuple[bytes, float]] = []
    async with (
        await psycopg.AsyncConnection.connect(libpq_url(settings.database_url)) as conn,
        Deletions(redis, settings.redis_url or "") as deletions,
    ):
        for pid in ids:
            key = keys.product(pid).encode()
            await conn.execute(UPDATE, (pid,))
            await conn.commit()
            committed = time.perf_counter()
            await deletions.wait_for({key}, within_s=5)
            stamps.append((key, committed))
    latencies = [deletions.gone[k] - t for k, t in stamps if k in deletions.gone]
    return sorted(latencies)


async def idle_cpu(pids: list[int], seconds: float) -> float:
    """Cores the processes used over ``seconds`` of nothing to do (after a short settle)."""
    await asyncio.sleep(2.0)
    before = cpu_seconds(pids)
    await asyncio.sleep(seconds)
    return (cpu_seconds(pids) - before) / seconds


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
        async with Deletions(redis, settings.redis_url or "") as deletions:
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


async def vacuum(settings: Settings) -> None:
    """VACUUM the tables the phases churn, as autovacuum would between runs. Every commit here
    leaves a dead ``products`` row and a dead entry in the outbox's unsent index; on a server
    with autovacuum off (some benchmark machines) they pile up run after run, and the relay's
    scan of that index then costs tens of milliseconds: a figure of the machine, not the code."""
    async with await psycopg.AsyncConnection.connect(
        libpq_url(settings.database_url), autocommit=True
    ) as conn:
        await conn.execute("VACUUM (ANALYZE) outbox, products")


async def _outbox_rows(conn: psycopg.AsyncConnection[Any]) -> int:
    row = await (await conn.execute("SELECT coalesce(max(id), 0) FROM outbox")).fetchone()
    await conn.commit()
    return int(row[0]) if row else 0


def run(
    env: BenchEnv, seconds: float, rate: int = 1000, idle_s: float = IDLE_S, split: bool = False
) -> list[Row]:
    settings = env.settings()
    with invalidators(settings, split) as procs:
        one, load, cores, bulk = asyncio.run(
            _phases(settings, [p.pid for p in procs], rate, seconds, idle_s)
        )
    who = "relay + consumer processes" if split else "1 invalidator process"
    scenario = f"capture, plain UPDATE commits at {rate}/s for {seconds:.0f} s, {who}"
    bulk_scenario = f"capture, one UPDATE of {PRODUCTS // 1000}k products"
    alone = f"capture, {SEQUENTIAL} plain UPDATE commits one at a time, {who}"
    return [
        Row(alone, "commit returned -> key gone p50", percentile(one, 0.5) * 1000, "ms"),
        Row(alone, "commit returned -> key gone p99", percentile(one, 0.99) * 1000, "ms"),
        Row(scenario, "commit sent -> key gone p50", percentile(load.from_sent, 0.5) * 1000, "ms"),
        Row(scenario, "commit sent -> key gone p99", percentile(load.from_sent, 0.99) * 1000,
            "ms"),
        Row(scenario, "commit returned -> key gone p50",
            percentile(load.from_returned, 0.5) * 1000, "ms", target="<= 3"),
        Row(scenario, "commit returned -> key gone p99",
            percentile(load.from_returned, 0.99) * 1000, "ms", target="<= 10"),
        Row(scenario, "keys never deleted", load.lost, "keys", target="== 0"),
        Row(scenario, "invalidator CPU per commit", load.invalidator_cpu_s / load.commits * 1e6,
            "us"),
        Row(scenario, "invalidator CPU", load.invalidator_cpu_s / load.elapsed_s * 100,
            "% of a core"),
        Row(scenario, "load generator CPU", load.generator_cpu_s / load.elapsed_s * 100,
            "% of a core"),
        Row(f"capture, idle {who} for {idle_s:.0f} s", "CPU", cores * 100, "% of a core",
            target="<= 1"),
        Row.vs(bulk_scenario, "statement + commit, capture on (baseline: off)",
               bulk["on_s"] * 1000, "ms", bulk["off_s"] * 1000),
        Row(bulk_scenario, "outbox rows written", bulk["outbox_rows"], "rows"),
        Row(bulk_scenario, "commit -> every cached entry gone", bulk["all_gone_s"] * 1000, "ms"),
        Row(bulk_scenario, "entries never deleted", bulk["lost"], "keys", target="== 0"),
    ]  # fmt: skip


async def _phases(
    settings: Settings, pids: list[int], rate: int, seconds: float, idle_s: float
) -> tuple[list[float], RatePhase, float, dict[str, float]]:
    assert settings.redis_url
    redis = cast(Redis, connect(settings, socket_timeout=30))  # benchmarks: one Redis
    try:
        await _wait_ready(redis, Keys(settings.key_namespace))
        await vacuum(settings)
        one = await sequential_phase(redis, settings, SEQUENTIAL)
        await vacuum(settings)
        load = await rate_phase(redis, settings, rate, seconds, pids)
        cores = await idle_cpu(pids, idle_s)
        await vacuum(settings)
        bulk = await bulk_update(redis, settings)
        return one, load, cores, bulk
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


def run_price_rule(env: BenchEnv) -> list[Row]:
    settings = env.settings()
    with invalidators(settings, split=False):
        out = asyncio.run(_price_rule(settings))
    scenario = f"capture, a price rule inserted for a category of {WIDE // 1000}k products"
    return [
        Row.vs(scenario, "statement + commit, capture on (baseline: off), median",
               out["on_s"] * 1000, "ms", out["off_s"] * 1000),
        Row(scenario, "added by the trigger, median", (out["on_s"] - out["off_s"]) * 1000, "ms"),
        Row(scenario, "outbox rows written", out["outbox_rows"], "rows"),
        Row(scenario, "commit -> every cached entry of the category gone",
            out["all_gone_s"] * 1000, "ms"),
        Row(scenario, "entries still cached after that", out["lost"], "keys", target="== 0"),
    ]  # fmt: skip


async def _price_rule(settings: Settings) -> dict[str, float]:
    keys = Keys(settings.key_namespace)
    url = libpq_url(settings.database_url)
    ids = [f"w{i:07d}" for i in range(1, WIDE + 1)]
    redis = Redis.from_url(settings.redis_url)
    out: dict[str, float] = {}
    try:
        await _wait_ready(redis, keys)
        await vacuum(settings)
        async with await psycopg.AsyncConnection.connect(url) as conn:
            await _wide_category(conn, create=True)
            timings: dict[bool, list[float]] = {False: [], True: []}
            for n in range(RULE_REPEATS):
                for capture in (False, True):
                    if not capture:
                        await conn.execute("SET LOCAL catalog.capture = 'off'")
                    last = capture and n == RULE_REPEATS - 1
                    if last:  # the category cached, then timed until all of it is gone
                        await _drained(redis, keys)  # earlier rules' entries applied first
                        await cache(redis, keys, ids)
                        rows_before = await _outbox_rows(conn)
                    wanted = {keys.product(i).encode() for i in ids}
                    async with Deletions(redis, settings.redis_url or "") as deletions:
                        started = time.perf_counter()
                        await conn.execute(RULE)
                        await conn.commit()
                        committed = time.perf_counter()
                        timings[capture].append(committed - started)
                        if last:
                            await deletions.wait_for(wanted, within_s=120)
                    if last:
                        gone = [deletions.gone.get(k) for k in wanted]
                        out["outbox_rows"] = await _outbox_rows(conn) - rows_before
                        out["lost"] = await _still_cached(redis, keys, ids)
                        out["all_gone_s"] = (
                            max((g for g in gone if g is not None), default=committed) - committed
                        )
                    await conn.execute("SET LOCAL catalog.capture = 'off'")
                    await conn.execute("DELETE FROM price_rules WHERE id = 'bench-wide-rule'")
                    await conn.commit()
            await _wide_category(conn, create=False)
        out["off_s"] = percentile(sorted(timings[False]), 0.5)
        out["on_s"] = percentile(sorted(timings[True]), 0.5)
    finally:
        await redis.aclose()
    return out


async def _still_cached(redis: Redis, keys: Keys, ids: list[str]) -> int:
    n = 0
    for k in range(0, len(ids), 1000):
        n += int(await redis.exists(*(keys.product(i) for i in ids[k : k + 1000])))
    return n


async def _drained(redis: Redis, keys: Keys) -> None:
    """Until the group has read and acked every entry of the stream."""
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        [group] = await redis.xinfo_groups(keys.stream)
        if group["lag"] == 0 and group["pending"] == 0:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the invalidator did not catch up")


async def _wide_category(conn: psycopg.AsyncConnection[Any], *, create: bool) -> None:
    """Add (or remove) the category of WIDE products, with capture off: no cache has seen it."""
    await conn.execute("SET LOCAL catalog.capture = 'off'")
    await conn.execute("DELETE FROM price_rules WHERE id = 'bench-wide-rule'")
    await conn.execute("DELETE FROM products WHERE category_id = %s", (WIDE_CATEGORY,))
    await conn.execute("DELETE FROM categories WHERE id = %s", (WIDE_CATEGORY,))
    if create:
        await conn.execute(
            "INSERT INTO categories (id, name) VALUES (%s, 'Wide')", (WIDE_CATEGORY,)
        )
        await conn.execute(
            "INSERT INTO products (id, sku, name, category_id, brand_id, price_minor, currency, "
            "stock) SELECT 'w' || lpad(n::text, 7, '0'), 'SKU-w' || n, 'Wide', %s, "
            "(SELECT min(id) FROM brands), 1000, 'USD', 1 FROM generate_series(1, %s) AS n",
            (WIDE_CATEGORY, WIDE),
        )
    await conn.commit()
    if create:
        await conn.execute("ANALYZE products")
        await conn.commit()
