"""The near cache's staleness bound under load and under every failure of its channel.

The bound (issue 14): an L1 hit is never older than a change Redis made more than X =
``CATALOG_NEAR_CACHE_MAX_STALENESS_MS`` (50 ms, the default) before the read began.

How it is checked: a service runs in this process with the near cache on; Zipf-distributed
reads (devtools.workload.zipf_draws; GetProduct, with some BatchGetProducts and ListProducts,
which read product entries through the near cache too) record the version of every product
each reply carries, with the call's start and end; writer processes
(tests/faults/near_writer.py) change the same hot products and record each change once *Redis
has it*, on the machine's monotonic clock. Every test then runs the history checker
(devtools/history.py): a read that returned version ``v`` is stale by ``read start - the
earliest acknowledgement of a version above v``, and the worst such figure must be at most X.

What "committed" means here: the writer does what UpdateProduct does (the plain SQL UPDATE of
devtools.workload.update_plain, then the write-through into Redis under a forcing lease) and
acknowledges the change after the write-through returned, and, on the 6-node cluster, after
``WAIT`` saw it on a replica. So the asserted bound is staleness against the moment the change
was in Redis (a little later than when Redis made it): the near cache's own promise, without
the invalidator pipeline. A change whose write-through failed (Redis down, paused, failing
over) is not recorded: Redis never had it, and reads return what Redis has.
:func:`test_staleness_through_the_invalidator_is_reported` measures the other figure: plain
SQL updates that reach Redis only through the outbox relay and the invalidator, staleness
against the commit, pipeline included; it is reported, and bounded only by the invalidator.

Reads of any source count (L1, Redis, PostgreSQL): only L1 can be stale against Redis, so the
checker's figure is L1's. Each fault test also shows the near cache served before the fault
(hits), refused to serve during it (suspended lookups or a reset of the channel), and served
again after it (hits), and reports how long that took. A control run with a loose bound shows
the checker does see stale reads when L1 serves past X. No timing is asserted; the durations
are fault lengths, the write pace and the load length.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.crc import key_slot

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.keys import Keys
from core.settings import Settings
from devtools.history import History
from devtools.localservers import RedisProcess
from devtools.rediscluster import RedisCluster
from devtools.serverprocess import settings_env
from devtools.workload import zipf_draws
from service.app import Service, start
from tests.faults.conftest import (
    PRODUCT_IDS,
    ROOT,
    Invalidators,
    ReadLoad,
    pause_process,
    settings_on,
    wait_until,
)
from tests.faults.near_writer import SEED, ZIPF_S, Writer
from tests.helpers import metric

pytestmark = [pytest.mark.fault, pytest.mark.slow]

X_MS = 50
X_S = X_MS / 1000
#: Updates per second the writers aim at in all (issue 14); the test reports what it reached.
WRITE_RATE = 1000.0
WRITER_PROCESSES = 2
DEADLINE_S = 2.0
#: Of every 100 reads, this many are BatchGetProducts (10 ids) and ListProducts (20 products).
BATCHES = 10
LISTS = 5
#: The longest a read load may run (a bound; each test stops it).
LOAD_MAX_S = 300.0
#: Seconds of the fault-free run.
RUN_S = 10.0
#: Fault lengths.
PAUSE_S = 1.0
STALL_S = 1.0
#: The bound of the control test (the issue's X is the default, 50 ms).
LOOSE_MS = 10_000
DELAY_S = 0.030
#: Bounds (not claims) on how long the near cache may take to serve at all / again.
WARM_S = 30.0
RECOVER_S = 30.0


def near(result: str) -> float:
    return metric("catalog_near_cache_requests_total", result=result)


def hottest(n: int) -> list[str]:
    """The ``n`` products the load reads (and changes) most."""
    draws = zipf_draws(PRODUCT_IDS, 20_000, s=ZIPF_S, seed=SEED)
    return [pid for pid, _ in Counter(draws).most_common(n)]


def resets() -> float:
    """Times the channel's session ended (``catalog_near_cache_resets_total``, every reason
    but a flush, which empties the table without ending the session)."""
    return sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "catalog_near_cache_resets"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("reason") != "flush"
    )


@dataclass
class Workload:
    """Zipf reads (tests/faults/conftest.py ReadLoad: ``readers`` clients in this process,
    mostly GetProduct, some BatchGetProducts and ListProducts, every returned version kept) and
    Zipf updates of the same hot products (tests/faults/near_writer.py: WRITER_PROCESSES
    processes of ``writers`` clients each, paced to ``rate`` per second in all), until stopped.
    A test may add changes of its own to ``written``."""

    target: str
    writer_settings: Settings
    out: Path
    mode: str = "redis"
    readers: int = 6
    writers: int = 16
    rate: float = WRITE_RATE
    written: History = field(default_factory=History)
    unacknowledged: int = 0
    reads: ReadLoad | None = None
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> Workload:
        for part in range(WRITER_PROCESSES):
            self._procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.faults.near_writer", f"{self.out}.{part}",
                 str(self.rate / WRITER_PROCESSES), str(self.writers), self.mode, str(part),
                 str(WRITER_PROCESSES)],
                env=settings_env(self.writer_settings), cwd=ROOT,
            ))  # fmt: skip
        self.reads = ReadLoad(
            self.target, DEADLINE_S, workers=self.readers, max_seconds=LOAD_MAX_S,
            batches=BATCHES, lists=LISTS, draws=zipf_draws(PRODUCT_IDS, 20_000, ZIPF_S, SEED),
        ).start()  # fmt: skip
        return self

    @property
    def running(self) -> bool:
        return self.reads is not None and self.reads.running

    @property
    def history(self) -> History:
        """Every read so far, and every change acknowledged (the writer processes' once
        stopped)."""
        history = History(writes=list(self.written.writes))
        for o in self.reads.outcomes if self.reads else ():
            for product_id, version in o.versions:
                history.read(product_id, version, o.started, o.started + o.seconds)
        return history

    @property
    def failed_reads(self) -> int:
        return sum(1 for o in self.reads.outcomes if o.code.name != "OK") if self.reads else 0

    async def stop(self) -> History:
        """Stop reading and writing; the history, the writer processes' changes included."""
        assert self.reads is not None
        await self.reads.stop()
        for proc in self._procs:
            proc.send_signal(signal.SIGTERM)
        for part, proc in enumerate(self._procs):
            assert await asyncio.to_thread(proc.wait, 60) == 0, "a writer failed"
            written = await asyncio.to_thread(Path(f"{self.out}.{part}").read_text)
            for line in written.splitlines():
                record = json.loads(line)
                if isinstance(record, dict):
                    self.unacknowledged += record["unacknowledged"]
                else:
                    self.written.write(*record)
        return self.history

    async def abort(self) -> None:
        """Stop without collecting anything (teardown; a no-op after :meth:`stop`)."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        if self.running:
            assert self.reads is not None
            await self.reads.stop()

    def writes_between(self, start: float, end: float) -> int:
        return sum(1 for w in self.written.writes if start <= w.committed <= end)

    @property
    def write_rate(self) -> float:
        times = sorted(w.committed for w in self.written.writes)
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


@dataclass
class Report:
    """What a run measured, printed and recorded as test properties."""

    name: str
    figures: dict[str, str] = field(default_factory=dict)

    def add(self, **figures: Any) -> None:
        for key, value in figures.items():
            self.figures[key] = f"{value:.3f}" if isinstance(value, float) else str(value)

    def emit(self, record_property: Callable[[str, object], None]) -> None:
        for key, value in self.figures.items():
            record_property(key, value)
        print(f"\n{self.name}: " + ", ".join(f"{k}={v}" for k, v in self.figures.items()))


def check(load: Workload, report: Report) -> None:
    """The history checker's verdict on the run: worst staleness at most X."""
    history = load.history
    worst = history.worst()
    stale = history.stale_reads()
    report.add(
        reads=len(history.reads),
        failed_reads=load.failed_reads,
        writes=len(history.writes),
        unacknowledged_writes=load.unacknowledged,
        write_rate_per_s=round(load.write_rate),
        stale_reads=len(stale),
        worst_staleness_ms=(worst.staleness * 1000 if worst else 0.0),
    )
    assert history.reads and history.writes
    assert worst is None or worst.staleness <= X_S, (
        f"a read returned {worst.read} {worst.staleness * 1000:.1f} ms after {worst.missed} "
        f"was acknowledged (bound {X_MS} ms)"
    )


