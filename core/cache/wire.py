"""Protobuf wire encoding for responses assembled from cached message bytes.

A repeated message field is the concatenation of ``tag, length, bytes`` per element, so a
``ListProductsResponse`` can be built from cached ``Product`` bytes with no decode or re-encode.
"""

from __future__ import annotations

from collections.abc import Iterable


def varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): a string, bytes or embedded message."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def repeated(number: int, payloads: Iterable[bytes], out: list[bytes]) -> None:
    """Append the encoding of a repeated message field to ``out`` (join once at the end)."""
    tag = varint(number << 3 | 2)
    for p in payloads:
        out += (tag, varint(len(p)), p)
