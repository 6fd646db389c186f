"""Request validation, done before any I/O. Pure functions raising ``InvalidArgument``."""

from __future__ import annotations

import re
from collections.abc import Sequence

from core.errors import InvalidArgument

MAX_ID_LENGTH = 64
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
MAX_BATCH = 100
MAX_VIEW_BATCH = 1000
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_id(value: str, field: str = "id") -> str:
    """An id is 1-64 characters of [A-Za-z0-9_-]; anything else never reaches Redis or SQL."""
    if _ID.fullmatch(value) is None:
        if not value:
            raise InvalidArgument(f"{field} is required")
        if len(value) > MAX_ID_LENGTH:
            raise InvalidArgument(f"{field} is longer than {MAX_ID_LENGTH} characters")
        raise InvalidArgument(f"{field} may contain only letters, digits, '_' and '-'")
    return value


def check_optional_id(value: str, field: str) -> str:
    return check_id(value, field) if value else ""


def page_size(requested: int) -> int:
    """AIP-158: 0 means the default, over the cap is clamped, negative is an error."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def batch_ids(ids: Sequence[str]) -> Sequence[str]:
    """1 to ``MAX_BATCH`` well-formed ids; duplicates are answered once per occurrence."""
    return _id_list(ids, "ids", MAX_BATCH)


def view_ids(ids: Sequence[str]) -> Sequence[str]:
    """1 to ``MAX_VIEW_BATCH`` well-formed ids; repeats are allowed (each one is a view)."""
    return _id_list(ids, "product_ids", MAX_VIEW_BATCH)


def _id_list(ids: Sequence[str], field: str, limit: int) -> Sequence[str]:
    if not ids:
        raise InvalidArgument(f"{field} must name at least one product")
    if len(ids) > limit:
        raise InvalidArgument(f"{field} may hold at most {limit} ids, got {len(ids)}")
    for n, value in enumerate(ids):
        check_id(value, f"{field}[{n}]")
    return ids
