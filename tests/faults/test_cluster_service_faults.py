"""The service on a 6-node Redis Cluster (3 primaries, a replica each) while the primary of the
hottest products fails over, and while slots holding hot keys move, with the processes an
operator runs: ``python -m service``, ``python -m invalidator`` (consumer and outbox relay,
``CATALOG_REDIS_WAIT_REPLICAS=1``) and, at the end, ``python -m ops verify``.

The load is the workload's (devtools/workload.py): Zipf reads over the seeded products (mostly
GetProduct, 5% ListProducts of the hot products' categories or of everything, 5%
BatchGetProducts of 10 ids) and plain SQL updates of Zipf-drawn ids, a few dozen a second, each
captured by the triggers, relayed, consumed and WAITed for. Every read's returned versions are
kept.

Acceptance (issue 13): no read fails at the client, during the fault or after it (no CROSSSLOT,
MOVED, ASK, TRYAGAIN or CLUSTERDOWN surfaces as a gRPC error); the fault reached the service
(its metrics count Redis errors and reads served from PostgreSQL during the failover; each moved
slot has its new owner, and reads completed while it moved); once the updates stop and the
outbox and the group have drained, no read started after that returns a version older than
PostgreSQL's, every product the service answers equals the one built from PostgreSQL, and
``verify`` finds 0 stale entries. Faults are lined up with the system's own
signals (the cluster's state, counts of completed reads, the service's metrics), not sleeps;
the only pause is the update rate.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import sqlalchemy as sa
from grpc import aio
from redis.crc import key_slot
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.db import create_engine
from core.keys import Keys
from core.redisclient import RedisClient, connect
from core.repository import Repository
from core.settings import Settings
from devtools.rediscluster import RedisCluster
from devtools.serverprocess import ServerProcess
from devtools.workload import update_plain, zipf_draws
from tests.faults.conftest import (
    PRODUCT_IDS,
    Invalidators,
    Load,
    Outcome,
    ReadLoad,
    drained,
    settings_on,
    unsent,
    wait_until,
)
from tests.helpers import delete_namespace
from tests.test_verify import run_verify

pytestmark = [pytest.mark.fault, pytest.mark.slow]

# A read falls back after at most one Redis timeout (0.25 s) and half its time left for a
# lease wait; 2 s absorbs the stalls of a shared 2-core machine (test_redis_faults.py).
DEADLINE_S = 2.0
DRAWS = zipf_draws(PRODUCT_IDS, 20_000)
HOT = [pid for pid, _ in Counter(DRAWS).most_common(10)]
UPDATE_PAUSE_S = 0.03  # between two updates: a few dozen a second
MAX_LOAD_S = 85.0  # a bound; each test stops its load long before
READS_BETWEEN = 1500  # completed reads that mark "a while" of load between two steps


@dataclass
class Rig:
    """The service and one invalidator on the cluster, a client of the test's own, the database,
    and the highest version the update load committed per product."""

    settings: Settings
    server: ServerProcess
    redis: RedisClient
    engine: AsyncEngine
    list_filters: list[str]
    committed: dict[str, int] = field(default_factory=dict)

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.key_namespace)

    def metric(self, name: str, **labels: str) -> float:
        return self.server.metric(name, **labels)

    def reads(self) -> ReadLoad:
        return ReadLoad(
            self.server.target,
            DEADLINE_S,
            workers=6,
            max_seconds=MAX_LOAD_S,
            lists=5,
            batches=5,
            draws=DRAWS,
            list_filters=self.list_filters,
        ).start()

    def updates(self) -> Load:
        """Plain SQL updates of the Zipf draws in order (the hot products most often)."""

        async def update(n: int) -> None:
            pid = DRAWS[n % len(DRAWS)]
            version = await update_plain(self.engine, pid)
            self.committed[pid] = max(self.committed.get(pid, 0), version)
            await asyncio.sleep(UPDATE_PAUSE_S)

        return Load(update).start()

    async def warm(self, load: ReadLoad, updates: Load) -> None:
        hits = self.hits()
        await wait_until(
            lambda: self.hits() > hits + 1000 and updates.done >= 50,
            30,
            "a warm cache and updates flowing",
        )
        assert load.codes().keys() == {"OK"}, load.codes()

    def hits(self) -> float:
        return self.metric("catalog_cache_requests_total", op="get", result="hit")

    async def settle(self) -> float:
        """Wait until every committed change was published, delivered and acked; when."""

        async def settled() -> bool:
            return await unsent(self.engine) == 0 and await drained(self.redis, self.keys)

        await wait_until(settled, 60, "the outbox published and the group drained")
        return time.monotonic()

    async def check_after_drain(self, load: ReadLoad, drained_at: float) -> list[str]:
        """Stop ``load`` once it completed reads after the drain, then compare with
        PostgreSQL. Returns figures to print."""
        await wait_until(
            lambda: load.codes(since=drained_at)["OK"] >= READS_BETWEEN, 30, "reads after it"
        )
        outcomes = await load.stop()
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.text("SELECT id, version FROM products"))
            versions = {r.id: int(r.version) for r in rows}
        assert {p: versions[p] for p in self.committed} == self.committed
        after = [o for o in outcomes if o.started >= drained_at]
        older = [
            f"{pid} v{v} < v{versions[pid]}"
            for o in after
            for pid, v in o.versions
            if v < versions[pid]
        ]
        assert older == [], f"reads started after the drain returned old versions: {older[:20]}"

        # Every product as the service answers it (cached on the way) equals PostgreSQL's.
        built = await Repository(self.engine).get_products(PRODUCT_IDS)
        async with aio.insecure_channel(self.server.target) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            for pid in PRODUCT_IDS:
                got = await stub.GetProduct(pb.GetProductRequest(id=pid), timeout=5)
                assert got == pb.Product.FromString(built[pid].data), pid
        done = await asyncio.to_thread(run_verify, self.settings)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "stale: 0" in done.stdout, done.stdout
        verified = " ".join(done.stdout.split())
        return [
            f"{len(outcomes)} reads ({sum(len(o.versions) for o in outcomes)} products), "
            f"{dict(load.codes())}; {len(after)} started after the drain, 0 older than "
            f"PostgreSQL; {len(self.committed)} products updated; verify: {verified}"
        ]


@pytest.fixture
def cluster(cluster6: RedisCluster) -> Iterator[RedisCluster]:
    """The module's cluster, whole again after the test (a killed node restarted)."""
    yield cluster6
    for node in cluster6.nodes:
        if node.proc is None:
            cluster6.restart(node.port)
    cluster6.wait_ok()


