"""Invalidation: ``product.updated`` published at a fixed rate, and a backlog drained flat out.

Every event names a product whose entry is cached (written here the way a fill leaves it; a
product's key is derived from the event's id, so no set indexes it). Redis keyspace
notifications report each entry's deletion to this process, which also timed the XADD, so
"XADD -> key gone" is measured on one clock (on a cluster, each primary notifies of its own keys:
this process subscribes on every one). Then a backlog is added at once and each invalidator's
processed-events counter gives its rate; their CPU (/proc) over the drain gives the cost per event.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from bench.environment import BenchEnv
from bench.measure import cpu_seconds, percentile
from bench.report import Row
from core.cache import entry
from core.clusterclient import Cluster
from core.events import PRODUCT_UPDATED, new_event
from core.keys import Keys
from core.publisher import Publisher
from core.redisclient import RedisClient, connect
from core.settings import Settings
from devtools.localservers import free_port, wait_for_port
from devtools.serverprocess import scrape, settings_env

PAYLOAD = b"x" * 700  # about a product's size
MAXLEN = 1_000_000


class Drained(NamedTuple):
    rates: list[float]  # events/s of each invalidator
    cpu_s_per_1k: float  # the invalidators' CPU per 1k events
    publisher_cores: float  # this process's CPU: the XADDs, and polling the group until idle


class Invalidator(NamedTuple):
    port: int  # of its metrics
    pid: int


@contextmanager
def invalidators(settings: Settings, n: int, relay: bool = False) -> Iterator[list[Invalidator]]:
    """``n`` invalidator processes (relaying the outbox or not), once they serve metrics."""
    ports = [free_port() for _ in range(n)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "invalidator"],
            env=settings_env(settings)
            | {
                "CATALOG_OUTBOX_RELAY": str(relay).lower(),
                "CATALOG_INVALIDATOR_METRICS_PORT": str(port),
                "CATALOG_INVALIDATOR_HEALTH_ADDRESS": "",
            },
        )
        for port in ports
    ]
    try:
        for port in ports:
            wait_for_port(port, timeout=30)
        yield [Invalidator(port, proc.pid) for port, proc in zip(ports, procs, strict=True)]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


async def cache(redis: RedisClient, keys: Keys, ids: list[str]) -> None:
    """Cache an entry for each id (version 1)."""
    fresh = int(time.time() * 1000) + 600_000
    value = entry.pack_product(PAYLOAD, "c1", "b1", 1, fresh, 1)
    for k in range(0, len(ids), 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in ids[k : k + 1000]:
                pipe.set(keys.product(i), value, px=600_000)
            await pipe.execute()


async def servers(redis: RedisClient) -> list[Redis]:
    """A plain client per Redis server that holds keys: ``redis`` itself, or each primary."""
    if isinstance(redis, Cluster):
        await redis.ready()
        return [redis.node_client(node) for node in redis.get_primaries()]
    assert isinstance(redis, Redis)
    return [redis]


async def rate_phase(
    redis: RedisClient, settings: Settings, rate: int, seconds: float
) -> tuple[list[float], int]:
    """Publish at ``rate``/s; latencies (s) of the entries that went, and how many never did."""
    keys = Keys(settings.key_namespace)
    ids = [f"r{n:07d}" for n in range(int(rate * seconds))]
    await cache(redis, keys, ids)
    publisher = Publisher(redis, keys, maxlen=MAXLEN)
    sent: dict[bytes, float] = {}
    gone: dict[bytes, float] = {}
    pubsubs = [server.pubsub() for server in await servers(redis)]
    for pubsub in pubsubs:
        await pubsub.subscribe("__keyevent@0__:del")

    async def listen(pubsub: PubSub) -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                gone.setdefault(message["data"], time.perf_counter())

    listeners = [asyncio.create_task(listen(pubsub)) for pubsub in pubsubs]
    tick, per_tick = 0.01, max(1, rate // 100)
    start = time.perf_counter()
    for n in range(0, len(ids), per_tick):
        await asyncio.sleep(max(0.0, start + (n // per_tick) * tick - time.perf_counter()))
        batch = ids[n : n + per_tick]
        now = time.perf_counter()
        for i in batch:
            sent[keys.product(i).encode()] = now
        await publisher.publish_many(
            new_event(PRODUCT_UPDATED, product_id=i, version=2) for i in batch
        )
    deadline = time.perf_counter() + 10
    while len(gone.keys() & sent.keys()) < len(sent) and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    for listener in listeners:
        listener.cancel()
    for pubsub in pubsubs:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    latencies = sorted(gone[k] - t for k, t in sent.items() if k in gone)
    return latencies, len(sent) - len(latencies)


async def drain_phase(
    redis: RedisClient, settings: Settings, procs: list[Invalidator], count: int
) -> Drained:
    """Add ``count`` events at once; each invalidator's events/s until the group is idle."""
    ports = [p.port for p in procs]
    keys = Keys(settings.key_namespace)
    ids = [f"d{n:07d}" for n in range(count)]
    await cache(redis, keys, ids)
    publisher = Publisher(redis, keys, maxlen=MAXLEN)
    before = [scrape(p, "catalog_invalidator_events_total", outcome="processed") for p in ports]
    cpu, own = cpu_seconds([p.pid for p in procs]), time.process_time()
    start = time.perf_counter()
    for k in range(0, count, 2000):
        await publisher.publish_many(
            new_event(PRODUCT_UPDATED, product_id=i, version=2) for i in ids[k : k + 2000]
        )
    while True:
        groups = await redis.xinfo_groups(keys.stream)
        if all(g["lag"] == 0 and g["pending"] == 0 for g in groups):
            break
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - start
    cpu, own = cpu_seconds([p.pid for p in procs]) - cpu, time.process_time() - own
    after = [scrape(p, "catalog_invalidator_events_total", outcome="processed") for p in ports]
    rates = [(a - b) / elapsed for a, b in zip(after, before, strict=True)]
    return Drained(rates, cpu / count * 1000, own / elapsed)


