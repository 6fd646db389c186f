"""Deterministic, realistic demo data, loaded with ``COPY``.

Invariants:

- Same ``seed`` and ``products`` give the same rows: ids, names, prices, stock, images and rules.
  Only timestamps move: rule windows are placed relative to the start of the current UTC day, so
  the mix of expired, active and future rules holds whenever the data is seeded.
- Shape: ``max(5, n // 200)`` categories, ``max(10, n // 50)`` brands, 1 to 5 images per product,
  prices in minor units, ~85% USD / 15% EUR, and price rules at product, category and brand scope
  (open-ended, active, expired and future; varied priorities; amount-off rules in both currencies).
- Seeding a non-empty catalog is a no-op unless ``reset`` (which truncates the catalog tables
  first). The load is one transaction under an advisory lock, so concurrent seeders never
  double-load and a failed load leaves nothing behind; a ``VACUUM (ANALYZE)`` follows it.
- The load writes no invalidation events (change capture is switched off for its transaction):
  nothing can be cached for rows that did not exist.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, LiteralString

import psycopg

from core.db import libpq_url

_SEED_LOCK_KEY = 0x636174616C6F68  # arbitrary, shared by every seeding process

Row = tuple[object, ...]


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_ADJECTIVES = _words(
    "Classic Compact Deluxe Eco Essential Everyday Heavy-Duty Lightweight Modern Portable "
    "Premium Pro Rugged Slim Smart Ultra Vintage Wireless Ergonomic Foldable"
)
_MATERIALS = _words(
    "Bamboo Carbon Ceramic Cotton Copper Glass Leather Linen Oak Steel Titanium Wool"
)
_NOUNS = _words(
    "Backpack Blender Chair Desk Headphones Kettle Lamp Mug Notebook Pan Pillow Speaker "
    "Sneakers Tent Toaster Umbrella Wallet Watch Jacket Keyboard Bottle Knife Router Drill"
)
_DEPARTMENTS = _words(
    "Kitchen Garden Office Outdoor Audio Fitness Travel Home Lighting Tools Apparel Gaming"
)
_BRAND_PARTS = _words("Acme Nordic Summit Blue Iron Bright Urban Pioneer Atlas Nova Terra Orbit")
_BRAND_SUFFIXES = ("Works", "Labs", "Co", "Goods", "Supply", "Gear", "Home", "Studio")
_BLURBS = (
    "Built to last.",
    "Designed for everyday use.",
    "Ships in recyclable packaging.",
    "Backed by a two-year warranty.",
    "Easy to clean.",
    "A customer favourite.",
    "Made from responsibly sourced materials.",
    "Fits in any space.",
)


def seed_catalog(url: str, products: int = 10_000, seed: int = 42, reset: bool = False) -> int:
    """Load a generated catalog into ``url`` (a migrated database); return the products written.

    Returns 0 and writes nothing when products exist and ``reset`` is False.
    """
    if products < 1:
        raise ValueError(f"products must be >= 1, got {products}")
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SEED_LOCK_KEY,))
        # A new catalog no cache has read: its rows need no invalidation events (migration
        # 0004). A reset's TRUNCATE is not captured either: use a fresh key namespace after it.
        conn.execute("SET LOCAL catalog.capture = 'off'")
        if reset:
            conn.execute(
                "TRUNCATE price_rules, product_images, product_stats, products, brands, categories"
            )
        elif conn.execute("SELECT EXISTS (SELECT 1 FROM products)").fetchone() == (True,):
            return 0
        _load(conn, _Catalog.generate(random.Random(seed), products))
    # Statistics for the planner, and a visibility map so id-only pages are index-only scans.
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) price_rules, product_images, products, brands, categories")
    return products


def _load(conn: psycopg.Connection[Any], catalog: _Catalog) -> None:
    _copy(conn, "COPY categories (id, name) FROM STDIN", catalog.categories)
    _copy(conn, "COPY brands (id, name) FROM STDIN", catalog.brands)
    _copy(
        conn,
        "COPY products (id, sku, name, description, category_id, brand_id, price_minor, "
        "currency, stock) FROM STDIN",
        catalog.products,
    )
    _copy(
        conn, "COPY product_images (product_id, position, url, alt_text) FROM STDIN", catalog.images
    )
    _copy(
        conn,
        "COPY price_rules (id, name, scope, target_id, kind, value, currency, priority, "
        "valid_from, valid_until) FROM STDIN",
        catalog.rules,
    )


def _copy(conn: psycopg.Connection[Any], statement: LiteralString, rows: Iterable[Row]) -> None:
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


@dataclass(slots=True)
class _Catalog:
    """Every row to load. ``generate`` draws all values from one ``random.Random`` in a fixed
    order, which is what makes a seed reproducible."""

    categories: list[Row] = field(default_factory=list)
    brands: list[Row] = field(default_factory=list)
    products: list[Row] = field(default_factory=list)
    images: list[Row] = field(default_factory=list)
    rules: list[Row] = field(default_factory=list)

    @classmethod
    def generate(cls, rng: random.Random, n: int) -> _Catalog:
        catalog = cls()
        for i in range(1, max(5, n // 200) + 1):
            name = f"{rng.choice(_DEPARTMENTS)} {rng.choice(_NOUNS)} Range {i}"
            catalog.categories.append((f"c{i:05d}", name))
        for i in range(1, max(10, n // 50) + 1):
            name = f"{rng.choice(_BRAND_PARTS)} {rng.choice(_BRAND_SUFFIXES)} {i}"
            catalog.brands.append((f"b{i:05d}", name))
        for i in range(1, n + 1):
            catalog._add_product(rng, i)
        catalog._add_rules(rng)
        return catalog

    def _add_product(self, rng: random.Random, i: int) -> None:
        pid = f"p{i:07d}"
        name = f"{rng.choice(_ADJECTIVES)} {rng.choice(_MATERIALS)} {rng.choice(_NOUNS)}"
        description = " ".join(rng.sample(_BLURBS, 2))
        price = rng.randint(1, 500) * 100 - rng.choice((1, 1, 5, 50))
        currency = "EUR" if rng.random() < 0.15 else "USD"
        stock = 0 if rng.random() < 0.08 else rng.randint(1, 500)
        category, brand = rng.choice(self.categories)[0], rng.choice(self.brands)[0]
        self.products.append(
            (pid, f"SKU-{i:07d}", name, description, category, brand, price, currency, stock)
        )
        for pos in range(rng.randint(1, 5)):
            url = f"https://images.example.com/products/{pid}/{pos}.jpg"
            self.images.append((pid, pos, url, f"{name}, view {pos + 1}"))

    def _add_rules(self, rng: random.Random) -> None:
        """Rules for every 3rd category, every 5th brand and ~3% of products."""
        targets = [("category", str(row[0])) for row in self.categories[::3]]
        targets += [("brand", str(row[0])) for row in self.brands[::5]]
        targets += [("product", str(row[0])) for row in self.products if rng.random() < 0.03]
        for scope, target in targets:
            number = len(self.rules) + 1
            # Window shapes take turns, so even a small catalog has every kind of rule.
            shape = _WINDOWS[number % len(_WINDOWS)]
            self.rules.append((f"r{number:06d}", *_rule(rng, scope, target, shape)))


def _rule(rng: random.Random, scope: str, target: str, window: str) -> Row:
    """(name, scope, target, kind, value, currency, priority, valid_from, valid_until)."""
    if rng.random() < 0.7:
        kind, currency = "percent_off", None
        value = rng.choice((500, 1000, 1250, 1500, 2000, 2500, 3333, 5000))
        label = f"{value / 100:g}% off"
    else:
        kind, currency = "amount_off", rng.choice(("USD", "USD", "EUR"))
        value = rng.choice((100, 250, 500, 1000, 2500))
        label = f"{value} {currency} minor units off"
    priority = rng.randint(0, 100)
    name = f"{label}, {scope} {target}"
    return (name, scope, target, kind, value, currency, priority, *_window(rng, window))


_WINDOWS = ("open", "active", "expired", "future", "started", "ending")


def _window(rng: random.Random, shape: str) -> tuple[datetime | None, datetime | None]:
    """A validity window of ``shape`` around today (UTC). Active windows last past the end of
    today and future ones start after it, so they hold whatever the time of day."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    past = today - timedelta(hours=rng.randint(1, 30 * 24))
    future = today + timedelta(hours=rng.randint(24, 30 * 24))
    span = timedelta(hours=rng.randint(1, 30 * 24))
    return {
        "open": (None, None),
        "active": (past, future),
        "expired": (past - span, past),
        "future": (future, future + span),
        "started": (past, None),
        "ending": (None, future),
    }[shape]
