"""The format of a cached value: a fixed-width ASCII header, then the payload.

``E<version:20><fresh_until_ms:15><load_ms:10><payload>``

* ``version``: the product's version (0 for pages): fills and write-throughs never replace a
  newer version, and a versioned invalidation keeps an entry already at or past its version.
  Lua reads it with ``tonumber(string.sub(v, 2, 21))``.
* ``fresh_until_ms``: the logical expiry (stale-while-revalidate); the physical TTL is longer.
* ``load_ms``: how long the database load took (the delta of probabilistic early refresh).

A product's payload is ``<category id>\n<brand id>\n`` then the serialized ``Product`` whose
``category`` and ``brand`` carry their ids only: names are appended when it is served
(:mod:`core.cache.names`). A list page's payload is :class:`PageBody`. The empty string is a
negative entry (no such product). Decimal text keeps the scripts simple and an entry readable in
``redis-cli``; the 46 bytes cost nothing next to a product.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

HEADER_LEN = 46
_VERSION = slice(1, 21)
_FRESH = slice(21, 36)
_LOAD = slice(36, 46)
#: XFetch draws only within ``delta * beta * XFETCH_HORIZON`` of expiry (see should_refresh).
XFETCH_HORIZON = 30.0


class Header(NamedTuple):
    version: int
    fresh_until_ms: int
    load_ms: int


def pack(payload: bytes, version: int, fresh_until_ms: int, load_ms: int) -> bytes:
    return b"E%020d%015d%010d" % (version, fresh_until_ms, min(load_ms, 9_999_999_999)) + payload


def pack_product(
    base: bytes, category_id: str, brand_id: str, version: int, fresh_until_ms: int, load_ms: int
) -> bytes:
    """A product entry: ``base`` is the ``Product`` without names (see module docstring)."""
    ids = category_id.encode() + b"\n" + brand_id.encode() + b"\n"
    return pack(ids + base, version, fresh_until_ms, load_ms)


def storable_ids(category_id: str, brand_id: str) -> bool:
    """Can a product of this category and brand be cached? Ids end at a newline, so ids holding
    one (possible only through a direct SQL write) are served uncached instead."""
    return "\n" not in category_id and "\n" not in brand_id


def product_parts(raw: bytes) -> tuple[bytes, bytes, int]:
    """(category id, brand id, offset of the ``Product`` bytes) of a product entry, header
    included. Two searches and two small slices: no decode."""
    i = raw.index(b"\n", HEADER_LEN)
    j = raw.index(b"\n", i + 1)
    return raw[HEADER_LEN:i], raw[i + 1 : j], j + 1


def header(raw: bytes) -> Header:
    return Header(int(raw[_VERSION]), int(raw[_FRESH]), int(raw[_LOAD]))


def payload(raw: bytes) -> bytes:
    return raw[HEADER_LEN:]


def due(raw: bytes, now_ms: float, beta: float, rand: random.Random) -> bool:
    """Should this cached entry (header included) be refreshed now? See :func:`should_refresh`."""
    return should_refresh(now_ms, int(raw[_FRESH]), int(raw[_LOAD]), beta, rand)


def should_refresh(
    now_ms: float, fresh_until: int, load_ms: int, beta: float, rand: random.Random
) -> bool:
    """Stale (past its logical expiry), or chosen for early refresh by XFetch.

    XFetch (Vattani et al., VLDB 2015): refresh when ``now - delta * beta * ln(U) >= expiry``
    with U uniform in (0, 1]. The probability rises as expiry nears and with the cost of a load
    (delta), so a hot, expensive key is usually refreshed once, shortly before it expires.
    ``beta`` 0 disables early refresh (only stale entries refresh).

    Most reads are far from expiry: while ``expiry - now > delta * beta * XFETCH_HORIZON`` the
    draw is skipped (it could pick the entry only if ``-ln(U)`` exceeded the horizon, which has
    probability ``exp(-30)``, about 1e-13), so a typical hit costs two comparisons, not a random
    number and a logarithm.
    """
    if now_ms >= fresh_until:
        return True
    if beta <= 0.0:
        return False
    delta_beta = load_ms * beta
    if fresh_until - now_ms > delta_beta * XFETCH_HORIZON:
        return False
    return now_ms - delta_beta * math.log(1.0 - rand.random()) >= fresh_until


class PageBody(NamedTuple):
    """A list page's payload: its ids and next position, and the request that produced it (so
    ``catalog verify`` can recompute it exactly; the key itself is a hash)."""

    next_after_id: str
    ids: list[str]
    category_id: str
    brand_id: str
    after_id: str
    size: int


def pack_page(body: PageBody) -> bytes:
    """``next \\n id,id,... \\n category \\n brand \\n after \\n size``: product ids never contain
    a newline or a comma (validated), and a hit reads the ids between the first two newlines."""
    fields = (body.next_after_id, ",".join(body.ids), body.category_id, body.brand_id)
    return "\n".join((*fields, body.after_id, str(body.size))).encode()


def unpack_page(page_payload: bytes) -> PageBody:
    next_after, id_list, category, brand, after, size = page_payload.decode().split("\n")
    return PageBody(
        next_after, id_list.split(",") if id_list else [], category, brand, after, int(size)
    )
