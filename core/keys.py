"""Every Redis key, channel, stream and group name the catalog uses; nothing else formats keys.

Layout (``ns`` is ``CATALOG_KEY_NAMESPACE``, ``SCHEMA`` the cached-format version, ``F`` a list
filter ``(category, brand)`` with "" for any, ``H`` a 64-bit blake2b of its parts, in hex):

=========================================  ==============================================
Bumping ``SCHEMA`` on a deploy that changes a cached format makes new code ignore old bytes.
Braces are Redis Cluster hash tags, and every atomic step touches one slot: a product and its
lease share the product's tag; every page of a filter, their leases, the filter's page set and
(for ``(c, *)`` and ``(*, b)``) its registry share the filter's tag ``{f<H(F)>}``.
View counters are data, not a cached format: they are unversioned, and share the hash tag
``{views}`` so a flush's RENAME stays within one slot.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SCHEMA = "v3"
LEASE_SUFFIX = ":lease"
# Stored in a product key for an id that does not exist. Real entries start with a header, so
# they can never be empty.
NEGATIVE = b""
# Prefixes of a rename message on the names channel, and of the name table's keys.
CATEGORY_NAME = "c:"
BRAND_NAME = "b:"


@dataclass(frozen=True, slots=True)
class Tag:
    """A dependency an event voids (docs/events.md): a product, a list filter, or a name."""

    name: str

    @staticmethod
    def product(product_id: str) -> Tag:
        return Tag(f"product:{product_id}")

    @staticmethod
    def category(category_id: str) -> Tag:
        """The category's name, served with every product of the category (a rename)."""
        return Tag(f"category:{category_id}")

    @staticmethod
    def brand(brand_id: str) -> Tag:
        """The brand's name (a rename)."""
        return Tag(f"brand:{brand_id}")

    @staticmethod
    def list_category(category_id: str) -> Tag:
        """List pages filtered by this category (with or without a brand)."""
        return Tag(f"list:category:{category_id}")

    @staticmethod
    def list_brand(brand_id: str) -> Tag:
        """List pages filtered by this brand (with or without a category)."""
        return Tag(f"list:brand:{brand_id}")

    @staticmethod
    def list_all() -> Tag:
        """Unfiltered list pages."""
        return Tag("list:all")

    @property
    def product_id(self) -> str:
        """The id of a ``product:<id>`` tag ("" for other tags): its entry's key is derivable."""
        return self.name[8:] if self.name.startswith("product:") else ""

    @property
    def renamed(self) -> str:
        """For a category or brand tag, its message on the names channel (``c:<id>`` or
        ``b:<id>``); "" for other tags."""
        if self.name.startswith("category:"):
            return CATEGORY_NAME + self.name[9:]
        if self.name.startswith("brand:"):
            return BRAND_NAME + self.name[6:]
        return ""

    @property
    def list_filter(self) -> tuple[str, str] | None:
        """For a list tag, its filter ``(category, brand)`` with "" meaning "any" (the
        ``(c, *)`` or ``(*, b)`` filter; combined filters are found in the registries)."""
        if self.name.startswith("list:category:"):
            return self.name[14:], ""
        if self.name.startswith("list:brand:"):
            return "", self.name[11:]
        if self.name == "list:all":
            return "", ""
        return None


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob (a namespace may contain ``*?[]\\``)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _h(*parts: str, size: int = 8) -> str:
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=size).hexdigest()


def hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes when it has a hash tag (``a{b}c`` -> ``b``)."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else None


def slot_mate(key: str, suffix: str) -> str:
    """A key named ``key + suffix`` in ``key``'s hash slot: as is when ``key`` has a hash tag,
    else tagged with ``key`` itself (``ns:events`` -> ``ns:events:dead:{ns:events}``)."""
    if hash_tag(key) is not None:
        return key + suffix
    if "{" in key or "}" in key:
        raise ValueError(f"{key!r} has braces but no hash tag: no other key can share its slot")
    return key + suffix + ":{" + key + "}"