@pytest.fixture
async def rig(cluster: RedisCluster, fresh_database_url: str) -> AsyncIterator[Rig]:
    settings = settings_on(cluster, fresh_database_url)
    engine = create_engine(settings)
    async with engine.connect() as conn:
        query = sa.text("SELECT DISTINCT category_id FROM products WHERE id = ANY(:ids)")
        categories = sorted((await conn.execute(query, {"ids": HOT[:5]})).scalars())
    invalidators = Invalidators(settings)
    invalidators.start("a")  # consumes the stream and relays the outbox
    server = ServerProcess(settings).start()
    redis = connect(settings, socket_timeout=5.0, connect_timeout=5.0)
    try:
        yield Rig(settings, server, redis, engine, ["", *categories])
    finally:
        server.stop()
        invalidators.stop_all()
        await delete_namespace(redis, settings.key_namespace)
        await redis.aclose()
        await engine.dispose()


def failed(outcomes: list[Outcome], since: float) -> list[str]:
    return [
        f"{o.code.name} at {o.started - since:+.2f} s, took {o.seconds:.2f} s"
        for o in outcomes
        if o.code.name != "OK"
    ]


async def test_reads_never_fail_while_the_hot_primary_fails_over_and_nothing_is_stale_after(
    rig: Rig, cluster: RedisCluster
) -> None:
    load = rig.reads()
    updates = rig.updates()
    try:
        await rig.warm(load, updates)
        victim = cluster.owner(key_slot(HOT[0].encode()))
        errors, bypassed = rig.metric("catalog_redis_errors_total"), bypasses(rig)
        waits = rig.metric("catalog_lease_waits_total")
        killed_at = time.monotonic()
        promoted = await asyncio.to_thread(cluster.fail_over, victim)
        promoted_at = time.monotonic()
        # The fault reached the service: Redis errors on the read path, reads from PostgreSQL.
        fault_errors = rig.metric("catalog_redis_errors_total") - errors
        fault_bypassed = bypasses(rig) - bypassed
        fault_waits = rig.metric("catalog_lease_waits_total") - waits
        assert fault_errors > 0 and fault_bypassed > 0
        hits = rig.hits()
        await wait_until(
            lambda: load.codes(since=promoted_at)["OK"] >= READS_BETWEEN and rig.hits() > hits,
            30,
            "reads and hits after the promotion",
        )
        await asyncio.to_thread(cluster.restart, victim)  # back as the new primary's replica
        restarted_at = time.monotonic()
        await wait_until(
            lambda: load.codes(since=restarted_at)["OK"] >= READS_BETWEEN, 30, "reads after"
        )
        await updates.stop()
        assert updates.errors == []
        drained_at = await rig.settle()
        figures = await rig.check_after_drain(load, drained_at)
    finally:
        await updates.stop()
        if load.running:
            await load.stop()
    window = [o for o in load.outcomes if killed_at <= o.started <= promoted_at]
    slowest = max(load.outcomes, key=lambda o: o.seconds)
    print(
        f"\nprimary {victim} of {HOT[0]} killed; {promoted} promoted after "
        f"{promoted_at - killed_at:.2f} s; {len(window)} reads meanwhile; "
        f"{fault_errors:.0f} Redis errors, {fault_bypassed:.0f} reads from PostgreSQL, "
        f"{fault_waits:.0f} lease waits; {updates.done} updates; settled "
        f"{drained_at - restarted_at:.2f} s after the restart; slowest read "
        f"{slowest.seconds * 1000:.0f} ms, {slowest.started - killed_at:+.2f} s from the kill\n"
        + "\n".join(figures)
    )
    assert load.codes().keys() == {"OK"}, failed(load.outcomes, killed_at)
    assert victim not in cluster.primaries() and promoted in cluster.primaries()


