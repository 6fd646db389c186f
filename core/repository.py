"""Reads products from PostgreSQL and builds them into serialized ``catalog.v1.Product`` bytes.

Invariants:

- Every public read is exactly ONE SQL statement, whatever the number of ids, and increments
  ``DB_LOADS`` once with its op name. Reads run in autocommit mode, so no BEGIN/ROLLBACK round
  trips surround it (the pool's pre-ping, an empty query, is the only other traffic).
- The statement is the whole product: the product row joined with its category and brand, its
  images ordered by position, the best active price rule and the next price boundary. A rule
  applies when its scope matches the product, its category or its brand, ``now()`` lies in its
  window (NULL ends are open), and, for ``amount_off``, its currency is the product's. The best
  is the highest ``priority``, then the lowest ``id``.
- SQL is built with SQLAlchemy Core from constant structures, once, at import: values are always
  bound parameters. List statements exist per filter combination so each uses its own index
  ((category_id, id), (brand_id, id), (category_id, brand_id, id) or the primary key).
- Errors propagate unchanged; callers classify them with ``core.db.is_connection_error``.
- A product is built as its ``base`` (the ``Product`` whose ``category`` and ``brand`` carry only
  their ids, what the cache stores) followed by two name fragments (``category {name}``,
  ``brand {name}``): protobuf merges repeated occurrences of an embedded message field, so the
  concatenation parses as the whole product. Every path answers with this same layout, so a
  product served from the cache and one read here are byte-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    CompoundSelect,
    DateTime,
    Integer,
    Select,
    Text,
    and_,
    any_,
    bindparam,
    case,
    column,
    func,
    literal_column,
    or_,
    select,
    table,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from core import metrics
from core.pricing import final_price


def category_fragment(name: str) -> bytes:
    """``category {name: name}`` as it follows a product's base bytes (field 5)."""
    return pb.Product(category=pb.Category(name=name)).SerializeToString()


def brand_fragment(name: str) -> bytes:
    """``brand {name: name}`` (field 6)."""
    return pb.Product(brand=pb.Brand(name=name)).SerializeToString()


@dataclass(frozen=True, slots=True)
class LoadedProduct:
    """A product read: its serialized message without names (``base``), the names, and what the
    cache needs to key and expire it.

    ``price_changes_at`` is the earliest future start or end of any rule applicable to the product
    (None if there is none): its final price may change then, so no cache entry should outlive it.
    """

    id: str
    base: bytes
    category_id: str
    category_name: str
    brand_id: str
    brand_name: str
    price_changes_at: datetime | None
    version: int

    @property
    def data(self) -> bytes:
        """The whole serialized ``Product``: the base, then the name fragments."""
        return self.base + category_fragment(self.category_name) + brand_fragment(self.brand_name)


@dataclass(frozen=True, slots=True)
class Names:
    """Category and brand names by id (ids that do not exist are absent)."""

    categories: dict[str, str]
    brands: dict[str, str]


_Select = Select[*tuple[Any, ...]]
_Row = Row[*tuple[Any, ...]]
_Rows = Sequence[_Row]
_TIMESTAMP = DateTime(timezone=True)
_products = table(
    "products",
    *(column(n, Text) for n in ("id", "sku", "name", "description", "currency", "category_id")),
    column("brand_id", Text),
    column("price_minor", BigInteger),
    column("stock", Integer),
    column("version", BigInteger),
    column("updated_at", _TIMESTAMP),
)
_categories = table("categories", column("id", Text), column("name", Text))
_brands = table("brands", column("id", Text), column("name", Text))
_images = table(
    "product_images",
    column("product_id", Text),
    column("position", Integer),
    column("url", Text),
    column("alt_text", Text),
)
_rules = table(
    "price_rules",
    *(column(name, Text) for name in ("id", "name", "scope", "target_id", "kind", "currency")),
    column("value", BigInteger),
    column("priority", Integer),
    column("valid_from", _TIMESTAMP),
    column("valid_until", _TIMESTAMP),
)
# Inline constants rather than parameters, so the planner sees the values.
_PRODUCT, _CATEGORY, _BRAND = (
    literal_column(v, Text) for v in ("'product'", "'category'", "'brand'")
)
_PERCENT_OFF = literal_column("'percent_off'", Text)
_ONE = literal_column("1", Integer)
_KINDS = {"percent_off": pb.PriceRule.KIND_PERCENT_OFF, "amount_off": pb.PriceRule.KIND_AMOUNT_OFF}


