"""Consumer processes (``python -m invalidator``): SIGKILL mid-stream loses nothing, SIGTERM
finishes and leaves cleanly. Conditions are polled with a bound; timing is never asserted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from core.cache.store import CacheStore
from core.events import PRICE_RULE_CHANGED, PRODUCT_UPDATED, new_event
from core.keys import Keys
from core.publisher import Publisher
from core.redisclient import mget
from core.settings import Settings
from invalidator.deadletter import list_dead_letters
from tests.helpers import eventually
from tests.invalidator.conftest import exists, fill, group_info


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """Every test of this module runs on one Redis and on a Redis Cluster."""
    return topo_settings


ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class Processes:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        environ = {
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(ROOT),
            "CATALOG_REDIS_URL": self.settings.redis_url,
            "CATALOG_REDIS_MODE": self.settings.redis_mode,
            "CATALOG_KEY_NAMESPACE": self.settings.key_namespace,
            "CATALOG_INVALIDATOR_CONSUMER": name,
            "CATALOG_INVALIDATOR_BLOCK_MS": "200",
            "CATALOG_INVALIDATOR_CLAIM_MIN_IDLE_MS": "1000",
            "CATALOG_INVALIDATOR_CLAIM_INTERVAL_MS": "100",
            "CATALOG_INVALIDATOR_METRICS_PORT": "0",
            "CATALOG_INVALIDATOR_HEALTH_ADDRESS": "",
            "CATALOG_OUTBOX_RELAY": "false",
            "CATALOG_LOG_LEVEL": "WARNING",
            **env,
        }
        proc = subprocess.Popen([sys.executable, "-m", "invalidator"], env=environ, cwd=ROOT)
        self.procs.append(proc)
        return proc


@pytest.fixture
def processes(settings: Settings) -> Iterator[Processes]:
    group = Processes(settings)
    yield group
    for proc in group.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def consumer_pending(redis: Redis, keys: Keys, name: str) -> int:
    for info in await redis.xinfo_consumers(keys.stream, keys.group):
        if info["name"].decode() == name:
            return int(info["pending"])
    return 0


async def stop_holding_entries(
    redis: Redis, keys: Keys, proc: subprocess.Popen[bytes], name: str
) -> int:
    """SIGSTOP ``proc`` so that entries delivered to it stay unacked; returns how many it holds.

    If the frozen consumer holds nothing of its own (a fast consumer holds a batch only
    briefly), a batch of undelivered entries is read in its name: exactly what a consumer that
    read a batch and then froze leaves behind. So the outcome never depends on catching a short
    window, only on the stream still having undelivered entries.
    """

    async def joined() -> bool:  # it reads, so its signal handlers are in place
        assert proc.poll() is None
        consumers = await redis.xinfo_consumers(keys.stream, keys.group)
        return any(c["name"].decode() == name for c in consumers)

    await eventually(joined, what=f"{name} to join the group")
    proc.send_signal(signal.SIGSTOP)
    if held := await consumer_pending(redis, keys, name):
        return held
    await redis.xreadgroup(keys.group, name, {keys.stream: ">"}, count=50)
    held = await consumer_pending(redis, keys, name)
    assert held, f"{name} holds nothing and the stream had no undelivered entries to give it"
    return held


async def drained(redis: Redis, keys: Keys, total: int) -> bool:
    info = await group_info(redis, keys)
    return bool(info["pending"] == 0 and info["lag"] == 0 and info["entries-read"] == total)


async def test_sigkilled_consumer_loses_nothing(
    processes: Processes, store: CacheStore, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    total = 10_000
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(total):  # one cached product per event, plus bystanders that must stay
            pipe.set(keys.product(str(i)), b"v", px=600_000)
        await pipe.execute()
    for i in range(20):
        await fill(store, keys.product(f"other{i}"))
    await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    victim = processes.start("victim", CATALOG_INVALIDATOR_BATCH_SIZE="100")
    survivor = processes.start("survivor", CATALOG_INVALIDATOR_BATCH_SIZE="100")
    for start in range(0, total, 500):
        await publisher.publish_many(
            new_event(PRODUCT_UPDATED, product_id=str(i)) for i in range(start, start + 500)
        )

    async def a_third_in() -> bool:
        return int((await group_info(redis, keys))["entries-read"] or 0) >= total // 3

    await eventually(a_third_in, what="a third of the events read")
    held = await stop_holding_entries(redis, keys, victim, "victim")
    victim.kill()
    victim.wait()

    await eventually(lambda: drained(redis, keys, total), timeout=120, what="all acked")
    assert held > 0
    assert await consumer_pending(redis, keys, "victim") == 0
    assert await redis.xpending_range(keys.stream, keys.group, "-", "+", 10) == []
    stale = [
        i
        for i, there in enumerate(await mget(redis, [keys.product(str(i)) for i in range(total)]))
        if there
    ]
    assert stale == []
    assert all(await exists(redis, *(keys.product(f"other{i}") for i in range(20))))
    assert survivor.poll() is None


async def test_sigterm_with_pending_work_finishes_and_leaves_cleanly(
    processes: Processes, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    total = 5000
    await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    for start in range(0, total, 500):
        await publisher.publish_many(
            new_event(PRODUCT_UPDATED, product_id=str(i)) for i in range(start, start + 500)
        )
    first = processes.start("first", CATALOG_INVALIDATOR_BATCH_SIZE="50")
    await stop_holding_entries(redis, keys, first, "first")
    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGCONT)
    assert first.wait(60) == 0  # 0: it left the group holding nothing
    names = [c["name"] for c in await redis.xinfo_consumers(keys.stream, keys.group)]
    assert b"first" not in names
    assert (await group_info(redis, keys))["pending"] == 0
    # What it did not read is still there for the next consumer: nothing was lost.
    processes.start("second")
    await eventually(lambda: drained(redis, keys, total), timeout=60, what="rest consumed")


async def test_process_survives_hostile_entries_and_applies_the_valid_ones(
    processes: Processes, store: CacheStore, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    """What once killed the process on every start: an occurred_at of 400 nines (overflow in the
    lag metric) and of 5000 digits (int() refuses it), beside non-UTF-8 and a 1 MB entry."""
    base = {"schema": "1", "type": PRODUCT_UPDATED, "event_id": "e", "product_id": "h"}
    hostile: list[dict[Any, Any]] = [
        {**base, "occurred_at": "9" * 400},
        {**base, "occurred_at": "9" * 5000},
        {**base, "occurred_at": "1", "product_id": b"\xff"},
        {**base, "occurred_at": "1", "blob": "x" * 1_000_000},
    ]
    for pid in ("before", "after"):
        await fill(store, keys.product(pid))
    await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    for fields in hostile:
        await redis.xadd(keys.stream, fields)
    await publisher.publish(new_event(PRODUCT_UPDATED, product_id="before"))
    proc = processes.start("tough")

    async def dead_lettered() -> bool:
        assert proc.poll() is None, "the invalidator exited"
        return int(await redis.xlen(keys.dead_letter_stream)) == len(hostile)

    await eventually(dead_lettered, timeout=60, what="hostile entries dead-lettered")
    await eventually(lambda: drained(redis, keys, len(hostile) + 1), what="all acked")
    assert await exists(redis, keys.product("before")) == [False]
    await publisher.publish(new_event(PRODUCT_UPDATED, product_id="after"))
    await eventually(lambda: drained(redis, keys, len(hostile) + 2), what="later event acked")
    assert await exists(redis, keys.product("after")) == [False]
    assert proc.poll() is None


@pytest.mark.parametrize("resolve", ["true", "false"])
async def test_a_consumer_only_process_looks_up_a_scope_only_rule_or_sets_it_aside(
    resolve: str,
    processes: Processes,
    store: CacheStore,
    publisher: Publisher,
    redis: Redis,
    keys: Keys,
    database_url: str,
) -> None:
    """No relay, no view flusher: the process has a database only to look up the products of a
    price rule that names a category alone; told it has none, it dead-letters such a rule."""
    import sqlalchemy as sa

    from core.db import create_engine

    engine = create_engine(Settings.from_env({}, database_url=database_url))
    try:
        async with engine.connect() as conn:
            covered = list(
                (
                    await conn.execute(
                        sa.text("SELECT id FROM products WHERE category_id = 'c00005'")
                    )
                ).scalars()
            )
    finally:
        await engine.dispose()
    assert covered
    for pid in [*covered, "bystander"]:
        await fill(store, keys.product(pid))
    await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    await publisher.publish(new_event(PRICE_RULE_CHANGED, category_id="c00005"))
    processes.start(
        "consumer-only",
        CATALOG_DATABASE_URL=database_url,
        CATALOG_VIEWS_FLUSH="false",
        CATALOG_INVALIDATOR_RESOLVE_SCOPES=resolve,
    )
    await eventually(lambda: drained(redis, keys, 1), timeout=60, what="the rule handled")
    still = await exists(redis, *(keys.product(pid) for pid in covered))
    letters = await list_dead_letters(redis, keys)
    if resolve == "true":
        assert (still, letters) == ([False] * len(covered), [])
    else:
        assert still == [True] * len(covered)
        assert "CATALOG_INVALIDATOR_RESOLVE_SCOPES=false" in letters[0].reason
    assert await exists(redis, keys.product("bystander")) == [True]
