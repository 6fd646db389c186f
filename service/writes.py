"""UpdateProduct: an optimistic-concurrency update, then a write-through so the next read on any
replica is a hit with the new data.

Invariants:
* the row change, the version bump and the ``product.updated`` outbox row commit together or not
  at all: the row is written by the database's change capture (migration 0004), like that of any
  other writer; it carries the new version and, after a move, the previous category/brand;
* the write-through runs after the commit, under a fresh (forcing) lease, reads the committed row
  and is refused if a newer version is already cached; if it cannot be written, the key is
  deleted: a miss beats stale data. The event still voids list pages and other dependants, and
  keeps the written entry because it is already at the event's version;
* a committed update answers with a product, never an error inviting a retry: the product as
  the write transaction left it, when the write-through's own read fails.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.v1 import catalog_pb2 as pb
from core import tracing
from core.cache.breaker import CircuitBreaker
from core.cache.loader import REDIS_FAILURES, Loader
from core.cache.near import NearCache
from core.db import is_connection_error
from core.errors import Aborted, InvalidArgument, NotFound
from core.repository import Repository
from core.validation import check_id

log = logging.getLogger(__name__)
UPDATABLE = ("name", "description", "stock", "base_price", "category", "brand")
MAX_NAME, MAX_DESCRIPTION, MAX_STOCK = 200, 10_000, 2**31 - 1
_CURRENCY = re.compile(r"[A-Z]{3}")
# C0 and C1 control characters. PostgreSQL rejects NUL in text; the others would reach clients'
# screens and logs. A description may keep tabs and line breaks; a name may not.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

_products = sa.table(
    "products",
    *(sa.column(c) for c in ("id", "name", "description", "stock", "price_minor", "currency")),
    *(sa.column(c) for c in ("category_id", "brand_id", "version", "updated_at")),
)


@dataclass(frozen=True, slots=True)
class Change:
    """A validated update: column values to set, and the version the caller saw (0: any)."""

    product_id: str
    expected_version: int
    values: dict[str, Any]


def parse_update(request: pb.UpdateProductRequest) -> Change:
    """Validate an UpdateProductRequest (AIP-134) into column values; InvalidArgument if bad."""
    p = request.product
    product_id = check_id(p.id, "product.id")
    paths = list(request.update_mask.paths)
    if not paths:
        raise InvalidArgument("update_mask must name at least one field")
    unknown = sorted(set(paths) - set(UPDATABLE))
    if unknown:
        # Name a few, shortened: the details travel in a header of bounded size.
        named = ", ".join(repr(p[:30]) for p in unknown[:3]) + (", ..." if unknown[3:] else "")
        raise InvalidArgument(
            f"update_mask names unknown or read-only fields ({named}); "
            f"allowed: {', '.join(UPDATABLE)}"
        )
    values: dict[str, Any] = {}
    if "name" in paths:
        if not p.name.strip() or len(p.name) > MAX_NAME:
            raise InvalidArgument(f"product.name must be 1 to {MAX_NAME} characters")
        if _CONTROL.search(p.name):
            raise InvalidArgument("product.name must not contain control characters")
        values["name"] = p.name
    if "description" in paths:
        if len(p.description) > MAX_DESCRIPTION:
            raise InvalidArgument(f"product.description is longer than {MAX_DESCRIPTION}")
        if _CONTROL_IN_TEXT.search(p.description):
            raise InvalidArgument(
                "product.description must not contain control characters other than tab and "
                "line breaks"
            )
        values["description"] = p.description
    if "stock" in paths:
        if not 0 <= p.stock <= MAX_STOCK:
            raise InvalidArgument(f"product.stock must be between 0 and {MAX_STOCK}")
        values["stock"] = p.stock
    if "base_price" in paths:
        if _CURRENCY.fullmatch(p.base_price.currency_code) is None:
            raise InvalidArgument("product.base_price.currency_code must be an ISO 4217 code")
        if p.base_price.amount_minor < 0:
            raise InvalidArgument("product.base_price.amount_minor must not be negative")
        values["price_minor"] = p.base_price.amount_minor
        values["currency"] = p.base_price.currency_code
    if "category" in paths:
        values["category_id"] = check_id(p.category.id, "product.category.id")
    if "brand" in paths:
        values["brand_id"] = check_id(p.brand.id, "product.brand.id")
    if p.version < 0:
        raise InvalidArgument("product.version must not be negative")
    return Change(product_id, p.version, values)


class ProductWriter:
    def __init__(
        self,
        engine: AsyncEngine,
        repo: Repository,
        loader: Loader | None,
        breaker: CircuitBreaker,
        near: NearCache | None = None,
    ) -> None:
        self.engine = engine
        self.repo = repo
        self.loader = loader
        self.breaker = breaker
        self.near = near

    async def update(self, change: Change) -> bytes:
        """Apply ``change``; return the product as stored after the commit."""
        with tracing.span("catalog.update.commit", product_id=change.product_id):
            committed = await self._commit(change)
        try:
            return await self._write_through(change.product_id, committed)
        finally:
            if self.near is not None and self.loader is not None:
                # Read your writes in this process: the older entry (held, or offered by a read
                # that fetched it before the write-through) is dropped before the caller hears
                # back, not when the channel reports the write (other processes: within the
                # near cache's staleness bound).
                self.near.invalidate(self.loader.keys.product(change.product_id))

    async def _commit(self, change: Change) -> bytes:
        """Commit the change (its capture trigger queues the event in the same transaction); the
        product as the transaction wrote it."""
        t = _products.c
        try:
            async with self.engine.begin() as conn:
                old = (
                    await conn.execute(
                        sa.select(t.version).where(t.id == change.product_id).with_for_update()
                    )
                ).one_or_none()
                if old is None:
                    raise NotFound(f"product {change.product_id!r} not found")
                if change.expected_version and change.expected_version != old.version:
                    raise Aborted(
                        f"product {change.product_id!r} is at version {old.version}, not "
                        f"{change.expected_version}; read it again and retry"
                    )
                if traceparent := tracing.traceparent():  # "" unless tracing is on
                    # The capture trigger puts it in the outbox row: the trace reaches the
                    # invalidator through the relay.
                    await conn.execute(
                        sa.select(sa.func.set_config("catalog.traceparent", traceparent, True))
                    )
                # One row, version bumped: its trigger queues a versioned product.updated.
                await conn.execute(
                    sa.update(_products)
                    .where(t.id == change.product_id)
                    .values(**change.values, version=t.version + 1, updated_at=sa.func.now())
                )
                written = (await self.repo.get_products_on(conn, [change.product_id]))[
                    change.product_id
                ]
        except IntegrityError as exc:
            # The only constraint an update can break here is a category or brand reference.
            raise InvalidArgument("product.category.id or product.brand.id does not exist") from exc
        return written.data

    async def _write_through(self, product_id: str, committed: bytes) -> bytes:
        """Cache the committed product. The update is committed whatever happens here, so the
        caller always gets a product, never an error that invites a retry: the one read after
        the write-through (a later update's, if one landed meanwhile), else ``committed``."""
        loader = self.loader
        if loader is None or not self.breaker.allow():
            return committed
        try:
            written = await loader.write_through(product_id)
        except REDIS_FAILURES as exc:
            log.warning("write-through of %s failed (%s); deleting the key", product_id, exc)
            await loader.forget(product_id)
            return committed
        except Exception as exc:
            # The re-read failed (PostgreSQL went away right after the commit, or a bug): the
            # entry may be older than the commit, so drop it; the event voids it too.
            if is_connection_error(exc):
                log.warning("write-through of %s could not read the product back", product_id)
            else:
                log.error("write-through of %s failed", product_id, exc_info=exc)
            await loader.forget(product_id)
            return committed
        self.breaker.success()  # it may have been the half-open probe: report it
        return committed if written is None else written
