"""Change capture in PostgreSQL (migration 0005): every committed change to a table a cached value
is built from queues its invalidation in the outbox, in its own transaction, whoever wrote it.

The writes here are plain SQL, as psql, a bulk import or an admin tool send them; no test writes
an event. Every row the triggers write must parse under the stream contract (docs/events.md)."""

from __future__ import annotations

import asyncio
from collections import Counter

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db import libpq_url
from core.events import (
    MAX_PRODUCT_IDS,
    PRICE_RULE_CHANGED,
    PRODUCT_CREATED,
    PRODUCT_DELETED,
    PRODUCT_UPDATED,
    PRODUCTS_UPDATED,
    Event,
    parse,
    tags_for,
)
from core.keys import Tag
from tests.conftest import SEED_PRODUCTS
from tests.helpers import eventually


async def sql(db: AsyncEngine, *statements: str) -> None:
    """Run ``statements`` in one transaction."""
    async with db.begin() as conn:
        for statement in statements:
            await conn.execute(sa.text(statement))


async def queued(db: AsyncEngine) -> list[Event]:
    """Every unsent outbox row, in id order, parsed as the consumer parses stream entries; the
    rows are then marked sent so the next call sees only what came after."""
    async with db.begin() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "UPDATE outbox SET sent_at = now() WHERE sent_at IS NULL RETURNING id, fields"
                )
            )
        ).all()
    return [parse(fields) for _, fields in sorted(rows)]


async def one(db: AsyncEngine, query: str) -> str:
    async with db.connect() as conn:
        return str(await conn.scalar(sa.text(query)))


async def test_a_plain_update_queues_product_updated_with_the_version_only_when_bumped(
    db: AsyncEngine,
) -> None:
    await sql(db, "UPDATE products SET name = 'psql edit' WHERE id = 'p0000001'")
    [event] = await queued(db)
    assert (event.type, event.product_id, event.version) == (PRODUCT_UPDATED, "p0000001", 0)

    await sql(db, "UPDATE products SET stock = 1, version = version + 1 WHERE id = 'p0000001'")
    [event] = await queued(db)
    assert event.version == 2  # the consumer keeps a write-through's entry at that version
    assert event.previous_category_id == "" and event.previous_brand_id == ""


async def test_a_rolled_back_change_queues_nothing(db: AsyncEngine) -> None:
    async def writer() -> None:
        async with db.begin() as conn:
            await conn.execute(sa.text("UPDATE products SET stock = 0"))
            raise RuntimeError("the writer gives up")

    with pytest.raises(RuntimeError):
        await writer()
    assert await queued(db) == []


async def test_a_bulk_update_queues_one_row_per_100_products(db: AsyncEngine) -> None:
    await sql(db, "UPDATE products SET stock = stock + 1")
    events = await queued(db)
    assert [e.type for e in events] == [PRODUCTS_UPDATED] * 3  # 300 products, not 300 rows
    ids = [i for e in events for i in e.product_ids]
    assert len(ids) == SEED_PRODUCTS and set(ids) == {f"p{n:07d}" for n in range(1, 301)}
    assert all(len(e.product_ids) <= MAX_PRODUCT_IDS for e in events)
    assert tags_for(events[0]) == {Tag.product(i) for i in events[0].product_ids}


async def test_rows_a_bulk_update_moves_get_their_own_event_naming_both_categories(
    db: AsyncEngine,
) -> None:
    old = await one(db, "SELECT category_id FROM products WHERE id = 'p0000005'")
    new = await one(db, f"SELECT min(id) FROM categories WHERE id <> '{old}'")
    await sql(
        db,
        f"UPDATE products SET category_id = CASE WHEN id = 'p0000005' THEN '{new}' "
        "ELSE category_id END WHERE id <= 'p0000010'",
    )
    events = await queued(db)
    moved = [e for e in events if e.type == PRODUCT_UPDATED]
    assert [(e.product_id, e.category_id, e.previous_category_id) for e in moved] == [
        ("p0000005", new, old)
    ]
    assert {Tag.list_category(old), Tag.list_category(new)} <= tags_for(moved[0])
    [rest] = [e for e in events if e.type == PRODUCTS_UPDATED]
    assert len(rest.product_ids) == 9 and "p0000005" not in rest.product_ids


