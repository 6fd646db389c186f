"""Fixtures of the fault tests: private servers a test may kill, pause or restart (one
PostgreSQL, a 6-node Redis Cluster per module), invalidator processes, an in-process service
with per-test settings, a bounded asyncio read load and a bounded load of any step, and the
signals that the outbox and the consumer group have drained.

Every load is bounded in time and concurrency and talks to loopback only. Faults are lined up
with the system's own signals (metrics, pending lists, health), never with sleeps; the only
durations are the load lengths and fault lengths the issue prescribes."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import psycopg
import pytest
import sqlalchemy as sa
from grpc import aio
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.db import libpq_url
from core.keys import Keys
from core.outbox import outbox
from core.redisclient import RedisClient
from core.settings import Settings
from devtools.localservers import PostgresCluster, postgres_dir
from devtools.rediscluster import RedisCluster
from devtools.serverprocess import settings_env
from service.app import Service, start
from tests.conftest import SEED_PRODUCTS
from tests.helpers import make_settings
from tests.invalidator.conftest import group_info

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_IDS = [f"p{n:07d}" for n in range(1, SEED_PRODUCTS + 1)]


@pytest.fixture
def pg_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL server of this test's own (stop, kill and restart are allowed), migrated
    and seeded like the shared test database."""
    from core.migrations import upgrade
    from ops.seed import seed_catalog

    with postgres_dir("catalog-fault-pg-") as workdir:
        cluster = PostgresCluster(workdir / "pg")
        try:
            cluster.start()
            upgrade(cluster.url)
            seed_catalog(cluster.url, products=SEED_PRODUCTS, seed=42)
            yield cluster
        finally:
            cluster.kill()


@pytest.fixture(scope="module")
def cluster6(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Redis Cluster of 3 primaries with a replica each, shared by a module's tests (each
    leaves it whole: a killed node is restarted, as a replica)."""
    with RedisCluster(tmp_path_factory.mktemp("cluster6"), primaries=3, replicas=1) as c:
        yield c


def settings_on(cluster: RedisCluster, database_url: str, namespace: str = "") -> Settings:
    """Settings on ``cluster`` (through its first primary), writes WAITed for one replica."""
    return make_settings(
        database_url=database_url,
        redis_url=f"redis://127.0.0.1:{cluster.primaries()[0]}/0",
        redis_mode="cluster",
        key_namespace=namespace or f"t{uuid.uuid4().hex[:10]}",
        redis_wait_replicas=1,
        redis_wait_timeout_ms=500,
        metrics_port=0,
    )


async def start_service(settings: Settings, **overrides: Any) -> Service:
    return await start(settings.replace(grpc_address="127.0.0.1:0", **overrides))


@pytest.fixture
async def services() -> AsyncIterator[list[Service]]:
    """In-process services a test appends to; all are stopped at teardown."""
    started: list[Service] = []
    yield started
    for svc in started:
        await svc.stop(grace=0)


def active_queries(database_url: str) -> int:
    """Statements of other sessions running (or waiting) in the database right now."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND state = 'active' AND backend_type = 'client backend'"
        ).fetchone()
    assert row is not None
    return int(row[0])


