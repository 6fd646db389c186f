"""Initial catalog schema: categories, brands, products, product_images, price_rules.

Invariants the database itself enforces: money is ``bigint`` minor units and never negative;
currencies are three upper-case letters; product ids match ``[A-Za-z0-9_-]{1,64}`` (what the API
accepts); a ``percent_off`` rule is at most 10000 basis points and has no currency, an
``amount_off`` rule has one; a validity window, when both ends are set, is non-empty.

Revision ID: 0001
Revises:
Create Date: 2024-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_NOW = sa.text("now()")
_CURRENCY_FORMAT = "~ '^[A-Z]{3}$'"


def _named_table(name: str) -> None:
    """categories and brands: an id, a display name (embedded in cached products)."""
    op.create_table(
        name,
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    )


def upgrade() -> None:
    _named_table("categories")
    _named_table("brands")
    op.create_table(
        "products",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("sku", sa.Text, nullable=False, unique=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("category_id", sa.Text, sa.ForeignKey("categories.id"), nullable=False),
        sa.Column("brand_id", sa.Text, sa.ForeignKey("brands.id"), nullable=False),
        sa.Column("price_minor", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.CHAR(3), nullable=False),
        sa.Column("stock", sa.Integer, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False, server_default="1"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
        sa.CheckConstraint("id ~ '^[A-Za-z0-9_-]{1,64}$'", name="products_id_format"),
        sa.CheckConstraint("price_minor >= 0", name="products_price_non_negative"),
        sa.CheckConstraint(f"currency {_CURRENCY_FORMAT}", name="products_currency_format"),
        sa.CheckConstraint("stock >= 0", name="products_stock_non_negative"),
        sa.CheckConstraint("version >= 1", name="products_version_positive"),
    )
    # Keyset pages ordered by id within each filter; they also cover the foreign keys.
    op.create_index("products_category_id_idx", "products", ["category_id", "id"])
    op.create_index("products_brand_id_idx", "products", ["brand_id", "id"])
    op.create_index("products_category_brand_id_idx", "products", ["category_id", "brand_id", "id"])
    op.create_table(
        "product_images",
        sa.Column(
            "product_id",
            sa.Text,
            sa.ForeignKey("products.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("alt_text", sa.Text, nullable=False, server_default=""),
        sa.CheckConstraint("position >= 0", name="product_images_position_non_negative"),
    )
    op.create_table(
        "price_rules",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("target_id", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("value", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.CHAR(3), nullable=True),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("scope IN ('product', 'category', 'brand')", name="price_rules_scope"),
        sa.CheckConstraint("kind IN ('percent_off', 'amount_off')", name="price_rules_kind"),
        sa.CheckConstraint("value >= 0", name="price_rules_value_non_negative"),
        sa.CheckConstraint(
            "kind <> 'percent_off' OR value <= 10000", name="price_rules_percent_at_most_100"
        ),
        sa.CheckConstraint(
            "(kind = 'amount_off') = (currency IS NOT NULL)", name="price_rules_currency_iff_amount"
        ),
        sa.CheckConstraint(f"currency {_CURRENCY_FORMAT}", name="price_rules_currency_format"),
        sa.CheckConstraint("valid_from < valid_until", name="price_rules_window_non_empty"),
    )
    # The rule lookup of a product probes (scope, target) three times: product, category, brand.
    op.create_index("price_rules_scope_target_idx", "price_rules", ["scope", "target_id"])


def downgrade() -> None:
    for table in ("price_rules", "product_images", "products", "brands", "categories"):
        op.drop_table(table)
