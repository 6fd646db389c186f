"""Repository reads against a real PostgreSQL: the built Product message, price-rule selection,
one SQL round trip per call, keyset pages, price boundaries, error classification, and the
seeder that fills the database (deterministic and idempotent)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from core.db import create_engine, is_connection_error, libpq_url
from core.repository import (
    LoadedProduct,
    Names,
    Repository,
    brand_fragment,
    category_fragment,
)
from core.settings import Settings
from ops.seed import seed_catalog
from tests.conftest import SEED_PRODUCTS

NOW = datetime.now(UTC)
DAY = timedelta(days=1)
PercentOff = pb.PriceRule.KIND_PERCENT_OFF


def _product(loaded: LoadedProduct) -> pb.Product:
    return pb.Product.FromString(loaded.data)


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """Collects every SQL statement sent through ``engine`` inside the block."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


def db_loads(op: str) -> float:
    return REGISTRY.get_sample_value("catalog_db_loads_total", {"op": op}) or 0.0


class World:
    """Writes test rows with unique ids into a database of the test's own."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def execute(self, sql: str, **params: Any) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(text(sql), params)

    async def named(self, table: str) -> str:
        new_id = f"{table[0]}-{uuid.uuid4().hex[:12]}"
        # table is one of two constants of this test module
        await self.execute(f"INSERT INTO {table} (id, name) VALUES (:id, :id)", id=new_id)
        return new_id

    async def product(
        self,
        *,
        price: int = 10_000,
        currency: str = "USD",
        positions: tuple[int, ...] = (0,),
        category_id: str | None = None,
        brand_id: str | None = None,
    ) -> tuple[str, str, str]:
        """(product id, category id, brand id); fresh category and brand unless given."""
        pid = f"t-{uuid.uuid4().hex[:12]}"
        category_id = category_id or await self.named("categories")
        brand_id = brand_id or await self.named("brands")
        await self.execute(
            "INSERT INTO products (id, sku, name, category_id, brand_id, price_minor, currency, "
            "stock) VALUES (:id, :id, 'Test product', :c, :b, :price, :currency, 7)",
            id=pid,
            c=category_id,
            b=brand_id,
            price=price,
            currency=currency,
        )
        for position in positions:
            await self.execute(
                "INSERT INTO product_images (product_id, position, url, alt_text) "
                "VALUES (:id, :pos, :url, :alt)",
                id=pid,
                pos=position,
                url=f"https://img.test/{pid}/{position}.jpg",
                alt=f"alt {position}",
            )
        return pid, category_id, brand_id

    async def rule(
        self,
        scope: str,
        target_id: str,
        *,
        rule_id: str | None = None,
        kind: str = "percent_off",
        value: int = 1000,
        priority: int = 0,
        currency: str | None = None,
        valid_from: datetime | None = None,
        valid_until: datetime | None = None,
    ) -> str:
        rule_id = rule_id or f"r-{uuid.uuid4().hex[:12]}"
        await self.execute(
            "INSERT INTO price_rules (id, name, scope, target_id, kind, value, currency, "
            "priority, valid_from, valid_until) VALUES (:id, :name, :scope, :target, :kind, "
            ":value, :currency, :priority, :valid_from, :valid_until)",
            id=rule_id,
            name=f"rule {rule_id}",
            scope=scope,
            target=target_id,
            kind=kind,
            value=value,
            currency=currency,
            priority=priority,
            valid_from=valid_from,
            valid_until=valid_until,
        )
        return rule_id


@pytest.fixture
def world(db: AsyncEngine) -> World:
    return World(db)


@pytest.fixture
def repo(db: AsyncEngine) -> Repository:
    return Repository(db)


async def _one(repo: Repository, product_id: str) -> pb.Product:
    return _product((await repo.get_products([product_id]))[product_id])


# --- the built message -------------------------------------------------------------------------


async def test_product_message_carries_every_field(engine: AsyncEngine, database_url: str) -> None:
    loaded = (await Repository(engine).get_products(["p0000001"]))["p0000001"]
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute(
            "SELECT p.sku, p.name, p.description, c.id, c.name, b.id, b.name, p.price_minor, "
            "p.currency, p.stock, p.version, p.updated_at FROM products p "
            "JOIN categories c ON c.id = p.category_id JOIN brands b ON b.id = p.brand_id "
            "WHERE p.id = 'p0000001'"
        ).fetchone()
    assert row is not None
    product = _product(loaded)
    assert (loaded.id, loaded.category_id, loaded.brand_id) == ("p0000001", row[3], row[5])
    assert product.id == "p0000001"
    assert (product.sku, product.name, product.description) == row[:3]
    assert (product.category.id, product.category.name) == row[3:5]
    assert (product.brand.id, product.brand.name) == row[5:7]
    assert product.base_price == pb.Money(currency_code=row[8], amount_minor=row[7])
    assert (product.stock, product.version) == (row[9], row[10])
    assert product.update_time.ToDatetime(tzinfo=UTC) == row[11]
    assert len(product.images) >= 1


async def test_base_holds_no_names_and_its_fragments_complete_the_product(
    engine: AsyncEngine,
) -> None:
    """The cache stores ``base``; every path serves base + category fragment + brand fragment,
    which protobuf parses as the whole product (embedded message fields merge)."""
    loaded = (await Repository(engine).get_products(["p0000001"]))["p0000001"]
    base = pb.Product.FromString(loaded.base)
    assert (base.category.id, base.category.name) == (loaded.category_id, "")
    assert (base.brand.id, base.brand.name) == (loaded.brand_id, "")
    whole = pb.Product.FromString(loaded.data)
    assert loaded.data.startswith(loaded.base)
    assert (whole.category.id, whole.category.name) == (loaded.category_id, loaded.category_name)
    assert (whole.brand.id, whole.brand.name) == (loaded.brand_id, loaded.brand_name)
    base.category.name, base.brand.name = loaded.category_name, loaded.brand_name
    assert whole == base


@pytest.mark.parametrize("name", ["", "Ünïcode ✓", "x" * 300])
def test_name_fragments_merge_into_any_product(name: str) -> None:
    product = pb.Product(id="p", category=pb.Category(id="c"), brand=pb.Brand(id="b"))
    data = product.SerializeToString() + category_fragment(name) + brand_fragment(name + "!")
    merged = pb.Product.FromString(data)
    assert (merged.category.id, merged.category.name) == ("c", name)
    assert (merged.brand.id, merged.brand.name) == ("b", name + "!")


async def test_names_of_categories_and_brands_are_one_statement(
    engine: AsyncEngine, database_url: str
) -> None:
    with psycopg.connect(libpq_url(database_url)) as conn:
        rows = conn.execute("SELECT id, name FROM categories ORDER BY id LIMIT 3").fetchall()
        categories: dict[str, str] = {r[0]: r[1] for r in rows}
        rows = conn.execute("SELECT id, name FROM brands ORDER BY id LIMIT 2").fetchall()
        brands: dict[str, str] = {r[0]: r[1] for r in rows}
    repo = Repository(engine)
    before = db_loads("get_names")
    with statements(engine) as seen:
        names = await repo.get_names([*categories, "no-such"], [*brands, "none"])
    assert (names.categories, names.brands) == (categories, brands)
    assert len(seen) == 1 and db_loads("get_names") == before + 1
    with statements(engine) as seen:
        assert await repo.get_names([], []) == Names({}, {})
    assert seen == []


async def test_images_are_ordered_by_position(world: World, repo: Repository) -> None:
    pid, _, _ = await world.product(positions=(3, 0, 7, 1))
    product = await _one(repo, pid)
    assert [image.position for image in product.images] == [0, 1, 3, 7]
    assert product.images[0].url == f"https://img.test/{pid}/0.jpg"
    assert product.images[2].alt_text == "alt 3"


async def test_product_without_images_has_none(world: World, repo: Repository) -> None:
    pid, _, _ = await world.product(positions=())
    assert list((await _one(repo, pid)).images) == []


async def test_money_is_integer_minor_units(world: World, repo: Repository) -> None:
    big = 9_007_199_254_740_993  # 2**53 + 1: not representable as a float
    pid, _, _ = await world.product(price=big, currency="EUR")
    product = await _one(repo, pid)
    assert product.base_price == pb.Money(currency_code="EUR", amount_minor=big)
    assert product.final_price == product.base_price


async def test_unknown_ids_are_absent(engine: AsyncEngine) -> None:
    found = await Repository(engine).get_products(["p0000002", "nope", "p9999999", "p0000002"])
    assert set(found) == {"p0000002"}


# --- price rules -------------------------------------------------------------------------------


async def test_no_rule_means_final_equals_base_and_no_applied_rule(
    world: World, repo: Repository
) -> None:
    pid, _, _ = await world.product(price=1234)
    product = await _one(repo, pid)
    assert product.final_price.amount_minor == 1234
    assert not product.HasField("applied_rule")


async def test_highest_priority_active_rule_wins(world: World, repo: Repository) -> None:
    pid, category_id, brand_id = await world.product(price=10_000)
    await world.rule("product", pid, value=1000, priority=1)
    best = await world.rule("category", category_id, value=2500, priority=9)
    await world.rule("brand", brand_id, value=5000, priority=5)
    product = await _one(repo, pid)
    assert product.applied_rule.id == best
    assert product.applied_rule.kind == PercentOff
    assert (product.applied_rule.value, product.applied_rule.priority) == (2500, 9)
    assert product.final_price.amount_minor == 7500


@pytest.mark.parametrize("scope", ["product", "category", "brand"])
async def test_rules_apply_at_each_scope(world: World, repo: Repository, scope: str) -> None:
    pid, category_id, brand_id = await world.product(price=999)
    target = {"product": pid, "category": category_id, "brand": brand_id}[scope]
    rule_id = await world.rule(scope, target, value=1500)
    product = await _one(repo, pid)
    assert product.applied_rule.id == rule_id
    assert product.final_price.amount_minor == 849  # 149.85 discount rounds half up


async def test_expired_and_future_rules_are_ignored(world: World, repo: Repository) -> None:
    pid, _, _ = await world.product(price=10_000)
    await world.rule("product", pid, value=9000, priority=99, valid_until=NOW - DAY)
    await world.rule("product", pid, value=8000, priority=98, valid_from=NOW + DAY)
    await world.rule(
        "product", pid, value=7000, priority=97, valid_from=NOW - 2 * DAY, valid_until=NOW - DAY
    )
    active = await world.rule(
        "product", pid, value=1000, priority=1, valid_from=NOW - DAY, valid_until=NOW + DAY
    )
    product = await _one(repo, pid)
    assert product.applied_rule.id == active
    assert product.final_price.amount_minor == 9000


async def test_equal_priority_breaks_ties_on_lowest_rule_id(world: World, repo: Repository) -> None:
    pid, category_id, _ = await world.product()
    stem = uuid.uuid4().hex[:8]
    await world.rule("product", pid, rule_id=f"{stem}-b", value=1000, priority=5)
    await world.rule("category", category_id, rule_id=f"{stem}-a", value=2000, priority=5)
    await world.rule("product", pid, rule_id=f"{stem}-c", value=3000, priority=5)
    assert (await _one(repo, pid)).applied_rule.id == f"{stem}-a"


async def test_amount_off_applies_only_to_products_in_its_currency(
    world: World, repo: Repository
) -> None:
    category_id = await world.named("categories")
    usd, _, _ = await world.product(price=1999, currency="USD", category_id=category_id)
    eur, _, _ = await world.product(price=1999, currency="EUR", category_id=category_id)
    fallback = await world.rule("category", category_id, value=1000, priority=1)
    amount = await world.rule(
        "category", category_id, kind="amount_off", value=500, currency="USD", priority=2
    )
    found = await repo.get_products([usd, eur])
    usd_product, eur_product = _product(found[usd]), _product(found[eur])
    assert usd_product.applied_rule.id == amount
    assert usd_product.applied_rule.kind == pb.PriceRule.KIND_AMOUNT_OFF
    assert usd_product.final_price.amount_minor == 1499
    assert eur_product.applied_rule.id == fallback  # the USD rule is not even a candidate
    assert eur_product.final_price == pb.Money(currency_code="EUR", amount_minor=1799)


async def test_amount_off_never_makes_a_price_negative(world: World, repo: Repository) -> None:
    pid, _, _ = await world.product(price=300)
    await world.rule("product", pid, kind="amount_off", value=5000, currency="USD")
    assert (await _one(repo, pid)).final_price.amount_minor == 0


# --- price boundaries --------------------------------------------------------------------------


async def test_price_changes_at_is_the_next_start_or_end_of_an_applicable_rule(
    world: World, repo: Repository
) -> None:
    pid, category_id, brand_id = await world.product(currency="USD")
    soon, later = NOW + timedelta(hours=1), NOW + timedelta(hours=2)
    await world.rule("product", pid, valid_from=NOW - DAY, valid_until=later)
    await world.rule("brand", brand_id, valid_from=soon, valid_until=NOW + DAY)
    # Earlier boundaries that cannot affect this product: another currency, another product.
    early = NOW + timedelta(minutes=5)
    await world.rule("category", category_id, kind="amount_off", currency="EUR", valid_until=early)
    await world.rule("product", "someone-else", valid_from=early)
    loaded = (await repo.get_products([pid]))[pid]
    assert loaded.price_changes_at == soon


async def test_price_changes_at_is_none_without_future_boundaries(
    world: World, repo: Repository
) -> None:
    pid, _, _ = await world.product()
    await world.rule("product", pid)  # open-ended
    await world.rule("product", pid, valid_from=NOW - 2 * DAY, valid_until=NOW - DAY)
    assert (await repo.get_products([pid]))[pid].price_changes_at is None


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, SEED_PRODUCTS])
async def test_get_products_is_one_statement_for_any_number_of_ids(
    engine: AsyncEngine, count: int
) -> None:
    repo, ids = Repository(engine), [f"p{i:07d}" for i in range(1, count + 1)]
    before = db_loads("get_products")
    with statements(engine) as seen:
        found = await repo.get_products(ids)
    assert len(found) == count
    assert len(seen) == 1
    assert db_loads("get_products") == before + 1


async def test_get_products_without_ids_sends_nothing(engine: AsyncEngine) -> None:
    with statements(engine) as seen:
        assert await Repository(engine).get_products([]) == {}
    assert seen == []


async def test_each_list_call_is_one_statement(engine: AsyncEngine) -> None:
    repo = Repository(engine)
    before = (db_loads("list_page"), db_loads("list_page_ids"))
    with statements(engine) as seen:
        await repo.list_page("c00001", None, "", 10)
        await repo.list_page_ids(None, "b00001", "", 10)
    assert len(seen) == 2
    assert (db_loads("list_page"), db_loads("list_page_ids")) == (before[0] + 1, before[1] + 1)


async def test_reads_leave_pooled_connections_transactional(database_url: str) -> None:
    settings = Settings.from_env({}, database_url=database_url, db_pool_size=1, db_max_overflow=0)
    engine = create_engine(settings)
    try:
        await Repository(engine).ping()
        async with engine.connect() as conn:  # the same pooled connection
            raw = await conn.get_raw_connection()
            assert raw.driver_connection is not None
            assert raw.driver_connection.autocommit is False
    finally:
        await engine.dispose()


async def test_statements_bind_values_instead_of_embedding_them(engine: AsyncEngine) -> None:
    marker = "p0000001' OR 'x'='x"
    with statements(engine) as seen:
        assert await Repository(engine).get_products([marker]) == {}
        await Repository(engine).list_page(marker, marker, marker, 1)
    assert all(marker not in statement for statement in seen)


# --- pages -------------------------------------------------------------------------------------


def _expected_ids(url: str, where: str, params: tuple[object, ...]) -> list[str]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute(f"SELECT id FROM products WHERE {where} ORDER BY id", params).fetchall()
    return [row[0] for row in rows]


async def test_list_page_walks_all_products_in_id_order(engine: AsyncEngine) -> None:
    repo, after, walked = Repository(engine), "", []
    while page := await repo.list_page(None, None, after, 64):
        walked += [product.id for product in page]
        after = page[-1].id
    assert walked == sorted(walked)
    assert len(walked) == len(set(walked)) == SEED_PRODUCTS


async def test_list_page_starts_strictly_after_the_cursor(engine: AsyncEngine) -> None:
    page = await Repository(engine).list_page(None, None, "p0000010", 3)
    assert [p.id for p in page] == ["p0000011", "p0000012", "p0000013"]


@pytest.mark.parametrize(
    ("category_id", "brand_id", "where", "params"),
    [
        ("c00002", None, "category_id = %s", ("c00002",)),
        (None, "b00003", "brand_id = %s", ("b00003",)),
        ("c00001", "b00001", "category_id = %s AND brand_id = %s", ("c00001", "b00001")),
    ],
)
async def test_list_page_filters_by_category_and_brand(
    engine: AsyncEngine,
    database_url: str,
    category_id: str | None,
    brand_id: str | None,
    where: str,
    params: tuple[object, ...],
) -> None:
    expected = _expected_ids(database_url, where, params)
    assert expected, "the seed should give every filter some products"
    repo = Repository(engine)
    page = await repo.list_page(category_id, brand_id, "", 1000)
    assert [p.id for p in page] == expected
    assert all((p.category_id == category_id or category_id is None) for p in page)
    assert all(_product(p).brand.id == (brand_id or p.brand_id) for p in page)
    after = expected[0]
    assert await repo.list_page_ids(category_id, brand_id, after, 2) == expected[1:3]


async def test_list_page_ids_matches_list_page(engine: AsyncEngine) -> None:
    repo = Repository(engine)
    page = await repo.list_page("c00003", None, "p0000050", 5)
    assert await repo.list_page_ids("c00003", None, "p0000050", 5) == [p.id for p in page]


async def test_list_page_for_an_unknown_filter_is_empty(engine: AsyncEngine) -> None:
    assert await Repository(engine).list_page("no-such-category", None, "", 10) == []


# --- errors ------------------------------------------------------------------------------------


async def test_ping_succeeds_against_a_live_database(engine: AsyncEngine) -> None:
    await Repository(engine).ping()


async def test_unreachable_database_is_a_connection_error() -> None:
    settings = Settings.from_env(
        {}, database_url="postgresql+psycopg://postgres@127.0.0.1:1/none", db_connect_timeout_s=1
    )
    engine = create_engine(settings)
    try:
        with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is what we classify
            await Repository(engine).get_products(["p0000001"])
    finally:
        await engine.dispose()
    assert is_connection_error(caught.value)


async def test_exhausted_pool_is_a_connection_error(database_url: str) -> None:
    settings = Settings.from_env(
        {}, database_url=database_url, db_pool_size=1, db_max_overflow=0, db_pool_timeout_s=0.05
    )
    engine = create_engine(settings)
    try:
        async with engine.connect():
            with pytest.raises(Exception) as caught:  # noqa: PT011
                await Repository(engine).ping()
    finally:
        await engine.dispose()
    assert is_connection_error(caught.value)


async def test_statement_timeout_is_a_connection_error(database_url: str) -> None:
    engine = create_engine(
        Settings.from_env({}, database_url=database_url, db_statement_timeout_ms=50)
    )
    try:
        with pytest.raises(Exception) as caught:  # noqa: PT011
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(1)"))
    finally:
        await engine.dispose()
    assert is_connection_error(caught.value)


async def test_sql_errors_are_not_connection_errors(engine: AsyncEngine) -> None:
    with pytest.raises(Exception) as caught:  # noqa: PT011
        async with engine.connect() as conn:
            await conn.execute(text("SELECT * FROM no_such_table"))
    assert not is_connection_error(caught.value)
    assert not is_connection_error(ValueError("bug"))


# --- seeding -----------------------------------------------------------------------------------


def _snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every seeded row except timestamps, which legitimately move between runs."""
    queries = {
        "categories": "SELECT id, name FROM categories ORDER BY id",
        "brands": "SELECT id, name FROM brands ORDER BY id",
        "products": "SELECT id, sku, name, description, category_id, brand_id, price_minor, "
        "currency, stock, version FROM products ORDER BY id",
        "images": "SELECT * FROM product_images ORDER BY product_id, position",
        "rules": "SELECT id, name, scope, target_id, kind, value, currency, priority, "
        "valid_from IS NULL, valid_until IS NULL FROM price_rules ORDER BY id",
    }
    with psycopg.connect(libpq_url(url)) as conn:
        return {name: conn.execute(sql).fetchall() for name, sql in queries.items()}