def near_settings(settings: Settings, database_url: str, redis_url: str) -> Settings:
    return settings.replace(
        database_url=database_url,
        redis_url=redis_url,
        near_cache_enabled=True,
        near_cache_max_staleness_ms=X_MS,
    )


@contextlib.asynccontextmanager
async def running(
    settings: Settings, out: Path, writer_settings: Settings | None = None, mode: str = "redis"
) -> AsyncIterator[tuple[Service, Workload]]:
    """The service with the near cache on, and the load against it, once L1 serves (hits);
    the writer talks to ``writer_settings``' Redis (default: the service's)."""
    svc = await start(settings.replace(grpc_address="127.0.0.1:0"))
    load = Workload(
        f"127.0.0.1:{svc.port}", writer_settings or settings, out / "writes.jsonl", mode
    )
    try:
        assert svc.tracking is not None
        hits = near("hit")
        load.start()
        await wait_until(lambda: near("hit") > hits + 500, WARM_S, "near-cache hits")
        yield svc, load
        if load.running:
            await load.stop()
    finally:
        await load.abort()
        await svc.stop(grace=0)


async def recovered(svc: Service, since: float) -> float:
    """Seconds from ``since`` until the channel tracks again and L1 serves hits again."""
    assert svc.tracking is not None
    tracking = svc.tracking.tracking
    await wait_until(tracking.is_set, RECOVER_S, "the channel to track again")
    hits = near("hit")
    await wait_until(lambda: near("hit") > hits + 200, RECOVER_S, "near-cache hits again")
    return time.monotonic() - since


