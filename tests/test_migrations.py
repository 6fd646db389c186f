"""Migrations: an empty database reaches head, re-running is a no-op (also concurrently), the
schema enforces the data-model invariants, and the indexes the queries rely on exist."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import psycopg
import pytest

from core.db import libpq_url
from core.migrations import current, downgrade, head, upgrade
from tests.conftest import create_database, drop_database

CATALOG_TABLES = {"categories", "brands", "products", "product_images", "price_rules"}


@pytest.fixture
def empty_database_url(pg_base_url: str) -> Iterator[str]:
    url = create_database(pg_base_url)
    yield url
    drop_database(url)


def _tables(url: str) -> set[str]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {row[0] for row in rows} - {"alembic_version"}


def _execute(url: str, statement: str) -> None:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(statement)


def test_upgrade_on_empty_database_reaches_head(empty_database_url: str) -> None:
    assert current(empty_database_url) is None
    upgrade(empty_database_url)
    assert current(empty_database_url) == head()
    assert _tables(empty_database_url) >= CATALOG_TABLES


def test_upgrade_twice_is_a_no_op(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    upgrade(empty_database_url)
    assert current(empty_database_url) == head()
    assert _tables(empty_database_url) >= CATALOG_TABLES


def test_concurrent_upgrades_all_succeed(empty_database_url: str) -> None:
    # Processes, as deploys run them (Alembic's migration context is process-global).
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=3, mp_context=spawn) as pool:
        list(pool.map(upgrade, [empty_database_url] * 3))
    assert current(empty_database_url) == head()


def test_downgrade_to_base_removes_everything_and_upgrade_restores_it(
    empty_database_url: str,
) -> None:
    upgrade(empty_database_url)
    downgrade(empty_database_url, "base")
    assert current(empty_database_url) is None
    assert _tables(empty_database_url) == set()
    upgrade(empty_database_url)
    assert _tables(empty_database_url) >= CATALOG_TABLES


def test_query_indexes_exist(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    with psycopg.connect(libpq_url(empty_database_url)) as conn:
        rows = conn.execute(
            "SELECT t.relname, array_agg(a.attname ORDER BY k.ord) "
            "FROM pg_index x JOIN pg_class t ON t.oid = x.indrelid "
            "CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord) "
            "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum "
            "WHERE t.relname IN ('products', 'price_rules') GROUP BY x.indexrelid, t.relname"
        ).fetchall()
    indexes = {(table, tuple(columns)) for table, columns in rows}
    assert {
        ("products", ("category_id", "id")),
        ("products", ("brand_id", "id")),
        ("products", ("category_id", "brand_id", "id")),
        ("products", ("sku",)),
        ("price_rules", ("scope", "target_id")),
    } <= indexes


VALID_PRODUCT = (
    "INSERT INTO products (id, sku, name, category_id, brand_id, price_minor, currency, stock) "
    "VALUES ('{id}', '{id}', 'n', 'c', 'b', {price}, '{currency}', {stock})"
)
VALID_RULE = (
    "INSERT INTO price_rules (id, name, scope, target_id, kind, value, currency, priority, "
    "valid_from, valid_until) VALUES ('r', 'n', '{scope}', 't', '{kind}', {value}, {currency}, 1, "
    "{valid_from}, {valid_until})"
)
GOOD_PRODUCT = {"id": "p-1_A", "price": 0, "currency": "USD", "stock": 0}
GOOD_RULE = {
    "scope": "brand",
    "kind": "percent_off",
    "value": 10_000,
    "currency": "NULL",
    "valid_from": "now()",
    "valid_until": "now() + interval '1 day'",
}


@pytest.mark.parametrize(
    "change",
    [
        {"id": "has space"},
        {"id": "x" * 65},
        {"price": -1},
        {"currency": "usd"},
        {"stock": -1},
    ],
)
def test_schema_rejects_invalid_products(
    empty_database_url: str, change: dict[str, object]
) -> None:
    upgrade(empty_database_url)
    _execute(empty_database_url, "INSERT INTO categories (id, name) VALUES ('c', 'C')")
    _execute(empty_database_url, "INSERT INTO brands (id, name) VALUES ('b', 'B')")
    _execute(empty_database_url, VALID_PRODUCT.format(**GOOD_PRODUCT))
    with pytest.raises(psycopg.errors.CheckViolation):
        _execute(empty_database_url, VALID_PRODUCT.format(**{**GOOD_PRODUCT, "id": "q", **change}))


@pytest.mark.parametrize(
    "change",
    [
        {"scope": "store"},
        {"kind": "free_shipping"},
        {"value": -1},
        {"value": 10_001},
        {"kind": "amount_off"},  # amount_off needs a currency
        {"currency": "'USD'"},  # percent_off must not have one
        {"valid_from": "now() + interval '2 days'"},  # empty window
    ],
)
def test_schema_rejects_invalid_price_rules(
    empty_database_url: str, change: dict[str, object]
) -> None:
    upgrade(empty_database_url)
    _execute(empty_database_url, VALID_RULE.format(**GOOD_RULE))
    _execute(empty_database_url, "DELETE FROM price_rules")
    with pytest.raises(psycopg.errors.CheckViolation):
        _execute(empty_database_url, VALID_RULE.format(**{**GOOD_RULE, **change}))


def _rule_entries(url: str, rule_id: str) -> list[dict[str, str]]:
    """Insert a category-scope rule; the fields of the price_rule.changed rows it queued."""
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO price_rules (id, name, scope, target_id, kind, value, priority) "
            f"VALUES ('{rule_id}', 'n', 'category', 'c', 'percent_off', 100, 1)"
        )
        rows = conn.execute(
            "DELETE FROM outbox WHERE fields->>'type' = 'price_rule.changed' RETURNING fields"
        ).fetchall()
    return [row[0] for row in rows]


def test_0006_names_a_rules_products_and_its_downgrade_restores_scope_only_entries(
    empty_database_url: str,
) -> None:
    upgrade(empty_database_url)
    _execute(empty_database_url, "INSERT INTO categories (id, name) VALUES ('c', 'C')")
    _execute(empty_database_url, "INSERT INTO brands (id, name) VALUES ('b', 'B')")
    for pid in ("p1", "p2"):
        _execute(empty_database_url, VALID_PRODUCT.format(**{**GOOD_PRODUCT, "id": pid}))
    [entry] = _rule_entries(empty_database_url, "r1")
    assert (entry["category_id"], sorted(entry["product_ids"].split(","))) == ("c", ["p1", "p2"])

    downgrade(empty_database_url, "0005")
    assert current(empty_database_url) == "0005"
    [entry] = _rule_entries(empty_database_url, "r2")
    assert entry["category_id"] == "c" and "product_ids" not in entry

    upgrade(empty_database_url)
    [entry] = _rule_entries(empty_database_url, "r3")
    assert sorted(entry["product_ids"].split(",")) == ["p1", "p2"]
