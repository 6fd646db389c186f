"""The event contract (docs/events.md): parsing stream entries and mapping events to cache tags.

Pure functions, no I/O. Invariants:

* :func:`parse` accepts exactly what docs/events.md documents and raises :class:`ParseError` with a
  human-readable reason for anything else; the reason goes to the dead-letter stream verbatim.
  Every field is bounded before it is used: the whole entry by size and field count, integers by
  digit count and range (before ``int()``), ids and ``event_id`` by length and characters. Unknown
  extra fields are tolerated inside those bounds and never decoded.
* :func:`tags_for` maps every parsed event to at least one tag, and applying the same tags twice
  deletes nothing more (invalidation is idempotent, so no de-duplication by ``event_id`` is
  needed for it). The one exception is named by :func:`scope_to_resolve`: a
  ``price_rule.changed`` of category or brand scope without ``product_ids`` (an outside
  publisher's) must first be resolved to product ids in PostgreSQL; :func:`tags_for` raises
  :class:`Unresolved` for it rather than void nothing.
* ``to_fields(parse(f)) == f`` for every valid ``f`` without extra fields: what a publisher writes
  is what the consumer reads.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from core.keys import Tag

SCHEMA: Final = "1"
PRODUCT_UPDATED: Final = "product.updated"
PRODUCT_CREATED: Final = "product.created"
PRODUCT_DELETED: Final = "product.deleted"
CATEGORY_UPDATED: Final = "category.updated"
BRAND_UPDATED: Final = "brand.updated"
# Written by the database's change capture (docs/events.md); publishers may use them too.
PRODUCTS_UPDATED: Final = "products.updated"
PRICE_RULE_CHANGED: Final = "price_rule.changed"

# Fields each type requires besides type/event_id/occurred_at/schema.
REQUIRED: Final[Mapping[str, tuple[str, ...]]] = {
    PRODUCT_UPDATED: ("product_id",),
    PRODUCT_CREATED: ("product_id", "category_id", "brand_id"),
    PRODUCT_DELETED: ("product_id", "category_id", "brand_id"),
    CATEGORY_UPDATED: ("category_id",),
    BRAND_UPDATED: ("brand_id",),
    PRODUCTS_UPDATED: ("product_ids",),
    PRICE_RULE_CHANGED: (),  # exactly one of RULE_SCOPES, checked in parse()
}
EVENT_TYPES: Final = tuple(REQUIRED)
ID_FIELDS: Final = (
    "product_id",
    "category_id",
    "previous_category_id",
    "brand_id",
    "previous_brand_id",
)
MAX_ID_LENGTH: Final = 128
MAX_EVENT_ID_LENGTH: Final = 128
# A whole entry (field names plus values, in bytes) and its number of fields, extra ones included.
MAX_ENTRY_BYTES: Final = 8192
MAX_FIELDS: Final = 32
# occurred_at: up to 9999-12-31T23:59:59.999Z. version: up to 2**53 - 1, because the cache's Lua
# scripts compare versions as doubles (a larger one could compare equal to its neighbour).
MAX_OCCURRED_AT_MS: Final = 253_402_300_799_999
MAX_VERSION: Final = 2**53 - 1
_NOT_IN_IDS: Final = frozenset("{}")
# Optional W3C trace context of the write (docs/events.md): exactly this long, lower-case hex.
TRACEPARENT: Final = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
TRACEPARENT_LENGTH: Final = 55
# products.updated: at most this many comma-separated ids (the triggers write 100 per entry).
MAX_PRODUCT_IDS: Final = 100
# price_rule.changed names the rule's scope by the one id field it sets; it may carry the
# product ids the scope covers (the capture triggers always do), up to MAX_PRODUCT_IDS.
RULE_SCOPES: Final = ("product_id", "category_id", "brand_id")
# The kinds of scope a consumer resolves to product ids (Scope.kind).
CATEGORY: Final = "category"
BRAND: Final = "brand"

# A stream entry's fields as redis-py returns them (bytes) or as a publisher builds them (str).
RawFields = Mapping[Any, bytes | str]


class ParseError(ValueError):
    """An entry that does not follow the contract; ``reason`` says which rule it broke."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unresolved(ValueError):
    """:func:`tags_for` of an event whose products must be looked up first
    (:func:`scope_to_resolve`)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One parsed event. Absent optional ids are empty strings; ``version`` 0 means unknown."""

    type: str
    event_id: str
    occurred_at_ms: int
    product_id: str = ""
    category_id: str = ""
    previous_category_id: str = ""
    brand_id: str = ""
    previous_brand_id: str = ""
    version: int = 0
    traceparent: str = ""
    product_ids: tuple[str, ...] = ()


