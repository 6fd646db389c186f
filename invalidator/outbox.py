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
  and the batch are one statement string (one round trip), the COMMIT a second round trip, after
  the XADDs: a notification reaches the stream after one database and one Redis round trip. A
  crash or a failed XADD before COMMIT rolls the marks back and those rows are published again:
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
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from core import tracing
from core.db import libpq_url
from core.events import (
    APPLIED,
    Event,
    Invalidation,
    ParseError,
    invalidation_for,
    parse,
    scope_to_resolve,
)
from core.outbox import outbox
from core.publisher import Publisher
from core.redisclient import ReplicationShortfall
from invalidator import metrics
from invalidator.consumer import TRANSIENT

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


# Entries per invalidation call of the fast path (the consumer's default batch is 200).
APPLY_CHUNK = 100
# Applies one batch's invalidation to the cache (the relay's fast path).
Apply = Callable[[Invalidation], Awaitable[object]]


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


# The batch of one pass: BEGIN, the lock and the rows marked sent (rolled back unless the XADDs
# succeed) in ONE round trip, as one simple-protocol string (no parameters: the key and the
# limit are our own integers). It always returns at least one row: ``held`` says whether this
# relay got the lock (a standby's pass takes nothing and rolls back), and a row per taken entry
# (``id`` NULL when none was taken). One statement takes the lock and the batch, so there is no
# window between "lock held?" and "take" for a holder's COMMIT to fall into. Psycopg's pipeline
# mode would save the same round trip but waits for its results by polling a socket that is
# always writable: measured, it cost the relay about a sixth of a core at 1,000 commits/s.
_LISTEN = "LISTEN catalog_outbox"  # NOTIFY_CHANNEL
_TAKE = """BEGIN;
WITH lock AS (SELECT pg_try_advisory_xact_lock({key}) AS held),
batch AS (
    SELECT o.id FROM outbox o, lock
    WHERE lock.held AND o.sent_at IS NULL AND o.failed_at IS NULL
    ORDER BY o.id LIMIT {limit}
    FOR UPDATE OF o SKIP LOCKED
),
taken AS (
    UPDATE outbox SET sent_at = now() FROM batch WHERE outbox.id = batch.id
    RETURNING outbox.id, outbox.stream, outbox.fields
)
SELECT lock.held, taken.id, taken.stream, taken.fields FROM lock LEFT JOIN taken ON true
ORDER BY taken.id"""
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
        apply: Apply | None = None,
    ) -> None:
        """``poll_s``: the fallback poll; notifications wake the relay without it. ``apply``:
        the fast path (applies a batch's invalidation before its XADDs), None to leave every
        entry to the consumer."""
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
        self.applied = 0  # entries applied by the fast path
        self.chained = 0  # passes whose COMMIT went with the next pass's batch
        self._open = False  # a chained pass's transaction awaits its COMMIT
        self.apply = apply
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def relay_once(self, *, chain: bool = False) -> int | None:
        """Publish (or set aside) up to ``batch_size`` rows; None when another relay holds the
        lock. Returns the number of rows taken from the queue.

        ``chain`` (the loop of :meth:`run`): when more rows are already waiting (a notification
        arrived during the pass, or the batch was full), the pass leaves its transaction open
        and the next pass sends ``COMMIT`` in the same string as its ``BEGIN`` and batch: one
        round trip per pass instead of two while commits keep coming. The marks of a chained
        pass are committed by the next pass or by :meth:`finish`; until then a crash publishes
        those rows again, as ever."""
        self.passes += 1
        conn = await self.connection()
        bad: dict[int, str] = {}
        take = _TAKE.format(key=int(LOCK_KEY), limit=int(self.batch_size))
        if self._open:
            take, self._open = "COMMIT;\n" + take, False
        try:
            cursor = await conn.execute(take.encode(), prepare=False)
            while cursor.nextset():  # past COMMIT's and BEGIN's results, to the batch
                pass
            replied = await cursor.fetchall()
            held = bool(replied and replied[0][0])
            rows = [(row_id, stream, fields) for _, row_id, stream, fields in replied if row_id]
            if not held:
                await conn.execute(b"ROLLBACK")
                return None
            good: list[tuple[int, str, dict[str, str]]] = []
            for row_id, stream, fields in rows:
                try:
                    good.append((row_id, stream or "", entry_fields(fields, stream)))
                except Unpublishable as exc:
                    bad[row_id] = str(exc)
            if good:
                applied = await self._apply(good)
                # A row's trace continues in a PRODUCER span; its entry carries that span onward.
                parents = [f.get("traceparent", "") for _, _, f in good]
                with tracing.continued(
                    "catalog.outbox.relay", parents, kind=SpanKind.PRODUCER
                ) as carried:
                    entries = [
                        (s, _fields(f, tp if tp != parent else None, row_id in applied))
                        for (row_id, s, f), parent, tp in zip(good, parents, carried, strict=True)
                    ]
                    replies = await self.publisher.publish_entries(entries)
                for (row_id, _, _), reply in zip(good, replies, strict=True):
                    if isinstance(reply, TRANSIENT):
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
            if chain and (len(rows) == self.batch_size or await _next_notification(conn, 0)):
                self._open = True
                self.chained += 1
            else:
                await conn.execute(b"COMMIT")
        except BaseException:
            # Marks not committed are rolled back; a broken connection is dropped by run().
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error, OSError):
                    await conn.execute(b"ROLLBACK")
            raise
        sent = len(rows) - len(bad)
        self.published += sent
        metrics.OUTBOX_PUBLISHED.inc(sent)
        if bad:
            self.failed += len(bad)
            metrics.OUTBOX_FAILED.inc(len(bad))
            for row_id, reason in bad.items():
                log.warning("outbox row %d set aside: %s", row_id, reason[:MAX_ERROR])
        return len(rows)

    async def _apply(self, rows: Sequence[tuple[int, str, dict[str, str]]]) -> set[int]:
        """The fast path: apply the invalidations of the rows bound for the event stream before
        they are published; the ids of the rows applied. An entry that does not parse, a
        ``price_rule.changed`` whose scope needs a lookup, and a batch whose invalidation fails
        for a reason other than the connection are left to the consumer (which retries and
        dead-letters with the reason); a lost connection aborts the pass, retried whole."""
        if self.apply is None:
            return set()
        ours = self.publisher.keys.stream
        events: list[tuple[int, Event]] = []
        for row_id, stream, fields in rows:
            if stream in ("", ours):
                with contextlib.suppress(ParseError):
                    event = parse(fields)
                    if scope_to_resolve(event) is None:  # a lookup is the consumer's job
                        events.append((row_id, event))
        applied: set[int] = set()
        # In chunks, as the consumer reads them: a full batch of 100-id entries in one script
        # would hold Redis for every reader while it deletes tens of thousands of keys.
        for k in range(0, len(events), APPLY_CHUNK):
            chunk = events[k : k + APPLY_CHUNK]
            try:
                await self.apply(invalidation_for(event for _, event in chunk))
            except TRANSIENT:
                raise
            except Exception as exc:
                log.warning("outbox relay left %d entries to the consumer: %s", len(chunk), exc)
                continue
            now_ms = time.time() * 1000
            for _, event in chunk:
                metrics.END_TO_END_SECONDS.observe(max(0.0, now_ms - event.occurred_at_ms) / 1000)
            applied.update(row_id for row_id, _ in chunk)
        self.applied += len(applied)
        return applied

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
            options="-c synchronous_commit=off -c enable_bitmapscan=off",
        )
        try:
            await conn.execute(_LISTEN)
        except BaseException:
            await _close(conn)
            raise
        self._conn = conn
        return conn

    async def finish(self) -> None:
        """COMMIT a chained pass's transaction, if one is open."""
        if self._open and self._conn is not None:
            self._open = False
            await self._conn.execute(b"COMMIT")

    async def close(self) -> None:
        self._open = False  # an open transaction is rolled back: those rows go out again
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
                    await self.relay_once(chain=True)
                    more = self._open  # a chained pass: more rows are waiting already
                    if self.passes % 10_000 == 1:
                        await self.finish()
                        await self.purge_sent()
                    if not more:
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
            with contextlib.suppress(psycopg.Error, OSError):
                await self.finish()
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


def _fields(fields: dict[str, str], traceparent: str | None, applied: bool) -> dict[str, str]:
    """A row's XADD fields: the trace context carried on, and ``applied`` set only by us."""
    if traceparent is None and not applied and APPLIED not in fields:
        return fields
    out = {k: v for k, v in fields.items() if k != APPLIED}
    if traceparent is not None:
        out["traceparent"] = traceparent
    if applied:
        out[APPLIED] = "1"
    return out


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
