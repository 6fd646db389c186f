"""The event contract as pure functions: parsing with reasons, and the tags each event voids."""

from __future__ import annotations

from typing import Any

import pytest

from core.events import (
    BRAND,
    BRAND_UPDATED,
    CATEGORY,
    CATEGORY_UPDATED,
    MAX_PRODUCT_IDS,
    PRICE_RULE_CHANGED,
    PRODUCT_CREATED,
    PRODUCT_DELETED,
    PRODUCT_UPDATED,
    PRODUCTS_UPDATED,
    ParseError,
    Scope,
    Unresolved,
    invalidation_for,
    new_event,
    parse,
    scope_to_resolve,
    tags_for,
    to_fields,
)
from core.keys import Tag

BASE = {"schema": "1", "event_id": "e1", "occurred_at": "1700000000000"}


def fields(**extra: str) -> dict[str, str]:
    return {**BASE, **extra}


def test_bytes_fields_as_redis_returns_them_parse() -> None:
    raw = {k.encode(): v.encode() for k, v in fields(type=PRODUCT_UPDATED, product_id="7").items()}
    event = parse(raw)
    assert (event.type, event.product_id, event.occurred_at_ms) == (
        PRODUCT_UPDATED,
        "7",
        1700000000000,
    )


def test_fields_round_trip() -> None:
    event = new_event(
        PRODUCT_UPDATED, product_id="7", category_id="c2", previous_category_id="c1", version=3
    )
    assert parse(to_fields(event)) == event
    assert to_fields(parse(to_fields(event))) == to_fields(event)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "no fields"),
        ({}, "no fields"),
        (fields(type=PRODUCT_UPDATED, product_id="1", schema="2"), "unsupported schema '2'"),
        ({"type": PRODUCT_UPDATED, "product_id": "1"}, "unsupported schema ''"),
        (fields(product_id="1"), "missing field 'type'"),
        (fields(type="product.exploded", product_id="1"), "unknown event type 'product.exploded'"),
        (
            {**fields(type=PRODUCT_UPDATED, product_id="1"), "event_id": ""},
            "missing field 'event_id'",
        ),
        (fields(type=PRODUCT_UPDATED), "product.updated requires field 'product_id'"),
        (
            fields(type=PRODUCT_CREATED, product_id="1", brand_id="b"),
            "requires field 'category_id'",
        ),
        (
            fields(type=PRODUCT_DELETED, product_id="1", category_id="c"),
            "requires field 'brand_id'",
        ),
        (fields(type=CATEGORY_UPDATED), "requires field 'category_id'"),
        (fields(type=BRAND_UPDATED), "requires field 'brand_id'"),
        (
            {**fields(type=PRODUCT_UPDATED, product_id="1"), "occurred_at": "soon"},
            "non-negative integer",
        ),
        (
            {**fields(type=PRODUCT_UPDATED, product_id="1"), "occurred_at": ""},
            "missing field 'occurred_at'",
        ),
        (
            fields(type=PRODUCT_UPDATED, product_id="1", version="-3"),
            "'version' must be a non-negative",
        ),
        (fields(type=PRODUCT_UPDATED, product_id="a{b}"), "not a valid id"),
        (fields(type=PRODUCT_UPDATED, product_id="x" * 200), "not a valid id"),
        ({b"schema": b"1", b"type": b"\xff"}, "not UTF-8"),
        # Hostile numbers: bounded by digit count before int(), then by range.
        (
            {**fields(type=PRODUCT_UPDATED, product_id="1"), "occurred_at": "9" * 400},
            "'occurred_at' must be a non-negative integer of at most 15 digits",
        ),
        (
            {**fields(type=PRODUCT_UPDATED, product_id="1"), "occurred_at": "9" * 5000},
            "at most 15 digits",
        ),
        (
            {**fields(type=PRODUCT_UPDATED, product_id="1"), "occurred_at": "999999999999999"},
            "over its maximum 253402300799999",
        ),
        ({**fields(type=PRODUCT_UPDATED, product_id="1"), "occurred_at": "-1"}, "non-negative"),
        ({**fields(type=PRODUCT_UPDATED, product_id="1"), "occurred_at": "١٢"}, "non-negative"),
        (fields(type=PRODUCT_UPDATED, product_id="1", version="9" * 17), "at most 16 digits"),
        (
            fields(type=PRODUCT_UPDATED, product_id="1", version=str(2**53)),
            "over its maximum 9007199254740991",
        ),
        # Hostile strings: bounded by length and characters.
        ({**fields(type=PRODUCT_UPDATED, product_id="1"), "event_id": "e" * 129}, "'event_id'"),
        ({**fields(type=PRODUCT_UPDATED, product_id="1"), "event_id": "a\nb"}, "'event_id'"),
        (fields(type=PRODUCT_UPDATED, product_id="a\x00b"), "not a valid id"),
        (fields(type=BRAND_UPDATED, brand_id="b\u2028"), "not a valid id"),
        # The whole entry: size and field count, extra fields included.
        (fields(type=PRODUCT_UPDATED, product_id="1", blob="x" * 1_000_000), "(max 8192)"),
        (
            fields(type=PRODUCT_UPDATED, product_id="1", **{f"x{i}": "" for i in range(28)}),
            "entry has 33 fields (max 32)",
        ),
        # A move names both ends (item: a half move voided only the old list pages).
        (
            fields(type=PRODUCT_UPDATED, product_id="1", previous_category_id="c1"),
            "product.updated with 'previous_category_id' requires field 'category_id'",
        ),
        (
            fields(type=PRODUCT_UPDATED, product_id="1", category_id="c", previous_brand_id="b"),
            "product.updated with 'previous_brand_id' requires field 'brand_id'",
        ),
    ],
)
def test_malformed_entries_raise_parse_error_with_reason(raw: Any, reason: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse(raw)
    assert reason in caught.value.reason


def test_extra_fields_within_the_limits_are_tolerated_even_when_not_utf8() -> None:
    raw = {k.encode(): v.encode() for k, v in fields(type=PRODUCT_UPDATED, product_id="7").items()}
    raw.update({b"trace_id": b"\xff\xfe", b"\xc3(": b"newer publisher", b"tenant": b"x" * 4000})
    assert parse(raw).product_id == "7"


def test_the_largest_values_in_range_parse() -> None:
    raw = fields(
        type=PRODUCT_UPDATED,
        product_id="p" * 128,
        version=str(2**53 - 1),
        event_id="e" * 128,
    )
    event = parse({**raw, "occurred_at": "253402300799999"})
    assert (event.version, event.occurred_at_ms) == (2**53 - 1, 253402300799999)


def test_new_event_validates_like_parse() -> None:
    with pytest.raises(ParseError, match="requires field 'brand_id'"):
        new_event(PRODUCT_CREATED, product_id="1", category_id="c")
    assert (
        new_event(BRAND_UPDATED, brand_id="b").event_id
        != new_event(BRAND_UPDATED, brand_id="b").event_id
    )


@pytest.mark.parametrize(
    ("extra", "tags"),
    [
        ({"type": PRODUCT_UPDATED, "product_id": "1"}, {"product:1"}),
        (
            {"type": PRODUCT_UPDATED, "product_id": "1", "category_id": "c1", "brand_id": "b1"},
            {"product:1"},
        ),
        (  # previous equal to current: not a move
            {
                "type": PRODUCT_UPDATED,
                "product_id": "1",
                "category_id": "c1",
                "previous_category_id": "c1",
            },
            {"product:1"},
        ),
        (
            {
                "type": PRODUCT_UPDATED,
                "product_id": "1",
                "category_id": "c2",
                "previous_category_id": "c1",
            },
            {"product:1", "list:category:c1", "list:category:c2"},
        ),
        (
            {
                "type": PRODUCT_UPDATED,
                "product_id": "1",
                "brand_id": "b2",
                "previous_brand_id": "b1",
                "category_id": "c1",
            },
            {"product:1", "list:brand:b1", "list:brand:b2"},
        ),
        (
            {"type": PRODUCT_CREATED, "product_id": "1", "category_id": "c", "brand_id": "b"},
            {"product:1", "list:category:c", "list:brand:b", "list:all"},
        ),
        (
            {"type": PRODUCT_DELETED, "product_id": "1", "category_id": "c", "brand_id": "b"},
            {"product:1", "list:category:c", "list:brand:b", "list:all"},
        ),
        ({"type": CATEGORY_UPDATED, "category_id": "c"}, {"category:c"}),
        ({"type": BRAND_UPDATED, "brand_id": "b"}, {"brand:b"}),
    ],
)
def test_tags_for_follows_the_design_mapping(extra: dict[str, str], tags: set[str]) -> None:
    assert {t.name for t in tags_for(parse(fields(**extra)))} == tags


def test_only_renames_are_announced_as_renames() -> None:
    renames = [
        parse(fields(type=CATEGORY_UPDATED, category_id="c")),
        parse(fields(type=BRAND_UPDATED, brand_id="b")),
    ]
    assert [t.renamed for e in renames for t in tags_for(e)] == ["c:c", "b:b"]
    moved = parse(
        fields(type=PRODUCT_UPDATED, product_id="1", category_id="c2", previous_category_id="c1")
    )
    assert not any(t.renamed for t in tags_for(moved))
    assert Tag.list_category("c1") in tags_for(moved)
    assert {t.list_filter for t in tags_for(moved)} == {None, ("c1", ""), ("c2", "")}


def test_versioned_product_updates_keep_entries_at_or_past_the_highest_version() -> None:
    from core.events import invalidation_for

    v3 = new_event(PRODUCT_UPDATED, product_id="p1", version=3)
    v5 = new_event(PRODUCT_UPDATED, product_id="p1", version=5)
    unversioned = new_event(PRODUCT_UPDATED, product_id="p1")
    moved = new_event(
        PRODUCT_UPDATED, product_id="p2", version=2, category_id="c2", previous_category_id="c1"
    )
    batch = invalidation_for([v3, v5, moved])
    assert batch.min_versions == {Tag.product("p1"): 5, Tag.product("p2"): 2}
    assert (
        Tag.list_category("c1") in batch.tags and Tag.list_category("c1") not in batch.min_versions
    )
    assert invalidation_for([v5, unversioned]).min_versions == {}, (
        "an unversioned event voids outright"
    )
    deleted = new_event("product.deleted", product_id="p1", category_id="c", brand_id="b")
    assert invalidation_for([v5, deleted]).min_versions == {}


def test_products_updated_voids_each_product_and_round_trips() -> None:
    event = new_event(PRODUCTS_UPDATED, product_ids=("p1", "p2", "p3"))
    assert parse(to_fields(event)) == event
    assert to_fields(event)["product_ids"] == "p1,p2,p3"
    assert tags_for(event) == {Tag.product("p1"), Tag.product("p2"), Tag.product("p3")}
    assert invalidation_for([event]).min_versions == {}  # no version: deleted outright


@pytest.mark.parametrize(
    ("product_ids", "reason"),
    [
        ("", "products.updated requires field 'product_ids'"),
        (",".join(f"p{n}" for n in range(MAX_PRODUCT_IDS + 1)), "at most 100"),
        ("p1,,p2", "invalid id: ''"),
        ("p1,p 2", "invalid id: 'p 2'"),
        ("p1," + "x" * 200, "invalid id"),
        ("x" * 100_000, r"entry is \d+ bytes \(max"),  # the entry's size is checked first
    ],
)
def test_products_updated_bounds_its_id_list(product_ids: str, reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        parse(fields(type=PRODUCTS_UPDATED, product_ids=product_ids))


def test_price_rule_changed_voids_its_product_ids_and_never_a_category_or_brand_tag() -> None:
    # As the capture triggers write it: the scope for information, the products it covers.
    event = new_event(PRICE_RULE_CHANGED, category_id="c1", product_ids=("p1", "p2"))
    assert parse(to_fields(event)) == event
    assert tags_for(event) == {Tag.product("p1"), Tag.product("p2")}
    assert scope_to_resolve(event) is None
    assert invalidation_for([event]).min_versions == {}  # no version: deleted outright
    brand = parse(fields(type=PRICE_RULE_CHANGED, brand_id="b1", product_ids="p3"))
    assert tags_for(brand) == {Tag.product("p3")}
    product = parse(fields(type=PRICE_RULE_CHANGED, product_id="p1"))  # an outside publisher's
    assert tags_for(product) == {Tag.product("p1")} and scope_to_resolve(product) is None


@pytest.mark.parametrize(
    ("ids", "scope"),
    [
        ({"category_id": "c1"}, Scope(CATEGORY, "c1")),
        ({"brand_id": "b1"}, Scope(BRAND, "b1")),
        ({"brand_id": "b1", "product_ids": ""}, Scope(BRAND, "b1")),  # empty counts as absent
    ],
)
def test_price_rule_changed_of_a_scope_without_ids_must_be_resolved_first(
    ids: dict[str, str], scope: Scope
) -> None:
    event = parse(fields(type=PRICE_RULE_CHANGED, **ids))
    assert scope_to_resolve(event) == scope
    with pytest.raises(Unresolved, match="without product_ids"):
        tags_for(event)  # never an empty set: nothing may be dropped silently
    with pytest.raises(Unresolved):
        invalidation_for([event])


@pytest.mark.parametrize(
    ("product_ids", "reason"),
    [
        (",".join(f"p{n}" for n in range(MAX_PRODUCT_IDS + 1)), r"names 101 ids \(at most 100\)"),
        ("p1,,p2", "invalid id: ''"),
        ("p1,", "invalid id: ''"),
        ("p1,p 2", "invalid id: 'p 2'"),
        ("p1,{p2}", "invalid id: '{p2}'"),
        ("p1," + "x" * 200, "invalid id"),
        ("x" * 100_000, r"entry is \d+ bytes \(max"),  # the entry's size is checked first
    ],
)
def test_price_rule_changed_bounds_its_id_list_like_products_updated(
    product_ids: str, reason: str
) -> None:
    with pytest.raises(ParseError, match=reason):
        parse(fields(type=PRICE_RULE_CHANGED, category_id="c1", product_ids=product_ids))


def test_price_rule_changed_takes_up_to_100_of_the_longest_ids() -> None:
    ids = ",".join(f"{n:064d}" for n in range(MAX_PRODUCT_IDS))  # what the schema allows
    event = parse(fields(type=PRICE_RULE_CHANGED, category_id="c" * 128, product_ids=ids))
    assert len(event.product_ids) == MAX_PRODUCT_IDS


@pytest.mark.parametrize("ids", [{}, {"category_id": "c1", "brand_id": "b1"}])
def test_price_rule_changed_names_exactly_one_scope(ids: dict[str, str]) -> None:
    with pytest.raises(ParseError, match="exactly one of product_id, category_id, brand_id"):
        parse(fields(type=PRICE_RULE_CHANGED, **ids))