def _applicable_rules() -> ColumnElement[bool]:
    """Rules whose scope and currency fit the product of the enclosing row (any window)."""
    p, r = _products.c, _rules.c
    return and_(
        or_(
            and_(r.scope == _PRODUCT, r.target_id == p.id),
            and_(r.scope == _CATEGORY, r.target_id == p.category_id),
            and_(r.scope == _BRAND, r.target_id == p.brand_id),
        ),
        or_(r.kind == _PERCENT_OFF, r.currency == p.currency),
    )


def _product_select() -> _Select:
    """Every column a product message needs, one row per product."""
    p, r, i, now = _products.c, _rules.c, _images.c, func.now()
    by_position = i.position
    images = (
        select(
            func.array_agg(aggregate_order_by(i.url, by_position)).label("image_urls"),
            func.array_agg(aggregate_order_by(i.alt_text, by_position)).label("image_alts"),
            func.array_agg(aggregate_order_by(i.position, by_position)).label("image_positions"),
        )
        .where(i.product_id == p.id)
        .lateral("i")
    )
    active = and_(
        or_(r.valid_from.is_(None), r.valid_from <= now),
        or_(r.valid_until.is_(None), r.valid_until > now),
    )
    rule = (
        select(
            r.id.label("rule_id"),
            r.name.label("rule_name"),
            r.kind.label("rule_kind"),
            r.value.label("rule_value"),
            r.currency.label("rule_currency"),
            r.priority.label("rule_priority"),
        )
        .where(_applicable_rules(), active)
        .order_by(r.priority.desc(), r.id)
        .limit(_ONE)
        .lateral("r")
    )
    future_start = case((r.valid_from > now, r.valid_from))
    future_end = case((r.valid_until > now, r.valid_until))
    boundary = (
        select(func.min(func.least(future_start, future_end)).label("price_changes_at"))
        .where(_applicable_rules())
        .lateral("b")
    )
    c, b = _categories.c, _brands.c
    joined = (
        _products.join(_categories, c.id == p.category_id)
        .join(_brands, b.id == p.brand_id)
        .join(images, true())
        .outerjoin(rule, true())
        .join(boundary, true())
    )
    return select(
        *(p.id, p.sku, p.name, p.description, p.price_minor, p.currency, p.stock, p.version),
        p.updated_at,
        p.category_id,
        c.name.label("category_name"),
        p.brand_id,
        b.name.label("brand_name"),
        images,
        rule,
        boundary,
    ).select_from(joined)


def _page_filter(stmt: _Select, by_category: bool, by_brand: bool) -> _Select:
    p = _products.c
    if by_category:
        stmt = stmt.where(p.category_id == bindparam("category_id", type_=Text))
    if by_brand:
        stmt = stmt.where(p.brand_id == bindparam("brand_id", type_=Text))
    after = bindparam("after_id", type_=Text)
    return stmt.where(p.id > after).order_by(p.id).limit(bindparam("limit", type_=Integer))


_FILTERS = [(by_category, by_brand) for by_category in (False, True) for by_brand in (False, True)]
_GET_PRODUCTS = _product_select().where(_products.c.id == any_(bindparam("ids", type_=ARRAY(Text))))
_LIST_PAGE = {f: _page_filter(_product_select(), *f) for f in _FILTERS}
_LIST_PAGE_IDS = {f: _page_filter(select(_products.c.id), *f) for f in _FILTERS}
_NAMES = (
    select(literal_column("'c'", Text).label("kind"), _categories.c.id, _categories.c.name)
    .where(_categories.c.id == any_(bindparam("categories", type_=ARRAY(Text))))
    .union_all(
        select(literal_column("'b'", Text).label("kind"), _brands.c.id, _brands.c.name).where(
            _brands.c.id == any_(bindparam("brands", type_=ARRAY(Text)))
        )
    )
)
_PING = select(_ONE)
_GET_LOADS = metrics.DB_LOADS.labels(op="get_products")
_PAGE_LOADS = metrics.DB_LOADS.labels(op="list_page")
_PAGE_ID_LOADS = metrics.DB_LOADS.labels(op="list_page_ids")
_NAME_LOADS = metrics.DB_LOADS.labels(op="get_names")


