"""One member of the ``invalidator`` consumer group: read, invalidate, ack; reclaim; leave cleanly.

Invariants (docs/events.md explains them for operators):

* An entry is XACKed only after :meth:`CacheStore.invalidate` returned for its tags, or after it
  was copied to the dead-letter stream in the same MULTI as its XACK. A failed invalidation acks
  nothing: the entry stays pending and is retried by the reclaim loop after ``claim_min_idle``.
* While a batch is in progress its entries are re-claimed by this consumer every ``min_idle / 3``
  (XCLAIM JUSTID resets the idle time without counting a delivery), so a slow batch of a live
  consumer is never taken over; only a dead or stalled consumer's entries go idle.
* Each entry is judged alone: a malformed entry, an unknown type, or any exception while parsing
  it goes to the dead-letter stream at once, with its reason, and never takes a neighbour along.
  A valid entry is always attempted, however often it was delivered; one whose invalidation
  fails is left pending and dead-lettered only when it fails on its ``max_deliveries``-th
  delivery. Connection errors and timeouts are nobody's fault: they ack nothing and count
  against no entry. Nothing blocks the group, and no entry's data can end the loops.
* A ``price_rule.changed`` that names only a category or brand (no ``product_ids``) is voided by
  product id: its scope's products are looked up in PostgreSQL (:mod:`invalidator.scopes`) and
  invalidated ``CATALOG_INVALIDATOR_RESOLVE_BATCH`` at a time. A consumer without database
  access (``CATALOG_INVALIDATOR_RESOLVE_SCOPES=false``) dead-letters it at once with that reason;
  a failed lookup counts as a failed invalidation of that entry alone.
* The consumer leaves the group (XGROUP DELCONSUMER, which drops pending entries) only after
  checking it holds none; otherwise it stays registered and others reclaim its entries.
* The blocking read runs on its own connection whose socket timeout exceeds BLOCK; stopping
  interrupts it with CLIENT UNBLOCK (never by cancelling, which could lose a reply whose entries
  are already in our pending list) and the reply is read to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core import tracing
from core.cache.store import CacheStore
from core.events import (
    Event,
    Invalidation,
    ParseError,
    RawFields,
    Scope,
    invalidation_for,
    parse,
    scope_to_resolve,
)
from core.keys import Keys, Tag
from core.redisclient import (
    ReaderId,
    RedisClient,
    ReplicaWait,
    cancel_pending,
    reader_id,
    transaction,
    unblock,
)
from invalidator import metrics
from invalidator.deadletter import dead_letter_fields
from invalidator.scopes import ScopeResolver
from invalidator.settings import InvalidatorSettings

log = logging.getLogger(__name__)

Entry = tuple[bytes, RawFields | None]
Letter = tuple[bytes, RawFields | None, str]
# Failures of the connection, not of an entry: they propagate, and nothing is acked.
TRANSIENT = (RedisConnectionError, RedisTimeoutError)


async def apply_invalidation(store: CacheStore, invalidation: Invalidation) -> int:
    """Delete what ``invalidation`` voids; the consumer and the outbox relay's fast path both
    come here. Returns the number of keys deleted."""
    n = await store.invalidate(invalidation.tags, invalidation.min_versions)
    metrics.KEYS_DELETED.inc(n)
    return n


def _no_database(event: Event, scope: Scope) -> str:
    return (
        f"{event.type} names {scope.kind} {scope.id[:40]!r} without product_ids, and this "
        "invalidator does not look products up in PostgreSQL "
        "(CATALOG_INVALIDATOR_RESOLVE_SCOPES=false): re-drive it where one does"
    )


def _describe(exc: Exception) -> str:
    """A bounded, one-line description of an exception (it may go to a dead letter)."""
    detail = " ".join(str(exc).split())[:200]
    return type(exc).__name__ + (f": {detail}" if detail else "")


@dataclass(slots=True)
class Stats:
    """Counters of this consumer (metrics are per process; tests and logs read these)."""

    processed: int = 0
    failed: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    reclaim_passes: int = 0
    idle_reads: int = 0
    errors: int = 0


def _entries(reply: Any) -> list[Entry]:
    """Entries of an XREADGROUP reply for one stream (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [e for entries in reply.values() for e in entries[0]]
    return [(entry_id, fields) for entry_id, fields in reply[0][1]]


class Consumer:
    def __init__(
        self,
        redis: RedisClient,
        reader: RedisClient,
        store: CacheStore,
        keys: Keys,
        settings: InvalidatorSettings,
        name: str,
        scopes: ScopeResolver | None = None,
        replicas: ReplicaWait | None = None,
    ) -> None:
        """``reader`` is used only for the blocking XREADGROUP; its socket timeout must exceed
        BLOCK (:attr:`InvalidatorSettings.read_timeout_s`). ``scopes`` looks up the products of a
        category or brand; without it, events that need one are dead-lettered. ``replicas``: the
        WAIT between a batch's invalidation and its ack (none by default)."""
        self.redis = redis
        self.replicas = replicas or ReplicaWait(keys)
        self.reader = reader
        self.store = store
        self.keys = keys
        self.settings = settings
        self.name = name
        self.scopes = scopes
        self.stats = Stats()
        self.ready = False
        self._stopping = asyncio.Event()
        self._reader_id: ReaderId | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`serve` to finish the batch in hand, drain, and leave (signal-safe)."""
        self._stopping.set()

    async def serve(self) -> bool:
        """Run until :meth:`stop`; True if the consumer left the group holding nothing."""
        await self.ensure_group()
        await self.drain_own()
        self.ready = True
        unblocker = asyncio.create_task(self._unblock_on_stop())
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._consume())
                tasks.create_task(self._reclaim_loop())
        finally:
            self.ready = False
            unblocker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await unblocker
        try:
            await self.drain_own()
            return await self.leave()
        except RedisError as exc:
            log.warning("could not drain or leave the group cleanly: %s", exc)
            return False

    async def ensure_group(self) -> None:
        """Create the group (and the stream) if missing, reading from the stream's start."""
        try:
            await self.redis.xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def drain_own(self) -> None:
        """Process entries already delivered to this name (after a restart, or the last read)."""
        last: bytes | str = "0"
        while True:
            reply = await self.redis.xreadgroup(
                self.keys.group,
                self.name,
                {self.keys.stream: last},
                count=self.settings.invalidator_batch_size,
            )
            entries = _entries(reply)
            if not entries:
                return
            await self.process(entries, await self._deliveries(entries))
            last = entries[-1][0]

    async def leave(self) -> bool:
        """XGROUP DELCONSUMER, but only when nothing is pending for us (it would drop them)."""
        held = await self.redis.xpending_range(
            self.keys.stream, self.keys.group, "-", "+", 1, consumername=self.name
        )
        if held:
            log.warning("consumer %s keeps its pending entries for reclaim", self.name)
            return False
        await self.redis.xgroup_delconsumer(self.keys.stream, self.keys.group, self.name)
        return True

    # -- loops -------------------------------------------------------------------------------

    async def _consume(self) -> None:
        while not self._stopping.is_set():
            try:
                entries = await self._read_new()
                if entries:
                    await self.process(entries)
                else:
                    self.stats.idle_reads += 1
            except ResponseError as exc:
                if not str(exc).startswith("NOGROUP"):
                    await self._failed_call("read/process", exc)
                    continue
                # Redis lost the stream and group (restarted empty, or someone deleted them).
                log.warning("consumer group is gone; recreating it")
                await self._recreate_group()
            except RedisError as exc:
                await self._failed_call("read/process", exc)
            except Exception:
                # A bug, not data (entries are judged one by one): keep consuming; the batch
                # stays pending and is retried.
                log.exception("consumer loop error")
                await self._failed_call("read/process", None)

    async def _recreate_group(self) -> None:
        try:
            await self.ensure_group()
        except RedisError as exc:
            await self._failed_call("recreate group", exc)

    async def _read_new(self) -> list[Entry]:
        # The connection the read will wait on (in cluster mode: on the stream's node).
        self._reader_id = await reader_id(self.reader, self.keys.stream, self._reader_id)
        try:
            reply = await self.reader.xreadgroup(
                self.keys.group,
                self.name,
                {self.keys.stream: ">"},
                count=self.settings.invalidator_batch_size,
                block=self.settings.invalidator_block_ms,
            )
        except RedisError:
            self._reader_id = None  # reconnects get a new client id
            raise
        return _entries(reply)

    async def _unblock_on_stop(self) -> None:
        """Repeats until the read loop is gone: a read sent just after one UNBLOCK would
        otherwise wait out its whole BLOCK. Cancelled by :meth:`serve`."""
        await self._stopping.wait()
        while True:
            if self._reader_id is not None:
                with contextlib.suppress(RedisError):
                    await unblock(self.redis, self._reader_id)
                if cancel_pending():  # see _heartbeat
                    raise asyncio.CancelledError
            await asyncio.sleep(0.05)

    async def _reclaim_loop(self) -> None:
        interval = self.settings.invalidator_claim_interval_ms / 1000
        while not await self._wait_stop(interval):
            try:
                await self.reclaim_once()
            except RedisError as exc:
                await self._failed_call("reclaim", exc)
            except Exception:
                log.exception("reclaim loop error")
                await self._failed_call("reclaim", None)

    async def reclaim_once(self) -> int:
        """One XAUTOCLAIM pass over the whole pending list (cursor followed to 0-0)."""
        cursor: bytes | str = "0-0"
        total = 0
        while not self._stopping.is_set():
            reply = await self.redis.xautoclaim(
                self.keys.stream,
                self.keys.group,
                self.name,
                self.settings.invalidator_claim_min_idle_ms,
                start_id=cursor,
                count=self.settings.invalidator_claim_count,
            )
            cursor, entries = reply[0], reply[1]
            if len(reply) > 2 and reply[2]:  # Redis 7: pending ids trimmed from the stream
                await self._ack(
                    [], [(i, None, "trimmed from the stream before processing") for i in reply[2]]
                )
            if entries:
                total += len(entries)
                self.stats.reclaimed += len(entries)
                metrics.RECLAIMED.inc(len(entries))
                await self.process(entries, await self._deliveries(entries))
            if cursor in (b"0-0", "0-0"):
                break
        self.stats.reclaim_passes += 1
        return total

    # -- one batch ---------------------------------------------------------------------------

    async def process(self, entries: Sequence[Entry], deliveries: Mapping[bytes, int] = {}) -> None:
        """Judge each entry alone, invalidate the valid ones' tags in one call, then dead-letter
        and ack in one MULTI. ``deliveries``: delivery counts (1 when absent: a first read)."""
        started = time.perf_counter()
        good: list[tuple[bytes, Event]] = []
        scoped: list[tuple[bytes, Scope]] = []
        dead: list[Letter] = []
        for entry_id, fields in entries:
            try:
                event = parse(fields)
                scope = scope_to_resolve(event)
                if scope is None:
                    invalidation_for([event])  # a mapping error is this entry's, not the batch's
            except ParseError as exc:
                dead.append((entry_id, fields, exc.reason))
            except Exception as exc:
                dead.append((entry_id, fields, "could not be parsed: " + _describe(exc)))
            else:
                if scope is not None and self.scopes is None:
                    dead.append((entry_id, fields, _no_database(event, scope)))
                    continue
                good.append((entry_id, event))
                if scope is not None:
                    scoped.append((entry_id, scope))
        # Entries the outbox relay applied before publishing them are acked as they are.
        pre_applied = [entry_id for entry_id, event in good if event.applied]
        if pre_applied:
            good = [(entry_id, event) for entry_id, event in good if not event.applied]
            skip = set(pre_applied)
            scoped = [(entry_id, scope) for entry_id, scope in scoped if entry_id not in skip]
        # Events carrying a write's trace continue it in a CONSUMER span (none with tracing off).
        with tracing.continued("catalog.invalidate", [e.traceparent for _, e in good]):
            async with self._holding([entry_id for entry_id, _ in entries]):
                in_scope = {entry_id for entry_id, _ in scoped}
                done, failed = await self._invalidate_events(
                    [(entry_id, e) for entry_id, e in good if entry_id not in in_scope]
                )
                for entry_id, scope in scoped:
                    try:
                        await self.invalidate_scope(scope)
                        done.append(entry_id)
                    except TRANSIENT:
                        raise
                    except Exception as exc:
                        failed.append(self._count_failed(entry_id, exc))
                if done and not await self.replicated():
                    done = []  # pending: reclaimed and applied again (invalidation is idempotent)
            done += pre_applied
            limit = self.settings.invalidator_max_deliveries
            raw = dict(entries)
            for entry_id, error in failed:
                n = deliveries.get(entry_id, 1)
                if n >= limit:
                    reason = f"invalidation failed on delivery {n} (max {limit}): {error}"
                    dead.append((entry_id, raw[entry_id], reason))
            await self._ack(done, dead)
        now_ms, applied = time.time() * 1000, set(done)
        for entry_id, event in good:
            if entry_id in applied:  # a set: a list made this quadratic in the batch size
                metrics.END_TO_END_SECONDS.observe(max(0.0, now_ms - event.occurred_at_ms) / 1000)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    async def replicated(self) -> bool:
        """The WAIT before an ack: every primary's writes, this batch's invalidations among
        them, are on ``CATALOG_REDIS_WAIT_REPLICAS`` replicas (True at once when that is 0). A
        failover loses only what no replica had, so nothing unreplicated is acked."""
        if await self.replicas(self.redis):
            return True
        metrics.REPLICA_WAIT_SHORT.labels("invalidator").inc()
        log.warning(
            "a batch's invalidations are on fewer than %d replicas: not acked",
            self.replicas.replicas,
        )
        return False

    async def invalidate(self, invalidation: Invalidation) -> int:
        """The one place the consumer deletes keys (a seam for tests that need a slow batch)."""
        return await apply_invalidation(self.store, invalidation)

    async def invalidate_scope(self, scope: Scope) -> int:
        """Void every product of ``scope`` by id: one lookup, one INVALIDATE per batch of ids."""
        assert self.scopes is not None
        n = products = 0
        batches = self.scopes.product_ids(scope, self.settings.invalidator_resolve_batch)
        async with contextlib.aclosing(batches):
            async for ids in batches:
                products += len(ids)
                n += await self.invalidate(Invalidation(frozenset(map(Tag.product, ids)), {}))
        log.info("%s %s: %d products looked up, %d keys deleted", scope.kind, scope.id, products, n)
        return n

    async def _invalidate_events(
        self, good: Sequence[tuple[bytes, Event]]
    ) -> tuple[list[bytes], list[tuple[bytes, str]]]:
        """(ids whose tags are gone, (id, error) of those that failed). One call for the batch;
        if it fails for a reason other than the connection (a script error caused by some
        entry's data), each event alone, so only the poison entry fails. Connection errors and
        timeouts propagate: nothing is acked."""
        if not good:
            return [], []
        try:
            await self.invalidate(invalidation_for(event for _, event in good))
            return [entry_id for entry_id, _ in good], []
        except TRANSIENT:
            raise
        except Exception as exc:
            if len(good) == 1:
                return [], [self._count_failed(good[0][0], exc)]
        done, failed = [], []
        for entry_id, event in good:
            try:
                await self.invalidate(invalidation_for([event]))
                done.append(entry_id)
            except TRANSIENT:
                raise
            except Exception as exc:
                failed.append(self._count_failed(entry_id, exc))
        return done, failed

    async def _ack(self, done: Sequence[bytes], dead: Sequence[Letter]) -> None:
        ids = [*done, *(entry_id for entry_id, _, _ in dead)]
        if not ids:
            return
        async with transaction(self.redis) as pipe:  # one slot: the streams share it
            for entry_id, fields, reason in dead:
                letter = dead_letter_fields(
                    fields, reason=reason, entry_id=entry_id, consumer=self.name
                )
                pipe.xadd(
                    self.keys.dead_letter_stream,
                    letter,  # type: ignore[arg-type]
                    maxlen=self.settings.invalidator_dead_letter_maxlen,
                    approximate=True,
                )
            pipe.xack(self.keys.stream, self.keys.group, *ids)
            await pipe.execute()
        for entry_id, _, reason in dead:
            log.warning("dead-lettered %s: %s", entry_id.decode(), reason)
        self.stats.processed += len(done)
        self.stats.dead_lettered += len(dead)
        metrics.PROCESSED.inc(len(done))
        metrics.DEAD_LETTERED.inc(len(dead))

    async def _deliveries(self, entries: Sequence[Entry]) -> dict[bytes, int]:
        """Delivery count of each entry (now pending for us), from one XPENDING range call."""
        rows = await self.redis.xpending_range(
            self.keys.stream,
            self.keys.group,
            entries[0][0],
            entries[-1][0],
            len(entries) + self.settings.invalidator_batch_size,
            consumername=self.name,
        )
        return {cast(bytes, row["message_id"]): int(row["times_delivered"]) for row in rows}

    @contextlib.asynccontextmanager
    async def _holding(self, ids: list[bytes]) -> AsyncIterator[None]:
        """Keep ``ids`` from going idle (and being reclaimed) while this batch is in progress."""
        task = asyncio.create_task(self._heartbeat(ids))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _heartbeat(self, ids: list[bytes]) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await self.redis.xclaim(
                    self.keys.stream,
                    self.keys.group,
                    self.name,
                    0,
                    cast(list[Any], ids),
                    justid=True,
                )
            except RedisError as exc:
                log.warning("heartbeat of %d in-progress entries failed: %s", len(ids), exc)
            if cancel_pending():  # the batch is done, but redis-py lost the cancellation
                raise asyncio.CancelledError

    # -- helpers -----------------------------------------------------------------------------

    def _count_failed(self, entry_id: bytes, exc: Exception) -> tuple[bytes, str]:
        error = _describe(exc)
        log.error("invalidation of %s failed: %s", entry_id.decode(), error)
        self.stats.failed += 1
        metrics.FAILED.inc()
        return entry_id, error

    async def _failed_call(self, what: str, exc: RedisError | None) -> None:
        self.stats.errors += 1
        if exc is not None:
            metrics.REDIS_ERRORS.inc()
            log.warning("%s failed: %s", what, exc)
        await self._wait_stop(self.settings.invalidator_retry_backoff_ms / 1000)

    async def _wait_stop(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as a stop was requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()