def new_event(
    type: str,
    *,
    product_id: str = "",
    category_id: str = "",
    previous_category_id: str = "",
    brand_id: str = "",
    previous_brand_id: str = "",
    version: int = 0,
    event_id: str = "",
    occurred_at_ms: int = 0,
    traceparent: str = "",
    product_ids: tuple[str, ...] = (),
) -> Event:
    """An event with a fresh ``event_id`` and ``occurred_at`` = now, validated like a parse."""
    event = Event(
        type=type,
        event_id=event_id or uuid.uuid4().hex,
        occurred_at_ms=occurred_at_ms or int(time.time() * 1000),
        product_id=product_id,
        category_id=category_id,
        previous_category_id=previous_category_id,
        brand_id=brand_id,
        previous_brand_id=previous_brand_id,
        version=version,
        traceparent=traceparent,
        product_ids=product_ids,
    )
    return parse(to_fields(event))


def to_fields(event: Event) -> dict[str, str]:
    """The flat string fields of one XADD; empty optional fields are left out."""
    fields = {
        "schema": SCHEMA,
        "type": event.type,
        "event_id": event.event_id,
        "occurred_at": str(event.occurred_at_ms),
    }
    for name in ID_FIELDS:
        value: str = getattr(event, name)
        if value:
            fields[name] = value
    if event.version:
        fields["version"] = str(event.version)
    if event.traceparent:
        fields["traceparent"] = event.traceparent
    if event.product_ids:
        fields["product_ids"] = ",".join(event.product_ids)
    return fields


def _text(raw: RawFields, name: str) -> str:
    value = raw.get(name)
    if value is None:
        value = raw.get(name.encode())
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise ParseError(f"field {name!r} is not UTF-8") from None
    return value


def _int(raw: RawFields, name: str, *, required: bool, hi: int) -> int:
    """A decimal integer in 0..hi, its digit count checked before ``int()`` ever sees it."""
    text = _text(raw, name)
    if not text:
        if required:
            raise ParseError(f"missing field {name!r}")
        return 0
    if len(text) > len(str(hi)) or not text.isascii() or not text.isdigit():
        raise ParseError(
            f"field {name!r} must be a non-negative integer of at most {len(str(hi))} digits, "
            f"got {text[:40]!r}" + ("..." if len(text) > 40 else "")
        )
    value = int(text)
    if value > hi:
        raise ParseError(f"field {name!r} is {value}, over its maximum {hi}")
    return value


def _size(value: Any) -> int:
    """Bytes of one field name or value (anything else counts as its text form)."""
    if isinstance(value, bytes):
        return len(value)
    return len(str(value).encode(errors="replace"))


def _check_size(raw: RawFields) -> None:
    if len(raw) > MAX_FIELDS:
        raise ParseError(f"entry has {len(raw)} fields (max {MAX_FIELDS})")
    size = sum(_size(k) + _size(v) for k, v in raw.items())
    if size > MAX_ENTRY_BYTES:
        raise ParseError(f"entry is {size} bytes (max {MAX_ENTRY_BYTES})")