class Keys:
    """Key builder bound to one namespace. Build once in ``app.py`` and pass it down."""

    __slots__ = ("_dead_letter", "_prefix", "_product", "_views", "group", "stream")

    def __init__(
        self,
        namespace: str = "catalog",
        *,
        stream: str = "",
        group: str = "",
        dead_letter_stream: str = "",
    ) -> None:
        """Empty stream, group or dead-letter names take their defaults (``<ns>:events``,
        ``invalidator``, ``<stream>:dead``); the invalidator's settings may override them."""
        self._prefix = f"{namespace}:{SCHEMA}:"
        self._product = f"{namespace}:{SCHEMA}:p:"
        self._views = f"{namespace}:{{views}}:"
        self.stream = stream or f"{namespace}:events"
        self.group = group or "invalidator"
        self._dead_letter = dead_letter_stream

    def product(self, product_id: str) -> str:
        return self._product + "{" + product_id + "}"

    def product_id(self, key: str) -> str | None:
        """The id of a product entry key; None for any other key (leases included)."""
        if key.startswith(self._product + "{") and key.endswith("}"):
            return key[len(self._product) + 1 : -1]
        return None

    @property
    def product_prefix(self) -> str:
        """What every product entry key (and its lease) starts with: the near cache's tracked
        prefix (core/cache/tracking.py)."""
        return self._product

    def heartbeat_prefix(self, process: str) -> str:
        """Prefix of one process's near-cache heartbeat keys (short-lived, written only to be
        seen changing through the invalidation channel). Never a prefix of a product key."""
        return self._prefix + "nc:" + process + ":"

    @property
    def product_pattern(self) -> str:
        """SCAN MATCH pattern of product entries (their leases match too: filter them out)."""
        return _glob_escape(self._product) + "{*}*"

    @property
    def page_pattern(self) -> str:
        """SCAN MATCH pattern of list pages (their leases match too: filter them out)."""
        return _glob_escape(self._prefix) + "l:{f*}:*"

    @staticmethod
    def filter_tag(category_id: str, brand_id: str) -> str:
        """The hash tag every key of one list filter shares ("" = any)."""
        return "{f" + _h(category_id, brand_id) + "}"

    def page(self, category_id: str, brand_id: str, after_id: str, page_size: int) -> str:
        """One list page: filter (the hash tag), position and size. Hashed so any id
        characters are safe."""
        where = _h(after_id, str(page_size), size=12)
        return self._prefix + "l:" + self.filter_tag(category_id, brand_id) + ":" + where

    def pages(self, category_id: str, brand_id: str) -> str:
        """The set of a filter's page keys that are cached or being filled."""
        return self._prefix + "f:" + self.filter_tag(category_id, brand_id) + ":pages"

    def category_registry(self, category_id: str) -> str:
        """Brands ``b`` for which the filter ``(category_id, b)`` was ever leased; in the slot
        of the filter ``(category_id, *)``."""
        return self._prefix + "f:" + self.filter_tag(category_id, "") + ":brands"

    def brand_registry(self, brand_id: str) -> str:
        """Categories ``c`` for which the filter ``(c, brand_id)`` was ever leased."""
        return self._prefix + "f:" + self.filter_tag("", brand_id) + ":categories"

    @property
    def names_channel(self) -> str:
        """Pub/sub channel of applied renames (``c:<id>``, ``b:<id>``)."""
        return self._prefix + "names"

    @staticmethod
    def lease(value_key: str) -> str:
        return value_key + LEASE_SUFFIX

    @property
    def dead_letter_stream(self) -> str:
        """Entries the invalidator could not apply, with the reason (``catalog dlq``)."""
        return self._dead_letter or self.stream + ":dead"

    @property
    def views_pending(self) -> str:
        """The live hash of view counts (``RecordProductViews`` increments it)."""
        return self._views + "pending"

    def views_flush(self, flush_id: str) -> str:
        """The hash one flush swapped out of ``views_pending`` (RENAME), until it is written."""
        return self._views + "flush:" + flush_id

    @property
    def views_flushes(self) -> str:
        """Set of the flush ids whose hash is not yet written and released."""
        return self._views + "flushes"

    def fence(self, tag: str) -> str:
        """A throw-away key written right before ``WAIT`` (:class:`core.redisclient.ReplicaWait`)
        in the hash slot of ``tag``: a replica that has it has every earlier write of its node."""
        return self._views.removesuffix("{views}:") + "fence:{" + tag + "}"
