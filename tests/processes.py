"""Server processes for tests that need more than one process or real signals.

The helpers live in :mod:`devtools.serverprocess`, shared with the benchmark suite."""

from __future__ import annotations

from devtools.serverprocess import ServerProcess, settings_env

__all__ = ["ServerProcess", "settings_env"]