def _valid_id(value: str) -> bool:
    """At most :data:`MAX_ID_LENGTH` printable characters, no whitespace and no braces (a brace
    would change the key's Redis Cluster hash tag). The service's own ids are stricter."""
    return (
        len(value) <= MAX_ID_LENGTH
        and value.isprintable()
        and not any(c.isspace() or c in _NOT_IN_IDS for c in value)
    )


def parse(raw: RawFields | None) -> Event:
    """The event in a stream entry's fields, or :class:`ParseError` naming what is wrong."""
    if not raw:
        raise ParseError("entry has no fields (deleted or trimmed from the stream?)")
    _check_size(raw)
    schema = _text(raw, "schema")
    if schema != SCHEMA:
        raise ParseError(f"unsupported schema {schema[:40]!r} (expected {SCHEMA!r})")
    kind = _text(raw, "type")
    if not kind:
        raise ParseError("missing field 'type'")
    if kind not in REQUIRED:
        raise ParseError(f"unknown event type {kind[:60]!r}")
    event_id = _text(raw, "event_id")
    if not event_id:
        raise ParseError("missing field 'event_id'")
    if len(event_id) > MAX_EVENT_ID_LENGTH or not event_id.isprintable():
        raise ParseError(
            f"field 'event_id' must be at most {MAX_EVENT_ID_LENGTH} printable characters, "
            f"got {event_id[:40]!r}"
        )
    ids = {name: _text(raw, name) for name in ID_FIELDS}
    product_ids = _id_list(raw) if kind in (PRODUCTS_UPDATED, PRICE_RULE_CHANGED) else ()
    for name in REQUIRED[kind]:
        if not (product_ids if name == "product_ids" else ids[name]):
            raise ParseError(f"{kind} requires field {name!r}")
    if kind == PRICE_RULE_CHANGED and sum(1 for name in RULE_SCOPES if ids[name]) != 1:
        raise ParseError(f"{kind} requires exactly one of {', '.join(RULE_SCOPES)}")
    for name, value in ids.items():
        if not _valid_id(value):
            raise ParseError(f"field {name!r} is not a valid id: {value[:40]!r}")
    if kind == PRODUCT_UPDATED:
        # A move names both ends: voiding only the old list would leave the new one stale.
        for new, old in (
            ("category_id", "previous_category_id"),
            ("brand_id", "previous_brand_id"),
        ):
            if ids[old] and not ids[new]:
                raise ParseError(f"{kind} with {old!r} requires field {new!r} (where it moved to)")
    return Event(
        type=kind,
        event_id=event_id,
        occurred_at_ms=_int(raw, "occurred_at", required=True, hi=MAX_OCCURRED_AT_MS),
        version=_int(raw, "version", required=False, hi=MAX_VERSION),
        traceparent=_traceparent(raw),
        product_ids=product_ids,
        **ids,
    )


def _traceparent(raw: RawFields) -> str:
    """The optional ``traceparent``; a malformed one is dropped (the event is still applied:
    tracing data never costs an invalidation). Its length is checked before anything else."""
    value = raw.get("traceparent", raw.get(b"traceparent"))
    if value is None or len(value) != TRACEPARENT_LENGTH:
        return ""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return text if valid_traceparent(text) else ""


def valid_traceparent(text: str) -> bool:
    """A W3C ``traceparent`` of version 00, as this service writes and reads it."""
    return len(text) == TRACEPARENT_LENGTH and TRACEPARENT.fullmatch(text) is not None


def _id_list(raw: RawFields) -> tuple[str, ...]:
    """``product_ids`` (products.updated, price_rule.changed): 1 to MAX_PRODUCT_IDS
    comma-separated ids; empty or absent gives (). The entry's size was checked first
    (MAX_ENTRY_BYTES), so the split is over a few kilobytes at most."""
    text = _text(raw, "product_ids")
    if not text:
        return ()
    ids = tuple(text.split(","))
    if len(ids) > MAX_PRODUCT_IDS:
        raise ParseError(f"field 'product_ids' names {len(ids)} ids (at most {MAX_PRODUCT_IDS})")
    for value in ids:
        if not value or not _valid_id(value):
            raise ParseError(f"field 'product_ids' holds an invalid id: {value[:40]!r}")
    return ids


