"""The outbox relay: publishes the events queued in PostgreSQL's ``outbox`` table, after COMMIT.

Rows come from two places. Triggers on the catalog tables (migration 0005, docs/events.md) write
the invalidation of every committed change, whoever made it, in the changing transaction. Writers
of other data may still call :func:`core.outbox.add_to_outbox` inside their transaction. Either
way a rolled-back transaction leaves no row, and a committed one is always published.

A statement-level trigger on ``outbox`` itself calls ``pg_notify(NOTIFY_CHANNEL)``; PostgreSQL
delivers the notification at COMMIT. The relay (:class:`OutboxRelay`), any number of copies:

* owns one autocommit connection on which it LISTENs and runs its passes, and wakes on each
  notification; it polls only every ``poll_s`` (a slow fallback for notifications missed while
  it was reconnecting). After every (re)connect it LISTENs first and then drains, so a commit is
  either seen by that drain or notifies the connection that waits next: none is missed;
* per pass, in one transaction: takes ``pg_try_advisory_xact_lock(LOCK_KEY)`` (a copy that does
  not get it stands by; one publisher at a time is what keeps per-product order: with SKIP
  LOCKED alone, relay B could publish row 2 while relay A still holds row 1 of the same
  product), marks up to ``batch_size`` unsent rows sent (``ORDER BY id ... FOR UPDATE SKIP
  LOCKED``, RETURNING them), XADDs them in id order in one pipeline and commits. BEGIN, the lock
  and the batch go in one round trip (psycopg pipeline mode), the COMMIT in a second. A crash or
  a failed XADD before COMMIT rolls the marks back and those rows are published again:
  delivery is at-least-once, and invalidation is idempotent;
* never skips a row: it selects ``sent_at IS NULL``, not "ids after the last one sent", so a row
  whose transaction commits late (lower id, visible later) is published on the next pass;
* sets a row aside that cannot be published (fields that are not a flat map of bounded strings,
  a stream name out of bounds, an XADD Redis refuses): it gets ``failed_at`` and its ``error``,
  is counted (``catalog_outbox_failed_total``), listed by ``catalog outbox failed``, and the rows
  behind it flow. A connection failure is not the row's fault: the whole batch is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from opentelemetry.trace import SpanKind
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from core import tracing
from core.db import libpq_url
from core.outbox import outbox
from core.publisher import Publisher
from core.redisclient import ReplicationShortfall
from invalidator import metrics

log = logging.getLogger(__name__)

# pg_advisory lock id of the relay ("catalog outbox" as a bigint); same in every copy.
LOCK_KEY = 0x6F7574626F78
# The channel the outbox trigger notifies (migration 0004); a constant of the schema.
NOTIFY_CHANNEL = "catalog_outbox"
# How the relay's connection shows in pg_stat_activity.
APPLICATION_NAME = "catalog-outbox-relay"

# Bounds of a publishable row: a stream entry is a flat map of strings, and neither the stream
# nor Redis should receive a field the size of a document by accident.
MAX_FIELDS = 32
MAX_FIELD_NAME = 64
MAX_FIELD_VALUE = 16_384
MAX_STREAM_NAME = 256
MAX_ERROR = 500


class Unpublishable(ValueError):
    """A row the relay can never XADD; ``reason`` is stored with it."""


def entry_fields(fields: Any, stream: str | None) -> dict[str, str]:
    """The XADD fields of one outbox row, or :class:`Unpublishable` saying why there are none.

    Values may be strings or integers (written as decimal text); anything else (an object, a
    list, null, a boolean) is refused rather than guessed at."""
    if stream is not None and not 0 < len(stream) <= MAX_STREAM_NAME:
        raise Unpublishable(f"stream name must be 1 to {MAX_STREAM_NAME} characters")
    if not isinstance(fields, Mapping) or not fields:
        raise Unpublishable("fields must be a non-empty JSON object")
    if len(fields) > MAX_FIELDS:
        raise Unpublishable(f"{len(fields)} fields (at most {MAX_FIELDS})")
    out: dict[str, str] = {}
    for name, value in fields.items():
        if not 0 < len(name) <= MAX_FIELD_NAME:
            raise Unpublishable(f"field name {name[:40]!r} must be 1 to {MAX_FIELD_NAME} chars")
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise Unpublishable(f"field {name!r} must be a string, got JSON {_json_kind(value)}")
        if len(value) > MAX_FIELD_VALUE:
            raise Unpublishable(f"field {name!r} is longer than {MAX_FIELD_VALUE} characters")
        out[name] = value
    return out


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", float: "number"}.get(type(value), type(value).__name__)


@dataclass(frozen=True, slots=True)
class FailedRow:
    """A row set aside by the relay (``catalog outbox failed``)."""

    id: int
    stream: str | None
    fields: Any
    created_at: datetime
    failed_at: datetime
    error: str


async def failed_rows(engine: AsyncEngine, *, count: int, after_id: int = 0) -> list[FailedRow]:
    """Set-aside rows, oldest first, ``count`` at most, ids above ``after_id``."""
    o = outbox.c
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(o.id, o.stream, o.fields, o.created_at, o.failed_at, o.error)
                .where(o.failed_at.is_not(None), o.sent_at.is_(None), o.id > after_id)
                .order_by(o.id)
                .limit(count)
            )
        ).all()
    return [FailedRow(*row) for row in rows]


async def retry_failed(engine: AsyncEngine, ids: list[int]) -> int:
    """Put set-aside rows back in the queue (after fixing them); how many were."""
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.update(outbox)
            .where(outbox.c.id.in_(ids), outbox.c.failed_at.is_not(None))
            .values(failed_at=None, error=None)
        )
        if result.rowcount:
            await conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")))
    return int(result.rowcount)


# The batch of one pass: rows marked sent (rolled back unless the XADDs succeed), returned. The
# lock is taken again inside (a re-entrant no-op for its holder) so that a standby's batch is
# empty even though both statements go in one round trip; a pass whose first statement did not
# get the lock rolls back whatever the second one took.
_LISTEN = "LISTEN catalog_outbox"  # NOTIFY_CHANNEL
_LOCK = "SELECT pg_try_advisory_xact_lock(%(key)s)"
_TAKE = """
WITH lock AS (SELECT pg_try_advisory_xact_lock(%(key)s) AS held),
batch AS (
    SELECT o.id FROM outbox o, lock
    WHERE lock.held AND o.sent_at IS NULL AND o.failed_at IS NULL
    ORDER BY o.id LIMIT %(limit)s
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE outbox SET sent_at = now() FROM batch WHERE outbox.id = batch.id
RETURNING outbox.id, outbox.stream, outbox.fields
"""
_SET_ASIDE = "UPDATE outbox SET sent_at = NULL, failed_at = now(), error = %s WHERE id = %s"


class OutboxRelay:
    def __init__(
        self,
        engine: AsyncEngine,
        publisher: Publisher,
        *,
        batch_size: int,
        poll_s: float,
        retention_s: float,
        connect_timeout_s: int = 5,
    ) -> None:
        """``poll_s``: the fallback poll; notifications wake the relay without it."""
        self.engine = engine
        self.publisher = publisher
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.retention_s = retention_s
        self.connect_timeout_s = connect_timeout_s
        self.published = 0
        self.failed = 0
        self.passes = 0
        self.wakeups = 0  # notifications that ended a wait
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def relay_once(self) -> int | None:
        """Publish (or set aside) up to ``batch_size`` rows; None when another relay holds the
        lock. Returns the number of rows taken from the queue."""
        self.passes += 1
        conn = await self.connection()
        bad: dict[int, str] = {}
        standby = False
        async with conn.pipeline(), conn.transaction() as transaction:
            held_cursor = await conn.execute(_LOCK, {"key": LOCK_KEY})
            take_cursor = await conn.execute(_TAKE, {"key": LOCK_KEY, "limit": self.batch_size})
            held = await held_cursor.fetchone()
            rows = sorted(await take_cursor.fetchall())
            if not (held and held[0]):
                # The holder may have committed between the two statements, letting the second
                # take the lock and a batch: never commit a batch this pass will not publish.
                standby = True
                raise psycopg.Rollback(transaction)
            good: list[tuple[int, str, dict[str, str]]] = []
            for row_id, stream, fields in rows:
                try:
                    good.append((row_id, stream or "", entry_fields(fields, stream)))
                except Unpublishable as exc:
                    bad[row_id] = str(exc)
            if good:
                # A row's trace continues in a PRODUCER span; its entry carries that span onward.
                parents = [f.get("traceparent", "") for _, _, f in good]
                with tracing.continued(
                    "catalog.outbox.relay", parents, kind=SpanKind.PRODUCER
                ) as carried:
                    entries = [
                        (s, f if tp == parent else {**f, "traceparent": tp})
                        for (_, s, f), parent, tp in zip(good, parents, carried, strict=True)
                    ]
                    replies = await self.publisher.publish_entries(entries)
                for (row_id, _, _), reply in zip(good, replies, strict=True):
                    if isinstance(reply, (RedisConnectionError, RedisTimeoutError)):
                        raise reply  # not the row's fault: roll back, retry the batch
                    if isinstance(reply, ResponseError):
                        bad[row_id] = f"Redis refused the XADD: {reply}"
                # Marked sent only once the entries are on enough replicas (WAIT): else a
                # failover could lose them after the COMMIT. Short: roll back, publish again.
                try:
                    await self.publisher.replicated(s for i, s, _ in good if i not in bad)
                except ReplicationShortfall:
                    metrics.REPLICA_WAIT_SHORT.labels("relay").inc()
                    raise
            if bad:
                async with conn.cursor() as cursor:
                    await cursor.executemany(
                        _SET_ASIDE, [(reason[:MAX_ERROR], row_id) for row_id, reason in bad.items()]
                    )
        if standby:
            return None
        sent = len(rows) - len(bad)
        self.published += sent
        metrics.OUTBOX_PUBLISHED.inc(sent)
        if bad:
            self.failed += len(bad)
            metrics.OUTBOX_FAILED.inc(len(bad))
            for row_id, reason in bad.items():
                log.warning("outbox row %d set aside: %s", row_id, reason[:MAX_ERROR])
        return len(rows)

    async def purge_sent(self) -> int:
        """Delete rows sent longer than ``retention_s`` ago (kept for audits and replays)."""
        age = self.retention_s
        async with self.engine.begin() as conn:
            result = await conn.execute(
                sa.delete(outbox).where(
                    outbox.c.sent_at < sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, age)
                )
            )
        return int(result.rowcount)

    async def connection(self) -> psycopg.AsyncConnection[Any]:
        """The relay's autocommit connection, (re)connected on demand; it has run LISTEN on
        :data:`NOTIFY_CHANNEL` before it is returned."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        url = libpq_url(self.engine.url.render_as_string(hide_password=False))
        conn = await psycopg.AsyncConnection.connect(
            url,
            autocommit=True,
            connect_timeout=self.connect_timeout_s,
            application_name=APPLICATION_NAME,
            # A pass's COMMIT records only "sent" marks, so it does not wait for the WAL flush:
            # a flush stalled by other I/O (a checkpoint, CREATE DATABASE) must not hold up the
            # next batch. A crash that loses an acknowledged mark publishes those rows again,
            # which at-least-once delivery allows; the XADDs came before the COMMIT anyway.
            options="-c synchronous_commit=off",
        )
        try:
            await conn.execute(_LISTEN)
        except BaseException:
            await _close(conn)
            raise
        self._conn = conn
        return conn

    async def close(self) -> None:
        if self._conn is not None:
            await _close(self._conn)
            self._conn = None

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; a failing database or Redis is retried, never fatal.

        While they fail, retries back off (doubling, up to MAX_BACKOFF_S) and only the first
        failure and the recovery are logged as warnings, so an outage is not a log flood. A
        failure drops the connection: the next pass reconnects, LISTENs and drains."""
        pause = MIN_BACKOFF_S
        failing = False
        try:
            while not stop.is_set():
                try:
                    n = await self.relay_once()
                    if self.passes % 10_000 == 1:
                        await self.purge_sent()
                    if n != self.batch_size:  # a full batch means more are waiting
                        await self._wait(await self.connection(), stop)
                except (RedisError, SQLAlchemyError, psycopg.Error, OSError) as exc:
                    metrics.OUTBOX_ERRORS.inc()
                    (log.debug if failing else log.warning)("outbox relay pass failed: %s", exc)
                    failing = True
                    await self.close()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
                    pause = min(pause * 2, MAX_BACKOFF_S)
                else:
                    if failing:
                        log.warning("outbox relay recovered")
                    failing, pause = False, MIN_BACKOFF_S
        finally:
            await self.close()

    async def _wait(self, listener: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> None:
        """Until a notification arrives, ``poll_s`` passes or ``stop`` is set."""
        notified = asyncio.ensure_future(_next_notification(listener, self.poll_s))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({notified, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (notified, stopping):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, psycopg.Error):
                        await task
        if notified.done() and not notified.cancelled() and notified.result():
            self.wakeups += 1


async def _next_notification(listener: psycopg.AsyncConnection[Any], wait_s: float) -> bool:
    """True when a notification arrived within ``wait_s`` (all those already queued are
    consumed with it: one pass publishes every row they announced)."""
    got = False
    async for _ in listener.notifies(timeout=wait_s, stop_after=1):
        got = True
    return got


async def _close(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(psycopg.Error, OSError):
        await conn.close()


# Pauses between relay attempts while PostgreSQL or Redis keeps failing.
MIN_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0
