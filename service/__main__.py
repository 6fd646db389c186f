"""``python -m service``: the ``catalog`` command line."""

from service.cli import main

raise SystemExit(main())
