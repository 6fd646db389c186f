"""``python -m invalidator``: the invalidator process (same as ``catalog invalidator``); the
``dlq`` and ``publish`` subcommands are available too."""

from invalidator.cli import main

raise SystemExit(main())
