"""``python -m service [--workers N]``: the gRPC server process (same as ``catalog serve``)."""

from service.workers import main

raise SystemExit(main())
