"""The soak: 5 minutes of Zipf reads and updates on real processes (through UpdateProduct, plain
SQL from the application's pool, and plain SQL from ``psql``: edits, bulk updates, renames,
image changes and price-rule changes; no event is ever published by hand), with one fault of
each kind: Redis killed and restarted empty, Redis stopped (SIGSTOP) 2 s, PostgreSQL
restarted, one invalidator SIGSTOPped holding entries and resumed, the other SIGKILLed holding
entries (and replaced, as a supervisor would).

Acceptance (issue #6): after the invalidations settle, ``verify`` finds 0 stale entries; no read
exceeds its deadline while Redis is stopped (2 s, reasoned in test_redis_faults.py) and reads
are refused (UNAVAILABLE) only while PostgreSQL is down; no process leaks memory: each
process's RSS (``VmRSS``) is sampled at the start of its steady state and at the end, printed,
and bounded for the processes of this repository.

Runs only with CATALOG_SOAK=1 (CATALOG_SOAK_S=<seconds> shortens the run). The faults are
spread over the run at fixed offsets so that steady load runs between them and after the last
one; each is lined up with the system's own signals (metrics, the group's pending lists), and
the next waits until the previous one was recovered.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from grpc import aio
from redis.asyncio import Redis
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.db import create_engine, libpq_url
from core.keys import Keys
from core.settings import Settings
from devtools.localservers import PostgresCluster, RedisProcess, postgres_bindir
from devtools.serverprocess import ServerProcess
from devtools.workload import update_plain, zipf_draws
from ops.verify import render, verify
from tests.faults.conftest import (
    PRODUCT_IDS,
    Invalidators,
    ReadLoad,
    pause_process,
    wait_until,
)
from tests.faults.test_redis_faults import DEADLINE_S, PAUSE_S, reads_during_pause
from tests.helpers import proc_status_kib, writer_channel
from tests.invalidator.conftest import group_info
from tests.invalidator.test_processes import consumer_pending

# The 5 minutes; CATALOG_SOAK_S shortens a trial run of the test itself.
SOAK_S = float(os.environ.get("CATALOG_SOAK_S", "300"))
# When each fault starts, as a fraction of the run; the last 30% (a minute and a half) is
# steady load again, so the end sample sees the processes after every fault.
SCHEDULE = {"redis_restart": 0.1, "redis_stop": 0.25, "pg_restart": 0.4, "stall": 0.55, "kill": 0.7}
MAX_UPDATES = 200_000
# Leak bound, for the processes of this repository (service, invalidators). After the warm-up
# their RSS is a Python heap plus gRPC, SQLAlchemy and redis-py buffers (50-100 MB); the faults
# legitimately add a little (reconnected pools, a refilled single-flight table, the allocator's
# fragmentation) but nothing proportional to the number of requests. A leak of even 1 KB per
# request would add hundreds of MB over the ~300k reads and ~50k updates of the run, so growth
# under 50% and under 100 MB separates "settled" from "leaking" with a wide margin for noise.
MAX_GROWTH_RATIO = 0.5
MAX_GROWTH_KIB = 100 * 1024

pytestmark = [
    pytest.mark.fault,
    pytest.mark.soak,
    pytest.mark.skipif(os.environ.get("CATALOG_SOAK") != "1", reason="set CATALOG_SOAK=1"),
]


def rss_kib(pid: int) -> int:
    return proc_status_kib(pid, "VmRSS")


@dataclass
class Rss:
    """One process's RSS at the start of its steady state and at the end of it."""

    name: str
    pid: int
    ours: bool  # a process of this repository: the leak bound applies
    start_kib: int
    end_kib: int = 0

    def growth_kib(self) -> int:
        return self.end_kib - self.start_kib

    def line(self) -> str:
        pct = 100 * self.growth_kib() / self.start_kib
        return (
            f"  {self.name:<28} pid {self.pid:<7} {self.start_kib / 1024:7.1f} MB -> "
            f"{self.end_kib / 1024:7.1f} MB  ({self.growth_kib() / 1024:+.1f} MB, {pct:+.1f}%)"
        )


