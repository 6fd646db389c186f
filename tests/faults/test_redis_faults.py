"""Redis faults under a read load on a service process: killed, then back empty, then paused by
CLIENT PAUSE; paused by SIGSTOP; and restarted empty under a running invalidator.

Acceptance figures (issue #6): 0 failed reads while Redis is gone (served from PostgreSQL); hits
resume within 5 s of Redis' return; while Redis is paused 2 s no read exceeds its deadline; after
a restart that loses the stream and its group, the invalidator recreates the group, the events
published afterwards are applied and acked, and the cold cache is correct (``verify``: 0 stale).
The deadline of every read is 2 s. A read that falls back pays at most the Redis command timeout
(0.25 s) and a lease wait of at most half its remaining time (core/deadlines.py) before
PostgreSQL, so it fits any deadline by construction; 2 s rather than the 0.5 s callers use
absorbs the scheduling stalls of a shared 2-core machine (1 s stalls seen at load average 6).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from grpc import aio
from redis.asyncio import Redis

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.db import create_engine
from core.keys import Keys
from core.settings import Settings
from devtools.localservers import RedisProcess
from devtools.serverprocess import ServerProcess
from devtools.workload import update_plain
from ops.verify import render, verify
from tests.faults.conftest import (
    PRODUCT_IDS,
    Invalidators,
    Outcome,
    ReadLoad,
    pause_process,
    wait_until,
)
from tests.invalidator.conftest import group_info
from tests.invalidator.test_processes import drained

pytestmark = pytest.mark.fault
LOAD_SECONDS = 20.0
DEADLINE_S = 2.0
HITS_RESUME_S = 5.0
PAUSE_S = 2.0


def reads_during_pause(
    outcomes: list[Outcome], paused_at: float, resumed_at: float
) -> list[Outcome]:
    """Reads whose deadline overlaps the pause: started at most DEADLINE_S before it, or in it."""
    return [o for o in outcomes if paused_at - DEADLINE_S <= o.started <= resumed_at]


@pytest.fixture
def server(settings: Settings, private_redis: RedisProcess) -> Iterator[ServerProcess]:
    proc = ServerProcess(settings.replace(redis_url=private_redis.url)).start()
    yield proc
    proc.stop()


def lookups(server: ServerProcess) -> Callable[[str], float]:
    """The server's GetProduct cache lookups with a given result (hit, miss, bypass)."""
    return lambda result: server.metric("catalog_cache_requests_total", op="get", result=result)


async def warm_load(server: ServerProcess, count: Callable[[str], float]) -> ReadLoad:
    """Start the read load and wait until the cache serves it."""
    load = ReadLoad(server.target, deadline_s=DEADLINE_S, max_seconds=LOAD_SECONDS).start()
    await wait_until(lambda: count("hit") > 500, 15, "a warm cache")
    return load


async def test_reads_never_fail_while_redis_is_killed_restarted_empty_and_paused(
    server: ServerProcess, private_redis: RedisProcess
) -> None:
    count = lookups(server)
    load = await warm_load(server, count)

    # 1. SIGKILL: reads go to PostgreSQL behind the breaker.
    assert private_redis.proc is not None
    private_redis.proc.kill()
    private_redis.proc.wait()
    killed_at = time.monotonic()
    bypassed = count("bypass")
    await wait_until(
        lambda: (
            server.metric("catalog_breaker_opened_total") >= 1 and count("bypass") > bypassed + 200
        ),
        15,
        "reads served from PostgreSQL",
    )

    # 2. Back on the same port, empty: hits resume by themselves.
    private_redis.start()
    back_at = time.monotonic()
    hits = count("hit")
    resumed_s = await wait_until(lambda: count("hit") > hits, HITS_RESUME_S, "hits to resume")

    # 3. Paused 2 s (all commands), by Redis' own clock: our PING returns when it is over.
    admin = Redis.from_url(private_redis.url, socket_timeout=10)
    try:
        await admin.client_pause(2000, all=True)
        paused_at = time.monotonic()
        await admin.ping()
        unpaused_at = time.monotonic()
    finally:
        await admin.aclose()
    assert load.running, "the faults fit in the 20 s load"

    outcomes = await load.wait()
    codes = load.codes()
    during_pause = reads_during_pause(outcomes, paused_at, unpaused_at)
    print(
        f"\n{len(outcomes)} reads in {LOAD_SECONDS:.0f} s: {dict(codes)}; Redis down "
        f"{back_at - killed_at:.2f} s, hits resumed {resumed_s:.2f} s after its return; "
        f"paused {unpaused_at - paused_at:.2f} s, {len(during_pause)} reads then, slowest "
        f"{max(o.seconds for o in during_pause) * 1000:.0f} ms; slowest overall "
        f"{max(o.seconds for o in outcomes) * 1000:.0f} ms"
    )
    failed = [
        f"{o.code.name} started {o.started - killed_at:+.2f} s from the kill, "
        f"took {o.seconds:.2f} s"
        for o in outcomes
        if o.code.name != "OK"
    ]
    assert codes.keys() == {"OK"}, (
        f"{failed}; back at {back_at - killed_at:+.2f} s, paused at {paused_at - killed_at:+.2f} s"
    )
    assert during_pause
    assert max(o.seconds for o in outcomes) < DEADLINE_S