@dataclass(frozen=True, slots=True)
class Scope:
    """A category or brand whose products an event covers without naming them."""

    kind: str  # CATEGORY or BRAND
    id: str


def scope_to_resolve(event: Event) -> Scope | None:
    """The scope of a ``price_rule.changed`` that names a category or brand and no
    ``product_ids``: the consumer looks up that scope's products and voids them by id. None for
    every other event (its tags are all in :func:`tags_for`)."""
    if event.type != PRICE_RULE_CHANGED or event.product_ids or event.product_id:
        return None
    if event.category_id:
        return Scope(CATEGORY, event.category_id)
    return Scope(BRAND, event.brand_id)


def tags_for(event: Event) -> set[Tag]:
    """The tags an event voids (DESIGN section 6); :class:`Unresolved` for an event whose
    products must be looked up first (:func:`scope_to_resolve`)."""
    kind = event.type
    if kind == PRODUCT_UPDATED:
        tags = {Tag.product(event.product_id)}
        if event.previous_category_id and event.previous_category_id != event.category_id:
            tags.add(Tag.list_category(event.previous_category_id))
            tags.add(Tag.list_category(event.category_id))
        if event.previous_brand_id and event.previous_brand_id != event.brand_id:
            tags.add(Tag.list_brand(event.previous_brand_id))
            tags.add(Tag.list_brand(event.brand_id))
        return tags
    if kind in (PRODUCT_CREATED, PRODUCT_DELETED):
        return {
            Tag.product(event.product_id),
            Tag.list_category(event.category_id),
            Tag.list_brand(event.brand_id),
            Tag.list_all(),
        }
    if kind == CATEGORY_UPDATED:
        return {Tag.category(event.category_id)}
    if kind == BRAND_UPDATED:
        return {Tag.brand(event.brand_id)}
    if kind == PRODUCTS_UPDATED:
        return {Tag.product(i) for i in event.product_ids}
    if kind == PRICE_RULE_CHANGED:
        # The products the rule applies to, by id only (no category or brand tag set: the
        # Redis Cluster format has none). A product-scope rule names its product; a category
        # or brand scope comes with its products' ids, or is resolved to them by the consumer.
        tags = {Tag.product(i) for i in event.product_ids}
        if event.product_id:
            tags.add(Tag.product(event.product_id))
        if not tags:
            scope = scope_to_resolve(event)
            assert scope is not None  # parse() requires exactly one scope field
            raise Unresolved(
                f"{kind} of {scope.kind} {scope.id!r} without product_ids: its products must "
                "be looked up first"
            )
        return tags
    raise ParseError(f"unknown event type {kind!r}")  # unreachable for parsed events


@dataclass(frozen=True, slots=True)
class Invalidation:
    """What a batch of events voids. ``min_versions``: for a product tag named only by
    ``product.updated`` events that carry a version, an entry already cached at that version or
    newer is kept (a write-through got there first); every other tag is voided outright."""

    tags: frozenset[Tag]
    min_versions: dict[Tag, int]


def invalidation_for(events: Iterable[Event]) -> Invalidation:
    tags: set[Tag] = set()
    versions: dict[Tag, int] = {}
    outright: set[Tag] = set()
    for event in events:
        voided = tags_for(event)
        tags |= voided
        if event.type == PRODUCT_UPDATED and event.version > 0:
            product = Tag.product(event.product_id)
            versions[product] = max(versions.get(product, 0), event.version)
            voided = voided - {product}
        outright |= voided
    return Invalidation(frozenset(tags), {t: v for t, v in versions.items() if t not in outright})