def test_seeding_is_deterministic_for_a_seed(fresh_database_url: str) -> None:
    first = _snapshot(fresh_database_url)
    assert seed_catalog(fresh_database_url, SEED_PRODUCTS, seed=42, reset=True) == SEED_PRODUCTS
    assert _snapshot(fresh_database_url) == first
    seed_catalog(fresh_database_url, SEED_PRODUCTS, seed=7, reset=True)
    assert _snapshot(fresh_database_url)["products"] != first["products"]


def test_seeding_a_non_empty_catalog_does_nothing(fresh_database_url: str) -> None:
    before = _snapshot(fresh_database_url)
    assert seed_catalog(fresh_database_url, 50, seed=1) == 0
    assert _snapshot(fresh_database_url) == before


def test_seeded_catalog_has_the_documented_shape(database_url: str) -> None:
    data = _snapshot(database_url)
    assert len(data["products"]) == SEED_PRODUCTS
    assert (len(data["categories"]), len(data["brands"])) == (5, 10)
    assert data["products"][0][:2] == ("p0000001", "SKU-0000001")
    per_product: dict[str, int] = {}
    for image in data["images"]:
        per_product[image[0]] = per_product.get(image[0], 0) + 1
    assert set(per_product.values()) <= {1, 2, 3, 4, 5}
    assert len(per_product) == SEED_PRODUCTS
    assert {row[7] for row in data["products"]} == {"USD", "EUR"}
    assert all(type(row[6]) is int and row[6] > 0 for row in data["products"])
    rules = data["rules"]
    assert {rule[2] for rule in rules} == {"product", "category", "brand"}
    assert {rule[4] for rule in rules} == {"percent_off", "amount_off"}
    assert len({rule[7] for rule in rules}) > 5


def test_seeded_rules_include_expired_active_future_and_open_ended(database_url: str) -> None:
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE valid_until <= now()), "
            "count(*) FILTER (WHERE valid_from > now()), "
            "count(*) FILTER (WHERE valid_from <= now() AND valid_until > now()), "
            "count(*) FILTER (WHERE valid_from IS NULL AND valid_until IS NULL) FROM price_rules"
        ).fetchone()
    assert row is not None
    assert all(count > 0 for count in row), row