def run(
    env: BenchEnv,
    seconds: float,
    backlog: int,
    rate: int = 1000,
    counts: tuple[int, ...] = (1, 2),
    settings_of: Callable[[], Settings] | None = None,
    label: str = "invalidation",
) -> list[Row]:
    """Both phases with each number of invalidators in ``counts``, on the servers of
    ``settings_of`` (default: :meth:`BenchEnv.settings`, one Redis)."""
    rows: list[Row] = []
    for n in counts:
        settings = (settings_of or env.settings)()
        with invalidators(settings, n) as procs:
            lat, lost, drained = asyncio.run(_phases(settings, procs, rate, seconds, backlog))
        rates = drained.rates
        scenario = f"{label}, {n} invalidator(s), {rate} events/s for {seconds:.0f} s"
        rows += [
            Row(scenario, "XADD -> key gone p50", percentile(lat, 0.5) * 1000, "ms"),
            Row(scenario, "XADD -> key gone p99", percentile(lat, 0.99) * 1000, "ms", target="<= 50"),  # noqa: E501
            Row(scenario, "keys never deleted", lost, "keys", target="== 0"),
            Row(scenario, "max events/s per invalidator (backlog)", max(rates), "events/s",
                target=">= 5000" if n == 1 else ""),
            Row(scenario, "events/s, all invalidators (backlog)", sum(rates), "events/s"),
            Row(scenario, "invalidator CPU per 1k events (backlog)", drained.cpu_s_per_1k, "s"),
            Row(scenario, "publisher CPU (backlog)", drained.publisher_cores, "cores"),
        ]  # fmt: skip
    return rows


async def _phases(
    settings: Settings, procs: list[Invalidator], rate: int, seconds: float, backlog: int
) -> tuple[list[float], int, Drained]:
    assert settings.redis_url
    redis = connect(settings, socket_timeout=30)
    try:
        for server in await servers(redis):
            await server.config_set("notify-keyspace-events", "Eg")
        await wait_ready(redis, Keys(settings.key_namespace), len(procs))
        lat, lost = await rate_phase(redis, settings, rate, seconds)
        return lat, lost, await drain_phase(redis, settings, procs, backlog)
    finally:
        await redis.aclose()


async def wait_ready(redis: RedisClient, keys: Keys, n: int) -> None:
    """Until ``n`` consumers joined the group (the stream exists once one did)."""
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        if await redis.exists(keys.stream):
            groups = await redis.xinfo_groups(keys.stream)
            if groups and groups[0]["consumers"] >= n:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{n} invalidators did not join the group")