async def test_no_read_exceeds_its_deadline_while_redis_is_sigstopped(
    server: ServerProcess, private_redis: RedisProcess
) -> None:
    """SIGSTOP, unlike CLIENT PAUSE, also stops Redis accepting connections and answering PING."""

    count = lookups(server)
    load = await warm_load(server, count)
    bypassed = count("bypass")
    assert private_redis.proc is not None
    paused_at, resumed_at = await pause_process(private_redis.proc, PAUSE_S)
    await wait_until(
        lambda: load.codes(since=resumed_at)["OK"] >= 200, 15, "reads served after the pause"
    )
    outcomes = await load.stop()

    during = reads_during_pause(outcomes, paused_at, resumed_at)
    print(
        f"\n{len(outcomes)} reads: {dict(load.codes())}; stopped {resumed_at - paused_at:.2f} s, "
        f"{len(during)} reads then ({count('bypass') - bypassed:.0f} served from PostgreSQL), "
        f"slowest {max(o.seconds for o in during) * 1000:.0f} ms of {DEADLINE_S * 1000:.0f}"
    )
    assert load.codes().keys() == {"OK"}, load.codes()
    assert during
    assert count("bypass") > bypassed, "reads fell back to PostgreSQL while Redis was stopped"
    assert max(o.seconds for o in outcomes) < DEADLINE_S


@pytest.fixture
def writable(
    settings: Settings, private_redis: RedisProcess, fresh_database_url: str
) -> Iterator[ServerProcess]:
    """A service process on the private Redis and a database of this test's own."""
    proc = ServerProcess(
        settings.replace(redis_url=private_redis.url, database_url=fresh_database_url)
    )
    yield proc.start()
    proc.stop()


async def test_invalidator_recreates_its_group_when_redis_restarts_empty_and_cache_stays_correct(
    writable: ServerProcess, private_redis: RedisProcess, invalidators: Invalidators
) -> None:
    s = writable.settings
    keys = Keys(s.key_namespace)
    invalidators.settings = s
    consumer = invalidators.start("only")  # relays the outbox too
    redis = Redis.from_url(private_redis.url, socket_timeout=5)
    engine = create_engine(s)
    ids = PRODUCT_IDS[:50]
    try:
        async with aio.insecure_channel(writable.target) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)

            async def versions() -> dict[str, int]:
                reply = await stub.BatchGetProducts(pb.BatchGetProductsRequest(ids=ids), timeout=5)
                return {r.product.id: r.product.version for r in reply.results}

            async def cached() -> bool:
                await versions()
                return bool(await redis.exists(*map(keys.product, ids)) == len(ids))

            async def applied(events: int) -> bool:
                gone = not await redis.exists(*map(keys.product, ids))
                return gone and await drained(redis, keys, events)

            async def update_all() -> dict[str, int]:
                return {pid: await update_plain(engine, pid) for pid in ids}

            # Before the restart the pipeline works: outbox -> relay -> stream -> group -> keys.
            await wait_until(cached, 15, "the products cached")
            await update_all()
            await wait_until(lambda: applied(len(ids)), 30, "the events applied")

            private_redis.stop()
            private_redis.start()
            restarted_at = time.monotonic()
            await redis.aclose()  # its connections died with the server
            redis = Redis.from_url(private_redis.url, socket_timeout=5)
            assert [k async for k in redis.scan_iter(match=keys.product_pattern)] == []
            # Its next XREADGROUP gets NOGROUP: the consumer recreates the group (from id 0).
            recreated_s = await wait_until(
                lambda: _group_exists(redis, keys), 15, "the group recreated"
            )

            await wait_until(cached, 15, "the products cached again (cold cache refilled)")
            committed = await update_all()
            published_at = time.monotonic()
            applied_s = await wait_until(
                lambda: applied(len(ids)), 30, "the events published after the restart applied"
            )
            assert await versions() == committed, "reads return the data committed last"
            # A pooled connection that died with the server costs one read a bypass when it is
            # next used (the names subscription also holds one, so which one varies): read
            # until they are cached again, then check them.
            await wait_until(cached, 15, "the products cached after the updates")
            report = await verify(redis, engine, keys)
        print(
            f"\ngroup recreated {recreated_s:.2f} s after Redis was back; {len(ids)} events "
            f"published after it applied and acked in {applied_s:.2f} s "
            f"({published_at - restarted_at:.2f} s after the restart)\n"
            f"{render(report, s.key_namespace)}"
        )
        assert report.products >= len(ids)
        assert report.stale == []
        assert (await group_info(redis, keys))["pending"] == 0
        assert consumer.poll() is None, "the invalidator kept running"
    finally:
        await engine.dispose()
        await redis.aclose()


async def _group_exists(redis: Redis, keys: Keys) -> bool:
    return int((await group_info(redis, keys))["pending"]) >= 0