async def test_inserts_deletes_and_id_changes_queue_created_and_deleted(db: AsyncEngine) -> None:
    await sql(
        db,
        "INSERT INTO products (id, sku, name, category_id, brand_id, price_minor, currency, stock)"
        " VALUES ('imported', 'SKU-imported', 'Imported', 'c00001', 'b00001', 100, 'USD', 1)",
    )
    await sql(db, "UPDATE products SET id = 'renamed' WHERE id = 'imported'")
    await sql(db, "DELETE FROM products WHERE id = 'renamed'")
    events = await queued(db)
    assert [(e.type, e.product_id) for e in events] == [
        (PRODUCT_CREATED, "imported"),
        (PRODUCT_DELETED, "imported"),
        (PRODUCT_CREATED, "renamed"),
        (PRODUCT_DELETED, "renamed"),
    ]
    assert all((e.category_id, e.brand_id) == ("c00001", "b00001") for e in events)


async def test_renames_queue_category_and_brand_updated_and_untouched_names_nothing(
    db: AsyncEngine,
) -> None:
    await sql(
        db,
        "UPDATE categories SET name = 'Renamed' WHERE id = 'c00002'",
        "UPDATE brands SET name = name",  # every brand touched, no name changed
        "UPDATE brands SET name = 'New brand name' WHERE id = 'b00003'",
    )
    events = await queued(db)
    assert [(e.type, e.category_id or e.brand_id) for e in events] == [
        ("category.updated", "c00002"),
        ("brand.updated", "b00003"),
    ]


RULE = (
    "INSERT INTO price_rules (id, name, scope, target_id, kind, value, priority) "
    "VALUES ('{id}', 'sale', '{scope}', '{target}', 'percent_off', 9000, 1000)"
)


async def members(db: AsyncEngine, column: str, value: str) -> set[str]:
    """The ids of the products whose ``column`` is ``value``."""
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text(f"SELECT id FROM products WHERE {column} = :v"), {"v": value}
        )
        return set(rows.scalars())


def by_scope(events: list[Event]) -> dict[tuple[str, str], list[tuple[str, ...]]]:
    """(scope field, id) -> the product_ids of each of its entries."""
    out: dict[tuple[str, str], list[tuple[str, ...]]] = {}
    for e in events:
        assert e.type == PRICE_RULE_CHANGED
        [(field, value)] = [
            (f, v)
            for f, v in (
                ("product_id", e.product_id),
                ("category_id", e.category_id),
                ("brand_id", e.brand_id),
            )
            if v
        ]
        out.setdefault((field, value), []).append(e.product_ids)
    return out


async def test_price_rule_changes_name_the_products_of_their_old_and_new_scope(
    db: AsyncEngine,
) -> None:
    category, brand = (
        await members(db, "category_id", "c00003"),
        await members(db, "brand_id", "b00004"),
    )
    await sql(db, RULE.format(id="flash", scope="category", target="c00003"))
    inserted = await queued(db)
    insert = by_scope(inserted)
    await sql(db, "UPDATE price_rules SET scope = 'brand', target_id = 'b00004' WHERE id = 'flash'")
    moved = by_scope(await queued(db))
    await sql(db, "UPDATE price_rules SET value = 5000 WHERE id = 'flash'")
    changed = by_scope(await queued(db))
    await sql(db, "DELETE FROM price_rules WHERE id = 'flash'")
    deleted = by_scope(await queued(db))

    def covered(entries: list[tuple[str, ...]]) -> list[str]:
        assert all(0 < len(ids) <= MAX_PRODUCT_IDS for ids in entries)
        return sorted(i for ids in entries for i in ids)

    assert {k: covered(v) for k, v in insert.items()} == {
        ("category_id", "c00003"): sorted(category)
    }
    assert {k: covered(v) for k, v in moved.items()} == {  # the new scope and the old one
        ("category_id", "c00003"): sorted(category),
        ("brand_id", "b00004"): sorted(brand),
    }
    for events in (changed, deleted):
        assert {k: covered(v) for k, v in events.items()} == {("brand_id", "b00004"): sorted(brand)}
    # The consumer voids those products by id: no category or brand tag (no rename announced).
    for event in inserted:
        assert tags_for(event) == {Tag.product(i) for i in event.product_ids}
        assert not any(t.renamed for t in tags_for(event))