class Repository:
    """Product reads over one engine; safe for concurrent use by many tasks."""

    def __init__(self, engine: AsyncEngine) -> None:
        # Autocommit: a single SELECT needs no transaction block, and one saves two round trips.
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def get_products(self, ids: Sequence[str]) -> dict[str, LoadedProduct]:
        """The products among ``ids`` that exist, by id; unknown ids are simply absent."""
        if not ids:
            return {}
        rows = await self._fetch(_GET_PRODUCTS, {"ids": list(ids)})
        _GET_LOADS.inc()
        return {row.id: _build(row) for row in rows}

    async def get_products_on(
        self, conn: AsyncConnection, ids: Sequence[str]
    ) -> dict[str, LoadedProduct]:
        """:meth:`get_products` on ``conn``: inside a write transaction, it sees that write."""
        rows = (await conn.execute(_GET_PRODUCTS, {"ids": list(ids)})).all()
        return {row.id: _build(row) for row in rows}

    async def list_page(
        self, category_id: str | None, brand_id: str | None, after_id: str, limit: int
    ) -> list[LoadedProduct]:
        """Up to ``limit`` products with ``id > after_id`` ordered by id; None filters are off."""
        stmt = _LIST_PAGE[category_id is not None, brand_id is not None]
        rows = await self._fetch(stmt, _page_params(category_id, brand_id, after_id, limit))
        _PAGE_LOADS.inc()
        return [_build(row) for row in rows]

    async def list_page_ids(
        self, category_id: str | None, brand_id: str | None, after_id: str, limit: int
    ) -> list[str]:
        """The ids :meth:`list_page` would return, read from an index alone."""
        stmt = _LIST_PAGE_IDS[category_id is not None, brand_id is not None]
        rows = await self._fetch(stmt, _page_params(category_id, brand_id, after_id, limit))
        _PAGE_ID_LOADS.inc()
        return [row.id for row in rows]

    async def get_names(self, category_ids: Sequence[str], brand_ids: Sequence[str]) -> Names:
        """The names of these categories and brands, in one statement."""
        if not category_ids and not brand_ids:
            return Names({}, {})
        rows = await self._fetch(
            _NAMES, {"categories": list(category_ids), "brands": list(brand_ids)}
        )
        _NAME_LOADS.inc()
        names = Names({}, {})
        for row in rows:
            (names.categories if row.kind == "c" else names.brands)[row.id] = row.name
        return names

    async def ping(self) -> None:
        """Raise unless PostgreSQL answers a trivial query."""
        await self._fetch(_PING, {})

    async def _fetch(self, stmt: _Select | CompoundSelect[Any], params: dict[str, Any]) -> _Rows:
        async with self._engine.connect() as conn:
            result = await conn.execute(stmt, params)
            return result.all()


def _page_params(
    category_id: str | None, brand_id: str | None, after_id: str, limit: int
) -> dict[str, Any]:
    return {"category_id": category_id, "brand_id": brand_id, "after_id": after_id, "limit": limit}


def _build(row: _Row) -> LoadedProduct:
    base = row.price_minor
    product = pb.Product(
        id=row.id,
        sku=row.sku,
        name=row.name,
        description=row.description,
        category=pb.Category(id=row.category_id),
        brand=pb.Brand(id=row.brand_id),
        images=[
            pb.Image(url=url, alt_text=alt, position=position)
            for url, alt, position in zip(
                row.image_urls or (), row.image_alts or (), row.image_positions or (), strict=True
            )
        ],
        base_price=pb.Money(currency_code=row.currency, amount_minor=base),
        final_price=pb.Money(currency_code=row.currency, amount_minor=base),
        stock=row.stock,
        version=row.version,
    )
    product.update_time.FromDatetime(row.updated_at)
    if row.rule_id is not None:
        product.final_price.amount_minor = final_price(
            base, row.currency, row.rule_kind, row.rule_value, row.rule_currency
        )
        product.applied_rule.CopyFrom(
            pb.PriceRule(
                id=row.rule_id,
                name=row.rule_name,
                kind=_KINDS[row.rule_kind],
                value=row.rule_value,
                priority=row.rule_priority,
            )
        )
    return LoadedProduct(
        id=row.id,
        base=product.SerializeToString(),
        category_id=row.category_id,
        category_name=row.category_name,
        brand_id=row.brand_id,
        brand_name=row.brand_name,
        price_changes_at=row.price_changes_at,
        version=row.version,
    )
