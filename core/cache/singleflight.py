"""In-process single-flight: concurrent calls for one key share one running task.

The shared work runs as its own task and callers await it through ``asyncio.shield``, so one
caller's cancellation (a client deadline) never cancels the load the others wait for. When the
last caller leaves, the load is cancelled: nobody wants its result, and a database query or a
lease wait must not outlive every deadline that asked for it (psycopg then cancels the query in
the server). Loads started with :meth:`launch` (background refreshes) have no caller to wait for
and always run to the end.

A cancelled load leaves the table at once, though its cancellation may take milliseconds to
finish (psycopg cancelling a query): a caller arriving meanwhile starts a new load instead of
joining one that can only end in ``CancelledError``, another request's cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    __slots__ = ("_background", "_callers", "_tasks")

    def __init__(self) -> None:
        self._tasks: dict[Hashable, asyncio.Task[T]] = {}
        self._callers: dict[asyncio.Task[T], int] = {}
        self._background: set[asyncio.Task[T]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    async def do(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(fn())
            self._tasks[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        self._callers[task] = self._callers.get(task, 0) + 1
        try:
            return await asyncio.shield(task)
        finally:
            left = self._callers[task] - 1
            if left:
                self._callers[task] = left
            else:
                del self._callers[task]
                if not task.done() and task not in self._background:
                    task.cancel()  # the last caller gave up (its deadline passed)
                    if self._tasks.get(key) is task:
                        del self._tasks[key]  # nobody may join a load that is being cancelled

    def _done(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when all callers left

    def launch(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> None:
        """Start ``fn`` in the background unless a call for ``key`` is already running."""
        if key not in self._tasks:
            task = asyncio.ensure_future(fn())
            self._tasks[key] = task
            self._background.add(task)
            task.add_done_callback(lambda t: self._done(key, t))