async def test_product_scope_rules_name_the_product(db: AsyncEngine) -> None:
    await sql(
        db,
        "INSERT INTO price_rules (id, name, scope, target_id, kind, value, priority) VALUES "
        "('one', 'a', 'product', 'p0000007', 'percent_off', 100, 1), "
        "('two', 'b', 'product', 'p0000007', 'percent_off', 200, 2), "
        "('ghost', 'c', 'product', 'no-such-product', 'percent_off', 200, 2)",
    )
    events = await queued(db)  # one event per distinct scope, not per rule
    assert sorted((e.product_id, e.product_ids) for e in events) == [
        ("no-such-product", ("no-such-product",)),
        ("p0000007", ("p0000007",)),
    ]
    assert tags_for(events[0]) == {Tag.product(events[0].product_id)}


async def test_a_category_of_250_products_is_named_in_3_entries(db: AsyncEngine) -> None:
    await sql(
        db,
        "SET LOCAL catalog.capture = 'off'",
        "INSERT INTO categories (id, name) VALUES ('wide', 'Wide')",
        "INSERT INTO products (id, sku, name, category_id, brand_id, price_minor, currency, "
        "stock) SELECT 'w' || n, 'SKU-w' || n, 'w', 'wide', 'b00001', 100, 'USD', 1 "
        "FROM generate_series(1, 250) AS n",
    )
    await sql(db, RULE.format(id="wide-sale", scope="category", target="wide"))
    events = await queued(db)
    assert sorted(len(e.product_ids) for e in events) == [50, 100, 100]
    assert all(e.category_id == "wide" for e in events)
    ids = [i for e in events for i in e.product_ids]
    assert sorted(ids) == sorted(f"w{n}" for n in range(1, 251))  # each once


async def test_a_scope_without_products_queues_nothing(db: AsyncEngine) -> None:
    await sql(
        db,
        "INSERT INTO categories (id, name) VALUES ('empty', 'Empty')",
        RULE.format(id="e1", scope="category", target="empty"),
        RULE.format(id="e2", scope="brand", target="no-such-brand"),
    )
    assert await queued(db) == []
    await sql(
        db,
        "SET LOCAL catalog.capture = 'off'",
        RULE.format(id="e3", scope="brand", target="b00001"),
    )
    assert await queued(db) == []  # capture off, as for every table


async def waiting_on_a_lock(url: str, pid: int) -> bool:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as watcher:
        cursor = await watcher.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        )
        row = await cursor.fetchone()
    return row is not None and row[0] == "Lock"


MOVE_IN = "UPDATE products SET category_id = 'c00003' WHERE id = %s"


async def test_a_rule_waits_for_a_product_moving_into_its_scope_and_names_it(
    db: AsyncEngine, fresh_database_url: str
) -> None:
    """The fence: the product's move commits first, so the rule's query must see it (else a
    read between the two commits caches the old price and no event names the product)."""
    url = libpq_url(fresh_database_url)
    mover = await one(db, "SELECT min(id) FROM products WHERE category_id <> 'c00003'")
    async with (
        await psycopg.AsyncConnection.connect(url) as product_writer,
        await psycopg.AsyncConnection.connect(url) as rule_writer,
    ):
        await product_writer.execute(MOVE_IN, (mover,))  # holds FOR KEY SHARE on c00003
        rule = asyncio.create_task(
            rule_writer.execute(RULE.format(id="fenced", scope="category", target="c00003"))
        )
        await eventually(
            lambda: waiting_on_a_lock(url, rule_writer.info.backend_pid),
            what="the rule's trigger waiting for the product writer",
        )
        assert not rule.done()
        await product_writer.commit()
        await rule
        await rule_writer.commit()
    events = await queued(db)
    moved = [e for e in events if e.type == PRODUCT_UPDATED]
    assert [e.product_id for e in moved] == [mover]
    named = {i for e in events if e.type == PRICE_RULE_CHANGED for i in e.product_ids}
    assert named == await members(db, "category_id", "c00003") and mover in named