async def test_moving_slots_of_hot_keys_under_load_shows_clients_no_error_and_nothing_stale(
    rig: Rig, cluster: RedisCluster
) -> None:
    # Two of the five hottest products on different primaries and a hot list filter, each the
    # one whose slot redis-cli reaches soonest (it moves a source's lowest slots first).
    first = min(HOT[:5], key=lambda p: slots_to_move(cluster, p))
    second = min(
        (p for p in HOT[:5] if owner_of(cluster, p) != owner_of(cluster, first)),
        key=lambda p: slots_to_move(cluster, p),
    )
    hot_list = min(rig.list_filters, key=lambda c: slots_to_move(cluster, filter_tag(c)))
    tags = {
        f"product {first}": first,
        f"product {second}": second,
        f"list pages of category {hot_list or '(any)'}": filter_tag(hot_list),
    }
    load = rig.reads()
    updates = rig.updates()
    moves: list[str] = []
    try:
        await rig.warm(load, updates)
        started_at = time.monotonic()
        for n, (what, tag) in enumerate(tags.items()):
            slot = key_slot(tag.encode())
            source, moved = cluster.owner(slot), slots_to_move(cluster, tag)
            # Not the source of a later move: that move would take these slots back with its
            # own (they would be its lowest).
            later = {cluster.owner(key_slot(t.encode())) for t in list(tags.values())[n + 1 :]}
            others = [p for p in sorted(cluster.primaries()) if p != source]
            target = next((p for p in others if p not in later), others[0])
            mark, began = len(load.outcomes), time.monotonic()
            await asyncio.to_thread(cluster.reshard_slot, slot, target)
            assert cluster.owner(slot) == target, what
            assert len(load.outcomes) > mark, f"no read completed while {what} moved"
            moves.append(
                f"{what}: slot {slot} ({moved} slots) {source} -> {target} in "
                f"{time.monotonic() - began:.2f} s, {len(load.outcomes) - mark} reads meanwhile"
            )
            await wait_until(lambda m=mark: len(load.outcomes) >= m + 300, 30, "reads after")
        moved_at, hits = time.monotonic(), rig.hits()
        await wait_until(
            lambda: load.codes(since=moved_at)["OK"] >= READS_BETWEEN and rig.hits() > hits,
            30,
            "reads and hits after the moves",
        )
        await updates.stop()
        assert updates.errors == []
        drained_at = await rig.settle()
        figures = await rig.check_after_drain(load, drained_at)
    finally:
        await updates.stop()
        if load.running:
            await load.stop()
    print(
        f"\n{len(moves)} moves under load in {moved_at - started_at:.2f} s; {updates.done} "
        f"updates; {rig.metric('catalog_redis_errors_total'):.0f} Redis errors on the read "
        f"path, {bypasses(rig):.0f} reads from PostgreSQL\n" + "\n".join(moves + figures)
    )
    assert load.codes().keys() == {"OK"}, failed(load.outcomes, started_at)


def filter_tag(category_id: str) -> str:
    """The hash tag (without braces) of a category's list pages ("" for every product)."""
    return Keys.filter_tag(category_id, "")[1:-1]


def slots_to_move(cluster: RedisCluster, tag: str) -> int:
    """How many slots ``reshard_slot`` moves to move ``tag``'s: its owner's up to it."""
    slot = key_slot(tag.encode())
    return cluster.slots_of(cluster.owner(slot)).index(slot) + 1


def owner_of(cluster: RedisCluster, pid: str) -> int:
    return cluster.owner(key_slot(pid.encode()))


def bypasses(rig: Rig) -> float:
    """Cache lookups the service answered from PostgreSQL after a Redis error or an open
    breaker (a miss's fill is not one)."""
    return rig.metric("catalog_cache_requests_total", result="bypass")
