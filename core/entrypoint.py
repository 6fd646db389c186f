"""The exit-status contract shared by every command (``catalog ...``, ``python -m service``,
``python -m invalidator``).

:func:`run` builds :class:`Settings` once from the environment, configures logging (text or JSON
lines, :mod:`core.logs`) and calls the command with them. A configuration error (also one found
later, such as an unreadable TLS file or a bad invalidator setting) exits 2 with a one-line
message; PostgreSQL being unreachable exits 1 with a message naming the password-free URL; a bug
still shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from core import logs
from core.db import is_connection_error
from core.settings import Settings, SettingsError


def run(prog: str, command: Callable[[Settings], int]) -> int:
    """Run ``command`` with the environment's settings; its exit status, or 2 / 1 as above."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        return command(settings)
    except SettingsError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        print(
            f"{prog}: PostgreSQL unreachable at {settings.database_url_safe}: "
            f"{getattr(exc, 'orig', None) or exc}",
            file=sys.stderr,
        )
        return 1


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
