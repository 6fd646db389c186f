"""Transactional outbox on a real PostgreSQL: rollbacks publish nothing; two relays publish every
row at least once, in order per product, never skipping one; a row that cannot be published is
set aside and the rows behind it flow."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from core.events import PRODUCT_UPDATED, new_event, to_fields
from core.keys import Keys
from core.outbox import add_to_outbox, outbox
from core.publisher import Publisher
from core.redisclient import ReplicationShortfall, ReplicaWait
from core.settings import Settings
from invalidator.outbox import OutboxRelay, failed_rows, retry_failed
from tests.helpers import Delta, eventually
from tests.invalidator.conftest import entries
from tests.invalidator.test_cli import cli


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """This module's tests run on one Redis and on a Redis Cluster."""
    return topo_settings


_made: list[OutboxRelay] = []


def relay(
    db: AsyncEngine, publisher: Publisher, batch_size: int = 500, poll_s: float = 0.005
) -> OutboxRelay:
    """A relay whose connection is closed after the test."""
    made = OutboxRelay(db, publisher, batch_size=batch_size, poll_s=poll_s, retention_s=3600)
    _made.append(made)
    return made


@pytest.fixture(autouse=True)
async def _close_relays() -> AsyncIterator[None]:
    yield
    while _made:
        await _made.pop().close()


async def stream_fields(redis: Redis, keys: Keys) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in f.items()} for _, f in await entries(redis, keys.stream)
    ]


async def bump(db: AsyncEngine, product_id: str) -> int:
    """A writer: change the product; its capture trigger queues the event in the transaction."""
    async with db.begin() as conn:
        version = await conn.scalar(
            sa.text("UPDATE products SET version = version + 1 WHERE id = :id RETURNING version"),
            {"id": product_id},
        )
        assert version is not None
    return int(version)


async def test_rolled_back_transaction_publishes_nothing(
    db: AsyncEngine, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    async def failing_writer() -> None:
        async with db.begin() as conn:
            await add_to_outbox(conn, new_event(PRODUCT_UPDATED, product_id="rolled-back"))
            raise RuntimeError("writer failed after queuing its event")

    with pytest.raises(RuntimeError):
        await failing_writer()
    assert await relay(db, publisher).relay_once() == 0
    assert await redis.exists(keys.stream) == 0

    async with db.begin() as conn:
        await add_to_outbox(conn, new_event(PRODUCT_UPDATED, product_id="committed"))
    assert await relay(db, publisher).relay_once() == 1
    assert [f["product_id"] for f in await stream_fields(redis, keys)] == ["committed"]
    async with db.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).where(outbox.c.sent_at.is_(None))) == 0


