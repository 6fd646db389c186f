"""The Zipf read/update workload's building blocks, shared by the benchmark suite and the fault
tests (never production): which products are drawn, and how a writer elsewhere changes one.

* :func:`zipf_draws`: ids drawn Zipf(s) by rank, the ranks scattered over the id space by a
  seeded shuffle, so the hot set is not one id range (nor one list page).
* :func:`update_plain`: the change a writer outside the service makes: stock and version bumped
  by one plain SQL statement, nothing else. The database's change capture queues its
  ``product.updated`` event in the same transaction; the invalidator's relay publishes it.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

UPDATE = sa.text(
    "UPDATE products SET stock = stock + 1, version = version + 1, updated_at = now() "
    "WHERE id = :id RETURNING version"
)


def zipf_draws(ids: Sequence[str], n: int, s: float = 1.1, seed: int = 7) -> list[str]:
    """``n`` ids drawn Zipf(``s``) over ``ids``; the same arguments give the same draws."""
    rng = random.Random(seed)
    ranked = list(ids)
    rng.shuffle(ranked)
    cumulative = list(itertools.accumulate(1 / (k**s) for k in range(1, len(ranked) + 1)))
    total = cumulative[-1]
    return [ranked[bisect.bisect_left(cumulative, rng.random() * total)] for _ in range(n)]


async def update_plain(engine: AsyncEngine, product_id: str) -> int:
    """Bump ``product_id``'s stock with one plain UPDATE; the new version."""
    async with engine.begin() as conn:
        version = (await conn.execute(UPDATE, {"id": product_id})).scalar_one()
    return int(version)
