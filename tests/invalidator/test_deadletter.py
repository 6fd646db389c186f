"""What a dead letter holds: a complete copy of an entry within the contract's limits, a bounded
one of anything else, saying what was cut."""

from __future__ import annotations

from core.events import MAX_ENTRY_BYTES
from invalidator.deadletter import (
    AT,
    CONSUMER,
    ENTRY_ID,
    MAX_VALUE_CHARS,
    REASON,
    TRUNCATED,
    dead_letter_fields,
    is_entry_id,
)


def test_entry_within_the_limits_is_copied_whole() -> None:
    fields = {b"schema": b"1", b"type": b"product.updated", b"tenant": b"t" * 1000}
    letter = dead_letter_fields(fields, reason="why", entry_id=b"1-0", consumer="c")
    assert letter.pop(AT).isdigit()
    assert letter == {
        "schema": "1",
        "type": "product.updated",
        "tenant": "t" * 1000,
        REASON: "why",
        ENTRY_ID: "1-0",
        CONSUMER: "c",
    }


def test_huge_entry_is_bounded_and_says_what_was_cut() -> None:
    fields: dict[bytes, bytes] = {b"schema": b"1", b"id": b"\xff\xfe", b"k" * 5000: b"v"}
    fields[b"blob"] = b"x" * 1_000_000
    fields[b"dlq_reason"] = b"forged"
    fields.update({f"f{i}".encode(): b"y" * 100 for i in range(10_000)})
    letter = dead_letter_fields(fields, reason="r" * 10_000, entry_id=b"1-0", consumer="c")
    original = {k: v for k, v in letter.items() if not k.startswith("dlq_")}
    assert sum(len(k.encode()) + len(v.encode()) for k, v in original.items()) <= MAX_ENTRY_BYTES
    assert original["id"] == "\ufffd\ufffd"
    assert len(original["blob"]) == MAX_VALUE_CHARS and original["blob"].endswith("...")
    assert len(letter[REASON]) == 500
    cut, dropped = letter[TRUNCATED].split(", ")
    assert cut == "2 fields cut"  # the long name and the blob
    assert int(dropped.split()[0]) > 9000  # the forged dlq_reason and what did not fit


def test_entry_ids_are_checked_before_they_reach_redis() -> None:
    assert is_entry_id("1700000000000-0") and is_entry_id("17")
    assert not any(is_entry_id(s) for s in ("", "-", "abc", "1-", "1-2-3", "9" * 21))
