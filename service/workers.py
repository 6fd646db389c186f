"""``catalog serve --workers N`` (``python -m service``): N server processes sharing one port
through SO_REUSEPORT.

A Python process runs on one core, so the way to use more is more processes. As in grpc's
multiprocessing example, the parent forks before it creates any gRPC object (gRPC's core does not
survive a fork once started); each child runs :func:`service.app.run` on its own event loop, with
its own Redis and PostgreSQL pools, and binds the same address with ``grpc.so_reuseport`` (the
kernel spreads connections over them). Worker ``i`` serves Prometheus metrics on
``CATALOG_METRICS_PORT + i``, so every worker's traffic is counted: Prometheus scrapes each port
as a target of its own and dashboards sum over them (docs/operations.md#metrics).

The parent forwards SIGTERM/SIGINT to every worker and waits; if one worker dies on its own, the
parent stops the others and exits non-zero, so a supervisor restarts the whole group.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from types import FrameType
from typing import Any

from core import entrypoint
from core.settings import Settings, SettingsError

log = logging.getLogger(__name__)


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: its own metrics port (the base port + ``index``)."""
    if settings.metrics_port == 0:
        return settings
    return settings.replace(metrics_port=settings.metrics_port + index)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=entrypoint.positive_int,
        help="server processes sharing the port (default: CATALOG_WORKERS)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service [--workers N]``, with the exit-status contract of every command."""
    parser = argparse.ArgumentParser(
        prog="python -m service", description="Run the gRPC service until SIGTERM/SIGINT."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return entrypoint.run("catalog serve", lambda settings: serve(settings, args.workers))


def serve(settings: Settings, workers: int | None = None) -> int:
    """Run ``settings.workers`` servers until SIGTERM/SIGINT; the exit status of the group."""
    from service.app import run

    if workers is not None:
        settings = settings.replace(workers=workers)
    settings.check_can_serve()  # before workers fork, so the group exits 2 at once
    if settings.workers == 1:
        asyncio.run(run(settings))
        return 0
    pids: list[int] = []
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # the worker never returns into the parent's code
            os._exit(_worker(run, worker_settings(settings, index)))
        pids.append(pid)
    log.info("started %d workers: %s", len(pids), pids)
    return _supervise(pids)


def _worker(run: Callable[[Settings], Coroutine[Any, Any, None]], settings: Settings) -> int:
    try:
        asyncio.run(run(settings))
    except SettingsError as exc:  # e.g. its metrics port is taken: one line, not a traceback
        log.error("worker %d: configuration error: %s", os.getpid(), exc)
        return 2
    except BaseException:
        log.exception("worker %d failed", os.getpid())
        return 1
    return 0


def _supervise(pids: list[int]) -> int:
    stopping = False

    def forward(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        _signal_all(pids, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    alive = set(pids)
    while alive:
        pid, wait_status = os.wait()
        alive.discard(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0 or not stopping:
            log.warning("worker %d exited with status %d; stopping the others", pid, code)
            status = status or 1
            stopping = True
            _signal_all(list(alive), signal.SIGTERM)
    return status


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
