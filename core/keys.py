"""Every Redis key, tag, stream and group name the catalog uses; nothing else formats keys.

Layout (``ns`` is ``CATALOG_KEY_NAMESPACE``, ``SCHEMA`` the cached-format version):

====================================  ==========================================================
``<ns>:<SCHEMA>:p:{<id>}``            serialized ``Product`` bytes, or ``NEGATIVE`` (no such id)
``<ns>:<SCHEMA>:p:{<id>}:lease``      fill lease of that product entry (same hash slot)
``<ns>:<SCHEMA>:l:{<page>}``          a list page: its ordered product ids and next token
``<ns>:<SCHEMA>:l:{<page>}:lease``    fill lease of that page
``<ns>:<SCHEMA>:t:<tag>``             tag set: the value keys that depend on ``<tag>``
``<ns>:<SCHEMA>:gen``                 generation of embedded names (bumped by renames)
``<ns>:events``                       the event stream (unversioned: publishers depend on it)
``<ns>:events:dead``                  dead letters of the event stream (reason + original fields);
                                      on a cluster ``<ns>:events:dead:{<ns>:events}`` (its slot)
``<ns>:{views}:pending``              hash: product id -> views not yet claimed by a flush
``<ns>:{views}:flush:<flush id>``     a pending hash swapped out by a flush, until written
``<ns>:{views}:flushes``              set of flush ids claimed and not yet released
``<ns>:fence:{<tag>}``                written right before a WAIT for replicas, in ``<tag>``'s slot
====================================  ==========================================================

Bumping ``SCHEMA`` on a deploy that changes a cached format makes new code ignore old bytes.
A value and its lease share a hash tag, so Redis Cluster keeps them in one slot.
View counters are data, not a cached format: they are unversioned, and share the hash tag
``{views}`` so a flush's RENAME stays within one slot.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SCHEMA = "v2"
LEASE_SUFFIX = ":lease"
# Stored in a product key for an id that does not exist. Real entries are serialized Products,
# which always start with field 1 (the id), so they can never be empty.
NEGATIVE = b""


@dataclass(frozen=True, slots=True)
class Tag:
    """A dependency name whose invalidation deletes every value key registered under it."""

    name: str

    @staticmethod
    def product(product_id: str) -> Tag:
        return Tag(f"product:{product_id}")

    @staticmethod
    def category(category_id: str) -> Tag:
        """Product entries embedding this category's name."""
        return Tag(f"category:{category_id}")

    @staticmethod
    def brand(brand_id: str) -> Tag:
        """Product entries embedding this brand's name."""
        return Tag(f"brand:{brand_id}")

    @staticmethod
    def list_category(category_id: str) -> Tag:
        return Tag(f"list:category:{category_id}")

    @staticmethod
    def list_brand(brand_id: str) -> Tag:
        return Tag(f"list:brand:{brand_id}")

    @staticmethod
    def list_all() -> Tag:
        return Tag("list:all")

    @property
    def product_id(self) -> str:
        """The id of a ``product:<id>`` tag ("" for other tags): its one member is derivable."""
        return self.name[8:] if self.name.startswith("product:") else ""

    @property
    def embeds_name(self) -> bool:
        """True for tags whose invalidation must also bump the generation (DESIGN 5.2)."""
        return self.name.startswith(("category:", "brand:"))


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob (a namespace may contain ``*?[]\\``)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


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

    __slots__ = ("_dead_letter", "_events", "_prefix", "_product", "_views", "group", "stream")

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
    def product_pattern(self) -> str:
        """SCAN MATCH pattern of product entries (their leases match too: filter them out)."""
        return _glob_escape(self._product) + "{*}*"

    @property
    def page_pattern(self) -> str:
        """SCAN MATCH pattern of list pages (their leases match too: filter them out)."""
        return _glob_escape(self._prefix) + "l:{*}*"

    @property
    def product_key_parts(self) -> tuple[str, str]:
        """(before id, after id): lets a Lua script build product keys from ids it reads."""
        return self._product + "{", "}"

    def page(self, category_id: str, brand_id: str, after_id: str, page_size: int) -> str:
        """One list page: filter, position and size. Hashed so any id characters are safe."""
        raw = f"{category_id}\x00{brand_id}\x00{after_id}\x00{page_size}".encode()
        return self._prefix + "l:{" + hashlib.blake2b(raw, digest_size=12).hexdigest() + "}"

    @staticmethod
    def lease(value_key: str) -> str:
        return value_key + LEASE_SUFFIX

    def tag(self, tag: Tag) -> str:
        return self._prefix + "t:" + tag.name

    @property
    def generation(self) -> str:
        return self._prefix + "gen"

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
