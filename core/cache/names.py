"""The per-process name table: category and brand names as pre-serialized fragments.

Cached products hold no names (core/cache/entry.py); a product is served as its stored bytes
followed by ``category {name}`` and ``brand {name}`` fragments from this table, with no Redis
request and no protobuf decode. Invariants:

* **TTL.** A fragment is served only while ``now - loaded_at < ttl``, where ``loaded_at`` is
  taken *before* the database read that produced it. So a name served by a read that starts at
  ``r`` was the name in PostgreSQL at an instant no earlier than ``r - ttl``, broadcast or not.
* **Broadcast.** The invalidator publishes ``c:<id>`` / ``b:<id>`` on the names channel after
  applying a rename; :meth:`NameTable.follow` drops that fragment and bumps :attr:`epoch`. A
  (re)connected subscription drops every fragment (messages may have been missed meanwhile).
* **Epoch fence.** A load installs its result only if :attr:`epoch` is unchanged since before its
  database read, so a load that raced a rename's broadcast never installs the old name; and a
  request never joins a load started before the current epoch. Reads that start after a
  broadcast is handled therefore never see the name it replaced.
* **Single flight.** All ids a request misses are loaded in one query; an id already being loaded
  in the current epoch is awaited, not loaded again. A load also refreshes every entry past half
  its TTL (up to ``REFRESH_AHEAD``), so hot names rarely expire on the request path.
* **PostgreSQL down.** If a load cannot reach PostgreSQL, an expired fragment (never one a
  broadcast dropped) is served instead of failing a read the cache could answer; without one
  the error propagates. No rename can commit while PostgreSQL is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence

from redis.exceptions import RedisError

from core import metrics
from core.cache.entry import HEADER_LEN
from core.db import is_connection_error
from core.keys import BRAND_NAME, CATEGORY_NAME
from core.redisclient import RedisClient, pubsub_client
from core.repository import Names, brand_fragment, category_fragment

log = logging.getLogger(__name__)

CATEGORY, BRAND = 0, 1
# Entries past half their TTL refreshed along with a load's missing ids (bounds one query).
REFRESH_AHEAD = 1000
# Wait before subscribing again after the subscription failed.
RESUBSCRIBE_S = 0.5
_FRAGMENT = (category_fragment, brand_fragment)
_PREFIX = {CATEGORY_NAME.encode(): CATEGORY, BRAND_NAME.encode(): BRAND}

LoadNames = Callable[[Sequence[str], Sequence[str]], Awaitable[Names]]
# (fragment, loaded_at) by id; ids are bytes as they appear in a cached entry.
_Table = dict[bytes, tuple[bytes, float]]
Fragments = tuple[dict[bytes, bytes], dict[bytes, bytes]]


class NameTable:
    """Fragments by category and brand id. ``clock`` is in seconds (monotonic)."""

    __slots__ = ("_clock", "_flights", "_half", "_load", "_tables", "_ttl", "epoch", "following")

    def __init__(
        self, load: LoadNames, ttl_ms: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._load = load
        self._ttl = ttl_ms / 1000.0
        self._half = self._ttl / 2.0
        self._clock = clock
        self._tables: tuple[_Table, _Table] = ({}, {})
        self._flights: dict[tuple[int, bytes, int], asyncio.Future[Fragments]] = {}
        self.epoch = 0
        #: Set while :meth:`follow` is subscribed (Redis confirmed it).
        self.following = asyncio.Event()

    def __len__(self) -> int:
        return len(self._tables[CATEGORY]) + len(self._tables[BRAND])

    def now(self) -> float:
        return self._clock()

    # -- serving -----------------------------------------------------------------------------

    def complete(self, raw: bytes) -> bytes | None:
        """A cached product entry (header included) as served: its ``Product`` bytes followed by
        both name fragments, if both are held and fresh; None sends the caller to
        :meth:`fragments`. Two searches, dictionary lookups and one copy: the hit path."""
        i = raw.index(b"\n", HEADER_LEN)
        j = raw.index(b"\n", i + 1)
        c = self._tables[CATEGORY].get(raw[HEADER_LEN:i])
        b = self._tables[BRAND].get(raw[i + 1 : j])
        if c is None or b is None:
            return None
        oldest = self._clock() - self._ttl
        if c[1] <= oldest or b[1] <= oldest:
            return None
        return b"".join((raw[j + 1 :], c[0], b[0]))

    def complete_all(self, raws: Iterable[bytes]) -> list[bytes] | None:
        """:meth:`complete` of every entry, or None as soon as one needs a load."""
        categories, brands = self._tables
        oldest = self._clock() - self._ttl
        out = []
        for raw in raws:
            i = raw.index(b"\n", HEADER_LEN)
            j = raw.index(b"\n", i + 1)
            c = categories.get(raw[HEADER_LEN:i])
            b = brands.get(raw[i + 1 : j])
            if c is None or b is None or c[1] <= oldest or b[1] <= oldest:
                return None
            out.append(b"".join((raw[j + 1 :], c[0], b[0])))
        return out

    def pair(self, category_id: bytes, brand_id: bytes) -> tuple[bytes, bytes] | None:
        """Both fragments by id, if both are held and fresh (what :meth:`complete` serves)."""
        c = self._tables[CATEGORY].get(category_id)
        b = self._tables[BRAND].get(brand_id)
        if c is None or b is None:
            return None
        oldest = self._clock() - self._ttl
        if c[1] <= oldest or b[1] <= oldest:
            return None
        return c[0], b[0]

    async def fragments(
        self, categories: Collection[bytes], brands: Collection[bytes]
    ) -> Fragments:
        """The fragment of every id given, loading those missing or expired in one query. Ids
        that do not exist in PostgreSQL are absent from the answer."""
        now, epoch = self._clock(), self.epoch
        found: Fragments = ({}, {})
        missing: tuple[list[bytes], list[bytes]] = ([], [])
        waits: dict[asyncio.Future[Fragments], list[tuple[int, bytes]]] = {}
        for kind, ids in ((CATEGORY, categories), (BRAND, brands)):
            table = self._tables[kind]
            for i in ids:
                hit = table.get(i)
                if hit is not None and now - hit[1] < self._ttl:
                    found[kind][i] = hit[0]
                elif (flight := self._flights.get((kind, i, epoch))) is not None:
                    waits.setdefault(flight, []).append((kind, i))
                else:
                    missing[kind].append(i)
        if missing[CATEGORY] or missing[BRAND]:
            flight = self._start(missing, epoch, now)
            waits.setdefault(flight, []).extend(
                (kind, i) for kind in (CATEGORY, BRAND) for i in missing[kind]
            )
        for flight, wanted in waits.items():
            try:
                loaded = await asyncio.shield(flight)
            except Exception as exc:
                self._serve_expired(wanted, found, exc)
                continue
            for kind, i in wanted:
                if (fragment := loaded[kind].get(i)) is not None:
                    found[kind][i] = fragment
        return found

    async def exist(self, category_id: str, brand_id: str) -> bool:
        """Do both exist (as of at most a TTL ago)? Lets a combined list filter naming an
        unknown category or brand answer empty without writing anything to Redis."""
        c, b = category_id.encode(), brand_id.encode()
        categories, brands = await self.fragments((c,), (b,))
        return c in categories and b in brands

    def _serve_expired(
        self, wanted: list[tuple[int, bytes]], found: Fragments, error: Exception
    ) -> None:
        """After a failed load: the expired fragments still held, else the load's error."""
        if not is_connection_error(error):
            raise error
        for kind, i in wanted:
            held = self._tables[kind].get(i)
            if held is None:
                raise error
            found[kind][i] = held[0]
        metrics.STALE_NAMES_SERVED.inc(len(wanted))

    # -- loading -----------------------------------------------------------------------------

    def _start(
        self, missing: tuple[list[bytes], list[bytes]], epoch: int, now: float
    ) -> asyncio.Future[Fragments]:
        """One load of the missing ids plus entries past half their TTL, registered as the
        flight of each of them in ``epoch``."""
        ids = (list(missing[CATEGORY]), list(missing[BRAND]))
        extra = 0
        for kind in (CATEGORY, BRAND):
            asked = set(ids[kind])
            for i, (_, loaded_at) in self._tables[kind].items():
                if extra >= REFRESH_AHEAD:
                    break
                if (
                    now - loaded_at >= self._half
                    and i not in asked
                    and ((kind, i, epoch) not in self._flights)
                ):
                    ids[kind].append(i)
                    extra += 1
        flight = asyncio.ensure_future(self._load_and_install(ids, epoch))
        flights = [(kind, i, epoch) for kind in (CATEGORY, BRAND) for i in ids[kind]]
        for f in flights:
            self._flights[f] = flight

        def done(task: asyncio.Future[Fragments]) -> None:
            for f in flights:
                if self._flights.get(f) is task:
                    del self._flights[f]
            if not task.cancelled():
                task.exception()  # retrieved, whoever awaited it

        flight.add_done_callback(done)
        return flight

    async def _load_and_install(
        self, ids: tuple[list[bytes], list[bytes]], epoch: int
    ) -> Fragments:
        loaded_at = self._clock()  # before the read: the TTL bounds the age of what it reads
        names = await self._load(
            [i.decode() for i in ids[CATEGORY]], [i.decode() for i in ids[BRAND]]
        )
        out: Fragments = (
            {i.encode(): category_fragment(n) for i, n in names.categories.items()},
            {i.encode(): brand_fragment(n) for i, n in names.brands.items()},
        )
        self._install(out, epoch, loaded_at)
        return out

    def install(self, names: Names, epoch: int, loaded_at: float) -> bool:
        """Install names read with product rows (a fill) at ``loaded_at``, if no broadcast
        arrived since ``epoch`` was read (before that read). Returns whether it installed."""
        return self._install(
            (
                {i.encode(): category_fragment(n) for i, n in names.categories.items()},
                {i.encode(): brand_fragment(n) for i, n in names.brands.items()},
            ),
            epoch,
            loaded_at,
        )

    def _install(self, fragments: Fragments, epoch: int, loaded_at: float) -> bool:
        if self.epoch != epoch:
            return False  # a rename was announced since this read began: it may be the old name
        for kind in (CATEGORY, BRAND):
            table = self._tables[kind]
            for i, fragment in fragments[kind].items():
                held = table.get(i)
                if held is None or held[1] <= loaded_at:
                    table[i] = (fragment, loaded_at)
        return True

    # -- broadcasts --------------------------------------------------------------------------

    def drop(self, message: bytes) -> None:
        """Apply one names-channel message (``c:<id>`` / ``b:<id>``); unknown ones drop all."""
        self.epoch += 1
        kind = _PREFIX.get(message[:2])
        if kind is None:
            self._tables[CATEGORY].clear()
            self._tables[BRAND].clear()
            return
        self._tables[kind].pop(message[2:], None)

    def drop_all(self) -> None:
        self.epoch += 1
        self._tables[CATEGORY].clear()
        self._tables[BRAND].clear()

    async def follow(self, redis: RedisClient, channel: str) -> None:
        """Apply the names channel until cancelled. Every (re)subscription drops every fragment
        once Redis confirmed it: messages published before it may have been missed."""
        me = asyncio.current_task()
        while True:
            pubsub = None
            try:
                pubsub = (await pubsub_client(redis)).pubsub()
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if me is not None and me.cancelling():
                        # redis-py's read timeout can swallow a cancellation that arrives as it
                        # expires: stopping would then wait forever.
                        raise asyncio.CancelledError
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self.drop_all()
                        self.following.set()
                    elif message["type"] == "message":
                        metrics.NAME_BROADCASTS.inc()
                        self.drop(message["data"])
            except (RedisError, OSError) as exc:
                self.following.clear()
                self.drop_all()  # nothing is known about what was missed
                log.warning("names channel lost (%s); subscribing again", type(exc).__name__)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(RESUBSCRIBE_S)
