"""Server processes for tests that need more than one process or real signals.

The helpers live in :mod:`service.serverprocess`, shared with the benchmark suite."""

from __future__ import annotations

from service.serverprocess import ServerProcess, settings_env

__all__ = ["ServerProcess", "settings_env"]