class Invalidators:
    """``python -m invalidator`` processes on the test's namespace; killed at teardown."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        environ = settings_env(self.settings) | {
            "CATALOG_INVALIDATOR_CONSUMER": name,
            "CATALOG_INVALIDATOR_BLOCK_MS": "200",
            "CATALOG_INVALIDATOR_CLAIM_MIN_IDLE_MS": "1000",
            "CATALOG_INVALIDATOR_CLAIM_INTERVAL_MS": "100",
            "CATALOG_INVALIDATOR_RETRY_BACKOFF_MS": "50",
            "CATALOG_INVALIDATOR_STATS_INTERVAL_S": "0.5",
            "CATALOG_INVALIDATOR_METRICS_PORT": "0",
            "CATALOG_INVALIDATOR_HEALTH_ADDRESS": "",
            "CATALOG_LOG_LEVEL": "WARNING",
            **env,
        }
        proc = subprocess.Popen([sys.executable, "-m", "invalidator"], env=environ, cwd=ROOT)
        self.procs[name] = proc
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def invalidators(settings: Settings) -> Iterator[Invalidators]:
    group = Invalidators(settings)
    yield group
    group.stop_all()


@dataclass
class Outcome:
    """One call of the load: when it started, how long it took, its status code, and the
    (product id, version) of every product it returned."""

    started: float
    seconds: float
    code: grpc.StatusCode
    versions: tuple[tuple[str, int], ...] = ()


@dataclass
class ReadLoad:
    """``workers`` asyncio clients calling GetProduct (Zipf-distributed ids) back to back; of
    every 100 calls, ``lists`` are ListProducts (20 products, a category of ``list_filters``
    or "" for none) and ``batches`` BatchGetProducts (10 ids). Ids are drawn from ``draws``
    (e.g. :func:`devtools.workload.zipf_draws`), else Zipf(``zipf_s``) by rank in id order.

    Bounded: it stops at ``stop()`` or after ``max_seconds``, whichever comes first."""

    target: str
    deadline_s: float
    workers: int = 8
    max_seconds: float = 120.0
    zipf_s: float = 1.1
    lists: int = 0
    batches: int = 0
    draws: Sequence[str] = ()
    list_filters: Sequence[str] = ("",)
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> ReadLoad:
        self._task = asyncio.create_task(self._run())
        return self

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait(self) -> list[Outcome]:
        """The outcomes, once the load ran its ``max_seconds``."""
        assert self._task is not None
        await self._task
        return self.outcomes

    async def stop(self) -> list[Outcome]:
        self._stop.set()
        return await self.wait()

    def codes(self, since: float = 0.0) -> Counter[str]:
        return Counter(o.code.name for o in self.outcomes if o.started >= since)

    async def _run(self) -> None:
        weights = [1 / (rank**self.zipf_s) for rank in range(1, len(PRODUCT_IDS) + 1)]
        async with aio.insecure_channel(self.target) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            end = time.monotonic() + self.max_seconds

            async def worker(seed: int) -> None:
                rand = random.Random(seed)

                def pick() -> str:
                    if self.draws:
                        return self.draws[rand.randrange(len(self.draws))]
                    return rand.choices(PRODUCT_IDS, weights)[0]

                while not self._stop.is_set() and time.monotonic() < end:
                    kind = rand.randrange(100)
                    started = time.monotonic()
                    try:
                        if kind < self.lists:
                            got = await self._list(stub, rand.choice(self.list_filters))
                        elif kind < self.lists + self.batches:
                            got = await self._batch(stub, [pick() for _ in range(10)])
                        else:
                            got = await self._get(stub, pick())
                        code = grpc.StatusCode.OK
                    except aio.AioRpcError as exc:
                        got, code = (), exc.code()
                    self.outcomes.append(Outcome(started, time.monotonic() - started, code, got))

            await asyncio.gather(*(worker(n) for n in range(self.workers)))

    async def _get(self, stub: Any, pid: str) -> tuple[tuple[str, int], ...]:
        reply = await stub.GetProduct(pb.GetProductRequest(id=pid), timeout=self.deadline_s)
        assert reply.id == pid
        return ((reply.id, reply.version),)

    async def _list(self, stub: Any, category_id: str) -> tuple[tuple[str, int], ...]:
        request = pb.ListProductsRequest(page_size=20, category_id=category_id)
        reply = await stub.ListProducts(request, timeout=self.deadline_s)
        assert reply.products
        return tuple((p.id, p.version) for p in reply.products)

    async def _batch(self, stub: Any, ids: list[str]) -> tuple[tuple[str, int], ...]:
        request = pb.BatchGetProductsRequest(ids=ids)
        reply = await stub.BatchGetProducts(request, timeout=self.deadline_s)
        assert [r.product.id for r in reply.results] == ids
        return tuple((r.product.id, r.product.version) for r in reply.results)


@dataclass
class Load:
    """``step`` called back to back until stopped; every exception it raises is kept."""

    step: Callable[[int], Awaitable[None]]
    done: int = 0
    errors: list[BaseException] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> Load:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while not self._stop.is_set() and self.done < 100_000:
            try:
                await self.step(self.done)
            except Exception as exc:
                self.errors.append(exc)
                await asyncio.sleep(0.01)
            else:
                self.done += 1
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def unsent(db: AsyncEngine) -> int:
    """Outbox rows not yet published."""
    async with db.connect() as conn:
        query = sa.select(sa.func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
        return int(await conn.scalar(query) or 0)


async def drained(redis: RedisClient, keys: Keys) -> bool:
    """Nothing pending, and the group delivered the stream's last entry. (Not XINFO's ``lag``:
    after a failover the promoted node's count of entries read can stay off for good.)"""
    info = await group_info(cast(Redis, redis), keys)
    last = (await redis.xinfo_stream(keys.stream))["last-generated-id"]
    return bool(info["pending"] == 0 and info["last-delivered-id"] == last)


async def wait_until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout: float, what: str
) -> float:
    """Poll ``check`` (sync or async) until true; the seconds it took. A bound, not a claim."""
    started = time.monotonic()
    while True:
        ok = check()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.01)


async def pause_process(proc: subprocess.Popen[bytes], seconds: float) -> tuple[float, float]:
    """SIGSTOP ``proc`` for ``seconds`` (a fault length the issue prescribes), then SIGCONT;
    returns when it was stopped and resumed (``time.monotonic()``)."""
    proc.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        await asyncio.sleep(seconds)
    finally:
        proc.send_signal(signal.SIGCONT)
    return stopped_at, time.monotonic()
