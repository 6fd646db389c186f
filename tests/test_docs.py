"""The README's configuration tables list every setting with its real default."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import describe as service_settings
from invalidator.settings import describe as invalidator_settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize(
    ("name", "default"), [(n, d) for n, d, _ in service_settings() + invalidator_settings()]
)
def test_every_setting_is_documented_with_its_default(name: str, default: str) -> None:
    assert f"| `{name}` | `{default}` |" in README


EVENTS = (Path(__file__).resolve().parent.parent / "docs" / "events.md").read_text()


def _row(table_key: str) -> str:
    """The first table row of docs/events.md whose first cell is ``table_key``."""
    return next(line for line in EVENTS.splitlines() if line.startswith(f"| {table_key} |"))


def test_events_md_says_price_rules_are_voided_by_product_id() -> None:
    from core.events import MAX_PRODUCT_IDS, PRICE_RULE_CHANGED, new_event, tags_for
    from core.keys import Tag

    voids = _row(f"`{PRICE_RULE_CHANGED}`")
    assert "`product_ids`" in voids and "Never a `category:` or `brand:` tag" in voids
    assert f"1 to {MAX_PRODUCT_IDS} product ids" in _row("`product_ids`")
    assert f"{MAX_PRODUCT_IDS} `product_ids` each" in _row("`price_rules`")
    # What the row says is what the code does.
    event = new_event(PRICE_RULE_CHANGED, category_id="c", product_ids=("p1",))
    assert tags_for(event) == {Tag.product("p1")}
    for name in ("CATALOG_INVALIDATOR_RESOLVE_SCOPES", "CATALOG_INVALIDATOR_RESOLVE_BATCH"):
        assert name in EVENTS