async def test_a_product_moving_into_a_rules_scope_waits_for_the_rule_to_commit(
    db: AsyncEngine, fresh_database_url: str
) -> None:
    """The other order: the move waits, so every read of the product after its commit sees
    the rule, and its own product.updated voids what was cached before."""
    url = libpq_url(fresh_database_url)
    mover = await one(db, "SELECT min(id) FROM products WHERE category_id <> 'c00003'")
    async with (
        await psycopg.AsyncConnection.connect(url) as product_writer,
        await psycopg.AsyncConnection.connect(url) as rule_writer,
    ):
        await rule_writer.execute(RULE.format(id="first", scope="category", target="c00003"))
        move = asyncio.create_task(product_writer.execute(MOVE_IN, (mover,)))
        await eventually(
            lambda: waiting_on_a_lock(url, product_writer.info.backend_pid),
            what="the product writer waiting for the rule's transaction",
        )
        assert not move.done()
        await rule_writer.commit()
        await move
        await product_writer.commit()
    events = await queued(db)
    named = {i for e in events if e.type == PRICE_RULE_CHANGED for i in e.product_ids}
    assert mover not in named
    assert [e.product_id for e in events if e.type == PRODUCT_UPDATED] == [mover]


async def test_image_changes_invalidate_their_products_and_cascades_add_nothing(
    db: AsyncEngine,
) -> None:
    await sql(
        db,
        "INSERT INTO product_images (product_id, position, url) "
        "VALUES ('p0000001', 90, 'https://x/1'), ('p0000002', 90, 'https://x/2')",
    )
    await sql(db, "UPDATE product_images SET alt_text = 'a' WHERE product_id = 'p0000003'")
    await sql(db, "DELETE FROM products WHERE id = 'p0000004'")  # images go by ON DELETE CASCADE
    events = await queued(db)
    assert [(e.type, e.product_id or ",".join(e.product_ids)) for e in events] == [
        (PRODUCTS_UPDATED, "p0000001,p0000002"),
        (PRODUCT_UPDATED, "p0000003"),
        (PRODUCT_DELETED, "p0000004"),
    ]


async def test_a_session_may_switch_capture_off_for_a_fresh_load(db: AsyncEngine) -> None:
    await sql(db, "SET LOCAL catalog.capture = 'off'", "UPDATE products SET stock = 3")
    assert await queued(db) == []
    await sql(db, "UPDATE products SET stock = 4 WHERE id = 'p0000001'")  # the next one is on
    assert len(await queued(db)) == 1


async def test_the_outbox_insert_notifies_at_commit_once_per_transaction(
    db: AsyncEngine, fresh_database_url: str
) -> None:
    async with await psycopg.AsyncConnection.connect(
        libpq_url(fresh_database_url), autocommit=True
    ) as listener:
        await listener.execute("LISTEN catalog_outbox")
        await sql(
            db,
            "UPDATE products SET stock = 1 WHERE id = 'p0000001'",
            "UPDATE products SET stock = 2 WHERE id = 'p0000002'",
            "UPDATE price_rules SET priority = priority",
        )
        await sql(db, "UPDATE products SET stock = 5 WHERE id = 'nobody'")  # no row, no notify
        got = Counter([n.channel async for n in listener.notifies(timeout=1.0)])
    assert got == {"catalog_outbox": 1}