async def settle(load: Workload, seconds: float = 1.0) -> None:
    """Let the load run on after recovery (reads that might see a missed change), then stop."""
    await asyncio.sleep(seconds)
    await load.stop()


# -- the fault-free run ---------------------------------------------------------------------------


async def test_worst_staleness_under_zipf_reads_and_fast_updates_is_within_the_bound(
    settings: Settings,
    fresh_database_url: str,
    private_redis: RedisProcess,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """Zipf(1.1) reads and updates aimed at 1k/s for RUN_S seconds; staleness against the
    moment Redis had each change (module docstring) must stay within X = 50 ms."""
    report = Report("zipf run")
    cfg = near_settings(settings, fresh_database_url, private_redis.url)
    async with running(cfg, tmp_path) as (_, load):
        hits, misses, suspended = near("hit"), near("miss"), near("suspended")
        await asyncio.sleep(RUN_S)  # the load's length
        await load.stop()
        served = near("hit") - hits
        lookups = served + near("miss") - misses + near("suspended") - suspended
        report.add(l1_hit_ratio=served / max(1.0, lookups), seconds=RUN_S)
    check(load, report)
    report.emit(record_property)
    assert served > 0


async def test_worst_staleness_at_a_thousand_changes_per_second_is_within_the_bound(
    settings: Settings,
    fresh_database_url: str,
    private_redis: RedisProcess,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """The same Zipf reads while the writers change the hot products' cached entries in Redis
    directly (near_writer's ``entry`` mode: compare-and-set of the next version, no database
    write), aimed at 1k changes/s, the rate the updates through PostgreSQL cannot reach on this
    machine: the near cache follows 1k changes/s within X."""
    report = Report("zipf run, 1k entry changes/s")
    cfg = near_settings(settings, fresh_database_url, private_redis.url)
    async with running(cfg, tmp_path, mode="entry") as (_, load):
        hits = near("hit")
        await asyncio.sleep(RUN_S)  # the load's length
        await load.stop()
        served = near("hit") - hits
    check(load, report)
    report.emit(record_property)
    assert served > 0
    assert load.write_rate > 0


async def test_staleness_through_the_invalidator_is_reported(
    settings: Settings,
    fresh_database_url: str,
    private_redis: RedisProcess,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """Plain SQL updates (no write-through) reach Redis through the outbox relay and the
    invalidator (a process): staleness against the *commit* includes that pipeline, so it is
    not held to X. Reported; asserted: the near cache served, and every read ends up
    converging (after the writes stop, each product reads at its last committed version)."""
    report = Report("invalidator pipeline")
    cfg = near_settings(settings, fresh_database_url, private_redis.url)
    group = Invalidators(cfg)
    group.start("nc-1")
    try:
        async with running(cfg, tmp_path, mode="commit") as (_, load):
            await asyncio.sleep(RUN_S / 2)
            await load.stop()
            last = {w.key: w.version for w in load.written.writes}
            newest: dict[str, int] = {}
            async with aio.insecure_channel(load.target) as channel:
                stub = catalog_pb2_grpc.CatalogServiceStub(channel)

                async def converged() -> bool:
                    for pid, version in last.items():
                        if newest.get(pid, 0) < version:
                            reply = await stub.GetProduct(pb.GetProductRequest(id=pid))
                            newest[pid] = reply.version
                    return all(newest[p] >= v for p, v in last.items())

                converged_s = await wait_until(converged, RECOVER_S, "reads to converge")
    finally:
        group.stop_all()
    history = load.history
    worst = history.worst()
    report.add(
        reads=len(history.reads),
        writes=len(history.writes),
        write_rate_per_s=round(load.write_rate),
        stale_reads=len(history.stale_reads()),
        worst_staleness_vs_commit_ms=(worst.staleness * 1000 if worst else 0.0),
        converged_after_s=converged_s,
    )
    report.emit(record_property)


# -- faults ---------------------------------------------------------------------------------------


async def test_redirect_and_control_connections_killed(
    settings: Settings,
    fresh_database_url: str,
    private_redis: RedisProcess,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """CLIENT KILL of the redirect connection, then of the control connection, while changes
    keep landing in Redis: the session ends (L1 emptied), a new one starts, hits resume."""
    report = Report("client kill")
    cfg = near_settings(settings, fresh_database_url, private_redis.url)
    admin = Redis.from_url(private_redis.url, socket_timeout=10)
    try:
        async with running(cfg, tmp_path) as (svc, load):
            assert svc.tracking is not None
            for which in ("redirect", "control"):
                clients = await admin.client_list()
                control = [c for c in clients if "t" in c["flags"]]
                assert len(control) == 1, control
                victim = control[0]["redir"] if which == "redirect" else control[0]["id"]
                sessions, before = svc.tracking.sessions, resets()
                killed_at = time.monotonic()
                assert await admin.client_kill_filter(_id=victim) == 1
                await wait_until(lambda: resets() > before, RECOVER_S, "a reset")
                report.add(**{f"{which}_recover_s": await recovered(svc, killed_at)})
                assert svc.tracking.sessions > sessions
            await settle(load)
    finally:
        await admin.aclose()
    check(load, report)
    report.emit(record_property)


async def test_redis_paused_by_sigstop_and_client_pause(
    settings: Settings,
    fresh_database_url: str,
    private_redis: RedisProcess,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """Redis stopped (SIGSTOP) PAUSE_S, then CLIENT PAUSE WRITE and ALL PAUSE_S each: no
    heartbeat comes back, so L1 refuses to serve (suspended lookups) within X, then serves
    again."""
    report = Report("redis paused")
    cfg = near_settings(settings, fresh_database_url, private_redis.url)
    admin = Redis.from_url(private_redis.url, socket_timeout=10)
    try:
        async with running(cfg, tmp_path) as (svc, load):
            assert private_redis.proc is not None
            suspended = near("suspended")
            _, resumed_at = await pause_process(private_redis.proc, PAUSE_S)
            report.add(sigstop_recover_s=await recovered(svc, resumed_at))
            assert near("suspended") > suspended, "L1 kept serving through the stop"
            for everything in (False, True):
                suspended = near("suspended")
                await admin.client_pause(int(PAUSE_S * 1000), all=everything)
                # A write, answered when either pause is over (by Redis' clock).
                await admin.set("near-cache-test:pause-probe", b"1")
                name = "all" if everything else "write"
                report.add(**{f"pause_{name}_recover_s": await recovered(svc, time.monotonic())})
                assert near("suspended") > suspended, f"L1 kept serving through PAUSE {name}"
            await settle(load)
    finally:
        await admin.aclose()
    check(load, report)
    report.emit(record_property)


class DelayProxy:
    """A TCP proxy in front of Redis that holds what Redis sends back: each chunk ``delay``
    seconds, and nothing at all while stalled. Requests pass at once, so Redis applies
    changes on time while their invalidations (and heartbeats) come late."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay = 0.0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            with contextlib.suppress(asyncio.CancelledError, OSError):  # stop() ends them all
                await self._relay(client_r, client_w)
        finally:
            client_w.close()
            self._tasks.discard(task)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        pipes = [
            asyncio.ensure_future(self._forward(client_r, redis_w)),
            asyncio.ensure_future(self._receive(redis_r, queue)),
            asyncio.ensure_future(self._hold(queue, client_w)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            redis_w.close()

    @staticmethod
    async def _forward(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()

    @staticmethod
    async def _receive(
        src: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        while data := await src.read(65536):
            queue.put_nowait((time.monotonic(), data))
        queue.put_nowait((time.monotonic(), b""))
        await asyncio.Event().wait()  # the holder ends the connection once it sent the rest

    async def _hold(
        self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter
    ) -> None:
        while True:
            received, data = await queue.get()
            await self.flowing.wait()
            if (wait := received + self.delay - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            await self.flowing.wait()
            if not data:
                return
            dst.write(data)
            await dst.drain()


@pytest.fixture
async def proxy(private_redis: RedisProcess) -> AsyncIterator[DelayProxy]:
    p = await DelayProxy(private_redis.port).start()
    yield p
    await p.stop()


async def test_channel_delayed_then_stalled_by_a_proxy(
    settings: Settings,
    fresh_database_url: str,
    private_redis: RedisProcess,
    proxy: DelayProxy,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """The service reaches Redis through :class:`DelayProxy`; the writer does not. Replies
    and invalidations delayed DELAY_S (under X: L1 may serve, no more than X behind), then
    held STALL_S (L1 must stop serving within X while changes land in Redis unseen)."""
    report = Report("channel delayed")
    cfg = near_settings(settings, fresh_database_url, f"redis://127.0.0.1:{proxy.port}/0")
    direct = cfg.replace(redis_url=private_redis.url)
    async with running(cfg, tmp_path, direct) as (svc, load):
        proxy.delay = DELAY_S
        delayed_at = time.monotonic()
        await asyncio.sleep(PAUSE_S)  # the fault's length
        proxy.delay = 0.0
        undelayed_at = time.monotonic()
        report.add(delay_recover_s=await recovered(svc, undelayed_at))

        suspended = near("suspended")
        proxy.flowing.clear()
        stalled_at = time.monotonic()
        await asyncio.sleep(STALL_S)  # the fault's length
        proxy.flowing.set()
        released_at = time.monotonic()
        report.add(stall_recover_s=await recovered(svc, released_at))
        assert near("suspended") > suspended, "L1 kept serving through the stall"
        await settle(load)
    stalled_writes = load.writes_between(stalled_at, released_at)
    report.add(
        writes_while_delayed=load.writes_between(delayed_at, undelayed_at),
        writes_while_stalled=stalled_writes,
    )
    assert stalled_writes > 0, "changes the stalled channel hid"
    check(load, report)
    report.emit(record_property)


async def test_the_checker_sees_a_near_cache_that_outlives_its_bound(
    settings: Settings,
    fresh_database_url: str,
    private_redis: RedisProcess,
    proxy: DelayProxy,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """The control of the tests above: the same stall under a bound of LOOSE_MS (a beat then
    counts as stalled only after minutes) lets L1 serve what it holds while changes of the
    hottest products land in Redis unseen (written by this test once the channel is held, so
    that they surely fall in the stall). The checker must see reads staler than X: the fault
    tests' "at most X" is not a harness that cannot fail."""
    report = Report("loose bound")
    cfg = near_settings(settings, fresh_database_url, f"redis://127.0.0.1:{proxy.port}/0").replace(
        near_cache_max_staleness_ms=LOOSE_MS
    )
    direct = cfg.replace(redis_url=private_redis.url)
    writer = Writer(direct, "redis")
    try:
        async with running(cfg, tmp_path, direct) as (_, load):
            hits = near("hit")
            proxy.flowing.clear()
            for pid in hottest(10):
                await writer.write(pid, load.written)
            stale_s = await wait_until(
                lambda: load.history.worst_staleness() > X_S, RECOVER_S, "a read staler than X"
            )
            proxy.flowing.set()
            served = near("hit") - hits
            await settle(load)
    finally:
        await writer.close()
    worst = load.history.worst()
    report.add(
        hits_while_stalled=int(served),
        stale_seen_after_s=stale_s,
        stale_reads=len(load.history.stale_reads()),
        worst_staleness_ms=worst.staleness * 1000 if worst else 0.0,
    )
    report.emit(record_property)
    assert served > 0
    assert worst is not None and worst.staleness > X_S


async def test_redis_restarted_empty_and_flushed(
    settings: Settings,
    fresh_database_url: str,
    private_redis: RedisProcess,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """Redis killed and started again empty on its port: the channel's connections fail, L1 is
    emptied, tracking starts on the new server, hits resume. Then FLUSHALL (a private server):
    the invalidation of everything empties L1 without ending the session."""
    report = Report("redis restarted")
    cfg = near_settings(settings, fresh_database_url, private_redis.url)
    async with running(cfg, tmp_path) as (svc, load):
        assert svc.tracking is not None and private_redis.proc is not None
        sessions, before = svc.tracking.sessions, resets()
        private_redis.proc.kill()
        private_redis.proc.wait()
        killed_at = time.monotonic()
        private_redis.start()
        report.add(restart_recover_s=await recovered(svc, killed_at))
        assert svc.tracking.sessions > sessions and resets() > before

        flushed = metric("catalog_near_cache_resets_total", reason="flush")
        sessions = svc.tracking.sessions
        admin = Redis.from_url(private_redis.url, socket_timeout=10)
        try:
            await admin.flushall()
        finally:
            await admin.aclose()
        flushed_at = time.monotonic()
        await wait_until(
            lambda: metric("catalog_near_cache_resets_total", reason="flush") > flushed,
            RECOVER_S,
            "the flush to reach the near cache",
        )
        report.add(flush_recover_s=await recovered(svc, flushed_at))
        assert svc.tracking.sessions == sessions, "a flush does not end the session"
        await settle(load)
    check(load, report)
    report.emit(record_property)


async def test_cluster_failover(
    fresh_database_url: str,
    cluster6: RedisCluster,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """The primary of the hottest product on a 6-node cluster killed: its replica takes over,
    the session on the old set of primaries ends, tracking starts on the new one, hits resume.
    The writers WAIT for a replica, so a recorded change survives the failover; the killed
    node then comes back as the new primary's replica, so changes on the promoted node are
    acknowledged (and checked) again."""
    report = Report("cluster failover")
    cfg = settings_on(cluster6, fresh_database_url, f"t{uuid.uuid4().hex[:10]}").replace(
        near_cache_enabled=True, near_cache_max_staleness_ms=X_MS
    )
    async with running(cfg, tmp_path) as (svc, load):
        assert svc.tracking is not None
        sessions, before = svc.tracking.sessions, resets()
        keys = Keys(cfg.key_namespace)
        victim = cluster6.owner(key_slot(keys.product(hottest(1)[0]).encode()))
        killed_at = time.monotonic()
        promoted = await asyncio.to_thread(cluster6.fail_over, victim)
        report.add(failover_s=time.monotonic() - killed_at, promoted=promoted)
        report.add(failover_recover_s=await recovered(svc, killed_at))
        assert svc.tracking.sessions > sessions and resets() > before
        await asyncio.to_thread(cluster6.restart, victim)
        rejoined_at = time.monotonic()
        await settle(load, 2.0)
    on_promoted = set(cluster6.slots_of(promoted))
    checked = sum(
        1
        for w in load.written.writes
        if w.committed > rejoined_at and key_slot(keys.product(w.key).encode()) in on_promoted
    )
    report.add(acknowledged_on_promoted_after_rejoin=checked)
    assert checked > 0, "no change on the promoted primary was checked"
    check(load, report)
    report.emit(record_property)