async def test_two_relays_publish_every_row_in_order_per_product(
    db: AsyncEngine, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    async with db.connect() as conn:
        products = list(await conn.scalars(sa.text("SELECT id FROM products ORDER BY id LIMIT 8")))
    stop = asyncio.Event()
    relays = [relay(db, publisher, batch_size=7) for _ in range(2)]
    running = [asyncio.create_task(r.run(stop)) for r in relays]

    async def writer(product_id: str) -> list[int]:
        return [await bump(db, product_id) for _ in range(40)]

    # Two writers per product, racing each other and the relays.
    written = await asyncio.gather(*(writer(p) for p in products * 2))

    async def all_sent() -> bool:
        async with db.connect() as conn:
            unsent = await conn.scalar(
                sa.select(sa.func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
            )
        return unsent == 0

    await eventually(all_sent, timeout=60, what="outbox drained")
    stop.set()
    await asyncio.gather(*running)

    seen: dict[str, list[int]] = defaultdict(list)
    for fields in await stream_fields(redis, keys):
        seen[fields["product_id"]].append(int(fields["version"]))
    expected = defaultdict(set)
    for product_id, versions in zip(products * 2, written, strict=True):
        expected[product_id].update(versions)
    for product_id in products:
        first_seen = list(dict.fromkeys(seen[product_id]))  # at-least-once: drop repeats
        assert first_seen == sorted(expected[product_id]), product_id
    assert sum(r.published for r in relays) == sum(len(v) for v in written)


async def insert_row(db: AsyncEngine, fields: object, stream: str | None = None) -> int:
    """An outbox row as any writer could insert it, well-formed or not."""
    async with db.begin() as conn:
        row_id = await conn.scalar(
            sa.insert(outbox).values(stream=stream, fields=fields).returning(outbox.c.id)
        )
    assert row_id is not None
    return int(row_id)


async def test_unpublishable_row_is_set_aside_and_the_rows_behind_it_flow(
    db: AsyncEngine, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    good = to_fields(new_event(PRODUCT_UPDATED, product_id="before"))
    await insert_row(db, good)
    nested = {**good, "product_id": {"id": "p1"}}  # a JSON object where an id belongs
    bad_ids = [
        await insert_row(db, nested),
        await insert_row(db, {**good, "product_id": None}),
        await insert_row(db, {**good, "product_id": "x" * 20_000}),
        await insert_row(db, good, stream=""),
    ]
    # A stream key of another type: Redis itself refuses this one XADD (WRONGTYPE).
    wrong_type = keys.stream + ":not-a-stream"
    await redis.set(wrong_type, "x")
    bad_ids.append(await insert_row(db, good, stream=wrong_type))
    await insert_row(db, to_fields(new_event(PRODUCT_UPDATED, product_id="after")))
    set_aside = Delta("catalog_outbox_failed_total")

    r = relay(db, publisher)
    assert await r.relay_once() == 7
    assert [f["product_id"] for f in await stream_fields(redis, keys)] == ["before", "after"]
    assert await r.relay_once() == 0, "set-aside rows are not retried"
    assert (r.published, r.failed, set_aside()) == (2, 5, 5)

    listed = await failed_rows(db, count=10)
    assert [row.id for row in listed] == bad_ids
    reasons = [row.error for row in listed]
    assert "field 'product_id' must be a string, got JSON object" in reasons[0]
    assert "got JSON null" in reasons[1]
    assert "longer than" in reasons[2]
    assert "stream name" in reasons[3]
    assert "WRONGTYPE" in reasons[4]

    # Fixed by hand, a row is queued again and published.
    await redis.delete(wrong_type)
    assert await retry_failed(db, [bad_ids[4]]) == 1
    assert await r.relay_once() == 1
    assert [row.id for row in await failed_rows(db, count=10)] == bad_ids[:4]
    assert await redis.xlen(wrong_type) == 1


async def test_rows_are_marked_sent_only_once_enough_replicas_have_their_events(
    db: AsyncEngine, redis: Redis, keys: Keys
) -> None:
    """No replica here: WAIT 1 falls short, the pass rolls back (the rows stay queued and will
    be published again); without a wait the same rows are marked sent."""
    await insert_row(db, to_fields(new_event(PRODUCT_UPDATED, product_id="p")))
    short = Delta("catalog_replica_wait_short_total", by="relay")
    waiting = Publisher(redis, keys, maxlen=1000, replicas=ReplicaWait(keys, 1, timeout_ms=20))
    with pytest.raises(ReplicationShortfall):
        await relay(db, waiting).relay_once()
    assert short() == 1
    assert await unsent(db) == 1
    assert len(await stream_fields(redis, keys)) == 1  # published, not marked: again next pass
    assert await relay(db, Publisher(redis, keys, maxlen=1000)).relay_once() == 1
    assert await unsent(db) == 0


async def unsent(db: AsyncEngine) -> int:
    async with db.connect() as conn:
        query = sa.select(sa.func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
        return int(await conn.scalar(query) or 0)


async def test_cli_lists_set_aside_rows(
    db: AsyncEngine, publisher: Publisher, settings: Settings, fresh_database_url: str
) -> None:
    row_id = await insert_row(db, {"schema": "1", "product_id": ["p1", "p2"]})
    await relay(db, publisher).relay_once()
    done = cli(settings, "outbox", "failed", CATALOG_DATABASE_URL=fresh_database_url)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith(f"{row_id}\t")
    assert "field 'product_id' must be a string, got JSON array" in line


async def test_chained_passes_commit_with_the_next_batch_and_publish_each_row_once(
    db: AsyncEngine, publisher: Publisher, redis: Redis, keys: Keys
) -> None:
    """Full batches chain (COMMIT goes with the next BEGIN): every row is still published once,
    in order, and marked sent by the time the relay waits again."""
    ids = [f"chained-{n}" for n in range(6)]
    for product_id in ids:
        await insert_row(db, to_fields(new_event(PRODUCT_UPDATED, product_id=product_id)))
    r = relay(db, publisher, batch_size=1, poll_s=3600)
    stop = asyncio.Event()
    running = asyncio.create_task(r.run(stop))

    async def all_sent() -> bool:
        async with db.connect() as conn:
            unsent = await conn.scalar(
                sa.select(sa.func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
            )
        return unsent == 0

    try:
        await eventually(all_sent, what="every row committed as sent")
    finally:
        stop.set()
        await running
    assert r.chained >= len(ids) - 1
    assert [f["product_id"] for f in await stream_fields(redis, keys)] == ids
