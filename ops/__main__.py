"""``python -m ops``: the ``catalog`` command line."""

from ops.cli import main

raise SystemExit(main())
