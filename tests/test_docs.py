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
