"""The products of a category or brand, looked up in PostgreSQL for the consumer.

A ``price_rule.changed`` written by the capture triggers names the products it covers. One from
an outside publisher may name only a category or brand (docs/events.md); the cache has no
per-category or per-brand set of product entries to void (the Redis Cluster format cannot keep
one), so the consumer asks the database which products the scope covers and voids them by id.

Invariants: one query per scope (``products`` is indexed by ``(category_id, id)`` and
``(brand_id, id)``), its rows read from a server-side cursor ``batch`` at a time, so memory is
bounded whatever the size of the category; the query runs after the rule's commit (the event is
published after it), so it sees every product the rule applies to.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Final, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from core.events import BRAND, CATEGORY, Scope

_QUERIES: Final = {
    CATEGORY: sa.text("SELECT id FROM products WHERE category_id = :id"),
    BRAND: sa.text("SELECT id FROM products WHERE brand_id = :id"),
}


class ScopeResolver(Protocol):
    def product_ids(self, scope: Scope, batch: int) -> AsyncGenerator[list[str], None]:
        """The ids of the products in ``scope``, at most ``batch`` at a time (none if empty)."""
        ...


class DatabaseScopes:
    """:class:`ScopeResolver` on the invalidator's PostgreSQL engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def product_ids(self, scope: Scope, batch: int) -> AsyncGenerator[list[str], None]:
        async with self.engine.connect() as conn:
            result = await conn.stream(_QUERIES[scope.kind], {"id": scope.id})
            async for rows in result.partitions(batch):
                yield [str(row[0]) for row in rows]
