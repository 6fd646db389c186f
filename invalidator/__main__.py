"""``python -m invalidator``: the invalidator process (same as ``catalog invalidator``)."""

from invalidator.worker import main

raise SystemExit(main())