class RssBook:
    def __init__(self) -> None:
        self.rows: list[Rss] = []
        self._open: dict[str, Rss] = {}

    def begin(self, name: str, pid: int, ours: bool = True) -> None:
        self._open[name] = row = Rss(name, pid, ours, rss_kib(pid))
        self.rows.append(row)

    def end(self, name: str) -> None:
        row = self._open.pop(name)
        row.end_kib = rss_kib(row.pid)

    def end_all(self) -> None:
        for name in list(self._open):
            self.end(name)


@pytest.fixture
def soak_server(
    settings: Settings, private_redis: RedisProcess, pg_cluster: PostgresCluster
) -> Iterator[ServerProcess]:
    proc = ServerProcess(settings.replace(redis_url=private_redis.url, database_url=pg_cluster.url))
    yield proc.start()
    proc.stop()


@pytest.mark.timeout(SOAK_S + 300)
async def test_soak_with_every_fault_leaves_nothing_stale_and_no_process_grows(
    soak_server: ServerProcess,
    private_redis: RedisProcess,
    pg_cluster: PostgresCluster,
    invalidators: Invalidators,
) -> None:
    s = soak_server.settings
    keys = Keys(s.key_namespace)
    invalidators.settings = s
    inv = {name: invalidators.start(name) for name in ("a", "b")}  # both relay the outbox too
    redis = Redis.from_url(private_redis.url, socket_timeout=5)
    engine = create_engine(s)
    rss = RssBook()
    pg_up = asyncio.Event()
    pg_up.set()
    stop_writing = asyncio.Event()
    writes: Counter[str] = Counter()
    figures: list[str] = []

    def hits() -> float:
        return soak_server.metric("catalog_cache_requests_total", op="get", result="hit")

    async def write() -> None:
        """Zipf-drawn updates back to back, alternately through UpdateProduct (then a
        write-through) and as a writer elsewhere does (one plain UPDATE; the capture trigger
        queues its event). While PostgreSQL is down it waits for it instead of spinning."""
        draws = zipf_draws(PRODUCT_IDS, 10_000, seed=11)
        end = time.monotonic() + SOAK_S + 60
        async with writer_channel(soak_server.target) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            for n, pid in enumerate(itertools.islice(itertools.cycle(draws), MAX_UPDATES)):
                if stop_writing.is_set() or time.monotonic() > end:
                    return
                try:
                    if n % 2:
                        await update_plain(engine, pid)
                    else:
                        await stub.UpdateProduct(
                            pb.UpdateProductRequest(
                                product=pb.Product(id=pid, stock=n),
                                update_mask=field_mask_pb2.FieldMask(paths=["stock"]),
                            ),
                            timeout=5,
                        )
                    writes["ok"] += 1
                except aio.AioRpcError as exc:
                    writes[exc.code().name] += 1
                    await pg_up.wait()
                except (SQLAlchemyError, OSError) as exc:
                    writes[type(exc).__name__] += 1
                    await pg_up.wait()

    async def psql_writer() -> None:
        """``psql`` as an operator or an admin tool: every PSQL_PAUSE_S one statement of
        :func:`psql_statement` in a new ``psql`` process. Failures (PostgreSQL down) are
        counted; nothing waits for them."""
        psql = str(postgres_bindir() / "psql")
        conninfo = libpq_url(pg_cluster.url)
        draws = zipf_draws(PRODUCT_IDS, 10_000, seed=13)
        end = time.monotonic() + SOAK_S + 60
        for n, pid in enumerate(itertools.cycle(draws)):
            if stop_writing.is_set() or time.monotonic() > end:
                return
            proc = await asyncio.create_subprocess_exec(
                psql, conninfo, "-q", "-v", "ON_ERROR_STOP=1", "-c", psql_statement(n, pid),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            writes["psql ok" if await proc.wait() == 0 else "psql failed"] += 1
            await asyncio.sleep(PSQL_PAUSE_S)

    load = ReadLoad(soak_server.target, DEADLINE_S, workers=4, max_seconds=SOAK_S + 60).start()
    t0 = time.monotonic()
    writer = asyncio.create_task(write())
    psql_writes = asyncio.create_task(psql_writer())

    async def at(fraction: float) -> None:
        """The schedule: wait for this point of the run (a fault's slot, or the end)."""
        await asyncio.sleep(max(0.0, t0 + fraction * SOAK_S - time.monotonic()))

    try:
        # Warm-up: the cache is full and events flow through relay, stream and both consumers.
        await wait_until(lambda: hits() > 2000, 60, "a warm cache")
        await wait_until(lambda: _entries_read(redis, keys, 200), 60, "events flowing")
        assert soak_server.proc is not None and pg_cluster.pid is not None
        rss.begin("service", soak_server.proc.pid)
        for name, proc in inv.items():
            rss.begin(f"invalidator {name}", proc.pid)
        assert private_redis.proc is not None
        rss.begin("redis", private_redis.proc.pid, ours=False)
        rss.begin("postgres (postmaster)", pg_cluster.pid, ours=False)
        steady_at = time.monotonic()

        # 1. Redis killed and restarted empty: stream, group and cache are gone.
        await at(SCHEDULE["redis_restart"])
        rss.end("redis")
        private_redis.proc.kill()
        private_redis.proc.wait()
        killed_at = time.monotonic()
        private_redis.start()
        back_at = time.monotonic()
        await redis.aclose()  # its connections died with the server
        redis = Redis.from_url(private_redis.url, socket_timeout=5)
        seen = hits()
        resumed_s = await wait_until(lambda: hits() > seen, 15, "hits to resume")
        await wait_until(lambda: _entries_read(redis, keys, 200), 30, "the group recreated")
        rss.begin("redis (restarted)", private_redis.proc.pid, ours=False)
        figures.append(
            f"+{killed_at - t0:.0f} s Redis killed, back {back_at - killed_at:.2f} s later; hits "
            f"resumed {resumed_s:.2f} s after its return; the group recreated, 200 events read"
        )

        # 2. Redis stopped 2 s by SIGSTOP.
        await at(SCHEDULE["redis_stop"])
        paused_at, resumed_at = await pause_process(private_redis.proc, PAUSE_S)
        await wait_until(lambda: load.codes(since=resumed_at)["OK"] >= 200, 15, "reads after")

        # 3. PostgreSQL restarted.
        await at(SCHEDULE["pg_restart"])
        rss.end("postgres (postmaster)")
        pg_up.clear()
        await asyncio.to_thread(pg_cluster.stop, "fast")
        down_at = time.monotonic()
        await asyncio.to_thread(pg_cluster.start)
        up_at = time.monotonic()
        pg_up.set()
        updated = writes["ok"]
        await wait_until(
            lambda: load.codes(since=up_at)["OK"] >= 200 and writes["ok"] > updated + 50,
            30,
            "reads and updates served again",
        )
        assert pg_cluster.pid is not None
        rss.begin("postgres (restarted)", pg_cluster.pid, ours=False)
        figures.append(
            f"+{down_at - t0:.0f} s PostgreSQL stopped, back {up_at - down_at:.2f} s later"
        )

        # 4. Invalidator b stalled (SIGSTOP) holding entries: a reclaims them; b resumes.
        await at(SCHEDULE["stall"])
        stalled = await freeze_holding(redis, keys, inv["b"], "b")
        reclaimed_s = await wait_until(
            lambda: _pending_is_zero(redis, keys, "b"), 30, "b's entries reclaimed"
        )
        inv["b"].send_signal(signal.SIGCONT)
        stalled_at = time.monotonic() - reclaimed_s

        # 5. Invalidator a SIGKILLed holding entries: b reclaims them; a replacement joins.
        await at(SCHEDULE["kill"])
        rss.end("invalidator a")
        killed = await freeze_holding(redis, keys, inv["a"], "a")
        inv["a"].kill()
        inv["a"].wait()
        a_killed_at = time.monotonic()
        reclaimed_kill_s = await wait_until(
            lambda: _pending_is_zero(redis, keys, "a"), 30, "a's entries reclaimed"
        )
        inv["a2"] = invalidators.start("a2")
        await wait_until(lambda: _consumer_joined(redis, keys, "a2"), 30, "a2 in the group")
        read_then = int((await group_info(redis, keys))["entries-read"] or 0)
        await wait_until(lambda: _entries_read(redis, keys, read_then + 500), 60, "a2 warm")
        rss.begin("invalidator a2 (replacement)", inv["a2"].pid)
        figures.append(
            f"+{stalled_at - t0:.0f} s b stopped holding {stalled} entries, reclaimed in "
            f"{reclaimed_s:.2f} s; +{a_killed_at - t0:.0f} s a killed holding {killed}, "
            f"reclaimed in {reclaimed_kill_s:.2f} s"
        )

        # Steady load to the end of the run, then the end sample.
        await at(1.0)
        assert load.running and not writer.done() and not psql_writes.done(), "the whole run"
        rss.end_all()
        ended_at = time.monotonic()
    finally:
        stop_writing.set()
        outcomes = await load.stop()
        await writer
        await psql_writes

    try:
        settle_s = await wait_until(lambda: _settled(redis, engine, keys), 120, "events settled")
        report = await verify(redis, engine, keys)
        dead = await redis.xlen(keys.dead_letter_stream)
    finally:
        await engine.dispose()
        await redis.aclose()

    during = reads_during_pause(outcomes, paused_at, resumed_at)
    failed = [o for o in outcomes if o.code.name != "OK"]
    slowest = max(outcomes, key=lambda o: o.seconds)
    figures.insert(
        1,
        f"+{paused_at - t0:.0f} s Redis stopped {resumed_at - paused_at:.2f} s: {len(during)} "
        f"reads then, slowest {max(o.seconds for o in during) * 1000:.0f} ms",
    )
    print(
        f"\nsoak {ended_at - t0:.0f} s (steady state from {steady_at - t0:.0f} s): "
        f"{len(outcomes)} reads {dict(load.codes())}, slowest {slowest.seconds * 1000:.0f} ms "
        f"(started +{slowest.started - t0:.0f} s); updates {dict(writes)}\n"
        + "\n".join(figures)
        + "\nfailed reads (code, start, seconds): "
        f"{[(o.code.name, f'+{o.started - t0:.1f}', round(o.seconds, 2)) for o in failed]}\n"
        f"settled {settle_s:.2f} s after the load; dead letters {dead}\n"
        f"{render(report, s.key_namespace)}\nRSS, start of steady state -> end:\n"
        + "\n".join(row.line() for row in rss.rows)
    )
    assert report.products > 0
    assert writes["psql ok"] > 0
    assert report.stale == []
    assert dead == 0
    # The deadline is asserted where a fault could break it (Redis stopped: commands time out,
    # reads fall back). Over the whole run it is reported, not asserted: on the shared 2-core
    # machine a scheduling stall far from any fault once took 4 reads past 2 s (load average
    # 7.5), which says nothing about the service; test_redis_faults.py holds the bound.
    assert max(o.seconds for o in during) < DEADLINE_S
    assert {o.code.name for o in failed} <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, load.codes()
    unavailable = [o for o in failed if o.code.name == "UNAVAILABLE"]
    assert all(down_at - DEADLINE_S <= o.started <= up_at for o in unavailable)
    assert inv["b"].poll() is None and inv["a2"].poll() is None
    for row in rss.rows:
        if row.ours:
            assert row.growth_kib() < MAX_GROWTH_KIB, row.line()
            assert row.growth_kib() < MAX_GROWTH_RATIO * row.start_kib, row.line()


# One psql statement per pause: a few per second next to the writer's hundreds of updates.
PSQL_PAUSE_S = 0.2
RULE_SCOPES = ("product", "category", "brand")


def psql_statement(n: int, pid: str) -> str:
    """The ``n``-th plain SQL write of the psql writer, about product ``pid`` (Zipf-drawn): an
    edit without a version bump, a bulk update of a category, a price rule inserted, moved to
    another scope or deleted, a rename, an image change. Values are ids of the seeded catalog
    and counters, never outside input."""
    of_product = f"(SELECT {{}} FROM products WHERE id = '{pid}')"
    category, brand = of_product.format("category_id"), of_product.format("brand_id")
    kind = n % 6
    if kind == 0:
        return f"UPDATE products SET name = 'psql edit {n}' WHERE id = '{pid}'"
    if kind == 1:
        return f"UPDATE products SET stock = stock + 1 WHERE category_id = {category}"
    if kind == 2:
        scope = RULE_SCOPES[(n // 6) % 3]
        target = {"product": f"'{pid}'", "category": category, "brand": brand}[scope]
        return (
            "INSERT INTO price_rules (id, name, scope, target_id, kind, value, priority) "
            f"VALUES ('soak-{n % 5}', 'soak {n}', '{scope}', {target}, 'percent_off', "
            f"{1000 + n % 8000}, 200) ON CONFLICT (id) DO UPDATE SET scope = EXCLUDED.scope, "
            "target_id = EXCLUDED.target_id, value = EXCLUDED.value, name = EXCLUDED.name"
        )
    if kind == 3:
        return f"DELETE FROM price_rules WHERE id = 'soak-{(n // 6) % 5}'"
    if kind == 4:
        table, of = ("categories", category) if n % 12 < 6 else ("brands", brand)
        return f"UPDATE {table} SET name = 'psql {table} {n}' WHERE id = {of}"
    return f"UPDATE product_images SET alt_text = 'psql {n}' WHERE product_id = '{pid}'"


async def freeze_holding(redis: Redis, keys: Keys, proc: subprocess.Popen[bytes], name: str) -> int:
    """SIGSTOP ``proc`` at a moment it holds delivered, unacked entries; how many it holds.

    Under the soak's continuous writes every batch reopens that window, so it is caught within
    a few batches (bounded at 60 s); nothing is read in the consumer's name on its behalf."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None
        if not await consumer_pending(redis, keys, name):
            continue
        proc.send_signal(signal.SIGSTOP)
        if held := await consumer_pending(redis, keys, name):  # it may have acked meanwhile
            return held
        proc.send_signal(signal.SIGCONT)
    raise AssertionError(f"{name} never held pending entries")


async def _entries_read(redis: Redis, keys: Keys, n: int) -> bool:
    return int((await group_info(redis, keys)).get("entries-read") or 0) >= n


async def _pending_is_zero(redis: Redis, keys: Keys, name: str) -> bool:
    return await consumer_pending(redis, keys, name) == 0


async def _consumer_joined(redis: Redis, keys: Keys, name: str) -> bool:
    consumers = await redis.xinfo_consumers(keys.stream, keys.group)
    return any(c["name"].decode() == name for c in consumers)


async def _settled(redis: Redis, engine: AsyncEngine, keys: Keys) -> bool:
    """Every outbox row published, every stream entry delivered to the group and acked."""
    async with engine.connect() as conn:
        unsent = await conn.scalar(sa.text("SELECT count(*) FROM outbox WHERE sent_at IS NULL"))
    if unsent:
        return False
    group = await group_info(redis, keys)
    last = (await redis.xinfo_stream(keys.stream))["last-generated-id"]
    return bool(group["pending"] == 0 and group["last-delivered-id"] == last)
