"""The near cache's invalidation channel: Redis server-assisted client-side caching.

Per Redis node (the one server, or every primary of a cluster) two connections of our own:

* a *redirect* connection (RESP2) subscribed to ``__redis__:invalidate``;
* a *control* connection that turns on ``CLIENT TRACKING ON REDIRECT <id> BCAST PREFIX
  <products> PREFIX <heartbeats>``: the node then reports every change of a key under either
  prefix (written, deleted, expired, evicted, flushed) on the redirect connection, in the order
  it made them, whoever made them.

The control connection also writes this process's heartbeat, ``SET
<ns>:v3:nc:<process>:{<tag>}:<n>`` (a tag in the node's slots, a fresh key per beat so a key
evicted or expired early can never be mistaken for the next beat), and waits for the key's
invalidation to come back through the redirect connection. When it does, every change the node
made before the beat was written has been applied to the near cache (one ordered channel):
:meth:`NearCache.advance` records the instant the beat was *sent*. The near cache serves only
while the oldest node's such instant is at most ``CATALOG_NEAR_CACHE_MAX_STALENESS_MS`` old, so
any failure of the channel (a connection killed, Redis paused or slow, a network delay) turns
into misses within that bound, not into stale hits. redis-py's own pub/sub is not used: it
reconnects silently, after which tracking would still redirect to the dead connection and
invalidations would be lost without an error.

Cost: the channel runs on every server process all the time, beside the calls it serves, so
its steady state is callbacks, not tasks. redis-py opens and authenticates each connection
(TLS, ACL user, database: the service's own settings), then hands the transport to a
:class:`_Resp` protocol: hiredis parses what arrives, a reply goes to the callback of the
command it answers, a message to the channel. A beat is one write, made by the first
near-cache lookup after it is due (:attr:`NearCache.beat_due`), and two reads (its reply, its
invalidation) that complete it: no task, future or timeout per beat, and no timer to wake a
busy server (on a small VM a wake-up from idle costs as much CPU as a call). A timer sends the
beat only in a lull (twice the interval without a lookup); after ``IDLE_S`` without lookups the
beats stop until the next one. A cluster's topology checks, rare, are tasks.

A session ends (and the near cache is emptied) when a connection fails, a beat does not come
back within ``broken_after_s`` (a watchdog looks every quarter of it), a node flushes its data
(the invalidation of ``null``: emptied, the session goes on), or the cluster's set of primaries
changes (a failover, a node added). The next session starts after ``RETRY_S`` with the nodes
known then.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from core import metrics
from core.cache.near import NearCache
from core.clusterclient import Cluster
from core.keys import LEASE_SUFFIX, Keys
from core.redisclient import RedisClient, slot_tag

log = logging.getLogger(__name__)

CHANNEL = b"__redis__:invalidate"
#: Wait before the next session after one ended.
RETRY_S = 0.2
#: The channel stops beating after this long without a near-cache lookup, until the next one:
#: an idle process costs Redis and its own CPU nothing.
IDLE_S = 1.0
#: A cluster session compares its primaries with the cluster's at least every this many beats,
#: even when the config epoch did not move.
FULL_CHECK_BEATS = 100

#: What a reply callback is given: the reply, or the error that ended the connection first.
Reply = Callable[[Any], None]


class ChannelBroken(Exception):
    """The channel can no longer prove it is up to date: start a new session."""


class Tracking:
    """Keeps ``near`` in step with ``redis`` until cancelled (:meth:`run`)."""

    def __init__(
        self,
        redis: RedisClient,
        near: NearCache,
        keys: Keys,
        heartbeat_s: float,
        broken_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.near = near
        self.heartbeat_s = heartbeat_s
        self.broken_after_s = broken_after_s
        self.clock = clock
        self.products = keys.product_prefix
        self.beats = keys.heartbeat_prefix(uuid.uuid4().hex[:12])
        #: Set while a session has every node's channel open (tests wait on it).
        self.tracking = asyncio.Event()
        self.sessions = 0
        #: On a cluster, ``host:port`` of the primaries this session tracks; None standalone.
        self.tracked: set[str] | None = None
        #: The current session's channels, one per node (for metrics and tests).
        self.channels: list[_NodeChannel] = []
        self._ended: asyncio.Future[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        near.on_due = self._due

    async def run(self) -> None:
        while True:
            reason = "error"
            try:
                await self._session()
            except ChannelBroken as exc:
                reason = str(exc).split(":", 1)[0]
                log.warning("near cache channel: %s; emptied, reconnecting", exc)
            except (RedisError, OSError) as exc:
                log.warning(
                    "near cache channel lost (%s: %s); emptied, reconnecting",
                    type(exc).__name__,
                    exc,
                )
            except Exception:  # a bug, or a reply of a shape not foreseen: never stop for good
                reason = "bug"
                log.exception("near cache channel failed; emptied, reconnecting")
            finally:
                self.tracking.clear()
                self.near.reset([])  # serve nothing until the next session proves itself
            metrics.NEAR_RESETS.labels(reason).inc()
            if isinstance(self.redis, Cluster):
                self.redis.refresh()  # a failed node may be why: learn the slot map again
            await asyncio.sleep(RETRY_S)

    def fail(self, exc: BaseException) -> None:
        """End the session with ``exc`` (the first failure wins)."""
        if self._ended is not None and not self._ended.done():
            self._ended.set_exception(exc)

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        ended = self._ended = loop.create_future()
        channels: list[_NodeChannel] = []
        try:
            nodes = await self._nodes()
            cluster = isinstance(self.redis, Cluster)
            self.tracked = {name for name, _, _ in nodes} if cluster else None
            channels = [_NodeChannel(self, name, client, slot) for name, client, slot in nodes]
            self.channels = channels
            async with asyncio.timeout(self.broken_after_s):  # a paused node cannot hang it
                for channel in channels:
                    await channel.open()
            # Tracking is on everywhere: from here on no change can go unreported. Entries read
            # before are dropped, and tickets taken before are void (the epoch).
            self.near.reset([c.name for c in channels])
            self.sessions += 1
            self.tracking.set()
            for channel in channels:
                channel.send_beat()
            self._watchdog = loop.call_later(self.broken_after_s / 4, self._watch)
            await ended  # raises what ended the session
        finally:
            self._ended = None
            self.near.beat_due = float("inf")
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            for channel in channels:
                channel.close()
            if ended.done() and not ended.cancelled():
                ended.exception()  # retrieved: a failure while opening was raised there

    def _due(self) -> None:
        """A lookup came when a heartbeat was due: send it (:attr:`NearCache.beat_due`). Runs
        inside the lookup, so nothing of the channel's may reach the caller: a failure ends
        the session instead."""
        try:
            now = self.clock()
            for channel in self.channels:
                channel.due_now(now)
            self.schedule()
        except Exception as exc:
            self.fail(exc)

    def schedule(self) -> None:
        """The next lookup from which a heartbeat is due on some node (none between sessions)."""
        if self._ended is None:
            self.near.beat_due = float("inf")
            return
        self.near.beat_due = min((c.due_at for c in self.channels), default=float("inf"))

    def _watch(self) -> None:
        """Fail the session if a beat has been out longer than ``broken_after_s``."""
        now = self.clock()
        for channel in self.channels:
            if channel.in_flight and now - channel.sent_at > self.broken_after_s:
                self.fail(
                    ChannelBroken(
                        f"stalled: no heartbeat back from {channel.name} within "
                        f"{self.broken_after_s:.1f}s"
                    )
                )
                return
        self._watchdog = asyncio.get_running_loop().call_later(self.broken_after_s / 4, self._watch)

    async def _nodes(self) -> list[tuple[str, Redis, int]]:
        """(name, client, a slot of its own) of every node to track. The highest slot: a
        reshard moves a node's lowest slots first."""
        redis = self.redis
        if isinstance(redis, Cluster):
            await redis.ready()
            out = []
            for node in redis.get_primaries():
                slots = [s for s, nodes in redis.nodes_manager.slots_cache.items()
                         if nodes and nodes[0].name == node.name]  # fmt: skip
                if slots:
                    out.append((node.name, redis.node_client(node), max(slots)))
            if not out:
                raise ChannelBroken("nodes: the cluster client knows no primary with slots")
            return out
        if not isinstance(redis, Redis):
            raise TypeError("the near cache needs a client built by core.redisclient.connect")
        kwargs = redis.connection_pool.connection_kwargs
        return [(f"{kwargs.get('host', 'redis')}:{kwargs.get('port', '')}", redis, 0)]


def pack(*args: bytes | str | int) -> bytes:
    """One command in RESP2."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        value = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(value), value))
    return b"".join(out)


class _Resp(asyncio.Protocol):
    """A connection redis-py opened and authenticated, read from here on by hiredis: each reply
    goes to the callback of the command it answers (in order), anything else (a pub/sub
    message) to ``on_message``. An error reply is a ``hiredis.ReplyError`` instance. When the
    connection ends, the callbacks still waiting get the error, then ``on_lost``."""

    def __init__(
        self, on_message: Callable[[Any], None] | None, on_lost: Callable[[BaseException], None]
    ) -> None:
        self._parser = hiredis.Reader()
        self._waiting: deque[Reply] = deque()
        self._on_message = on_message
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._error: BaseException | None = None
        self._writer: asyncio.StreamWriter | None = None

    @classmethod
    def take_over(
        cls,
        conn: AbstractConnection,
        on_message: Callable[[Any], None] | None,
        on_lost: Callable[[BaseException], None],
    ) -> _Resp:
        """Read ``conn`` from now on. Only right after its handshake: nothing can be buffered
        then (RESP2 sends nothing unasked, and this connection has asked nothing yet)."""
        writer = conn._writer  # redis-py's stream of the open connection
        if writer is None:
            raise ConnectionError("the connection is not open")
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        protocol = cls(on_message, on_lost)
        # Ours from now on: redis-py's connection forgets it (or it would close it when
        # collected), and the writer lives as long as the transport (asyncio closes a
        # StreamWriter's transport when the writer is collected).
        conn._writer = conn._reader = None
        protocol._writer = writer
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def send(self, data: bytes, *replies: Reply) -> None:
        """Write ``data`` (packed commands); ``replies`` get their replies, in order, or the
        error that ended the connection."""
        if self._error is not None:  # the connection ended (and said so): never written
            for reply in replies:
                reply(self._error)
            return
        assert self._transport is not None
        self._waiting.extend(replies)
        self._transport.write(data)

    def request(self, *args: bytes | str | int) -> asyncio.Future[Any]:
        """One command; its reply (an error reply raises ``ResponseError``)."""
        future = asyncio.get_running_loop().create_future()

        def reply(value: Any) -> None:
            if future.done():
                return
            if isinstance(value, hiredis.ReplyError):
                future.set_exception(ResponseError(str(value)))
            elif isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(value)

        self.send(pack(*args), reply)
        return future

    def data_received(self, data: bytes) -> None:
        try:
            parser = self._parser
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if self._waiting:
                    self._waiting.popleft()(reply)
                elif self._on_message is not None:
                    self._on_message(reply)
                else:
                    raise ChannelBroken(f"error: a reply nothing asked for: {reply!r:.100}")
        except Exception as exc:  # the channel's own verdicts (ChannelBroken), hiredis's, bugs
            self.fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionError("Redis closed the connection"))

    def fail(self, exc: BaseException) -> None:
        """End this connection with ``exc``, once."""
        if self._error is not None:
            return
        self._error = exc
        waiting, self._waiting = self._waiting, deque()
        for reply in waiting:
            reply(exc)
        if self._transport is not None:
            self._transport.abort()
        self._on_lost(exc)

    def close(self) -> None:
        """Drop the connection at once (not ``close()``: a paused Redis would keep it open);
        nothing is reported after this."""
        if self._error is None:
            self._error = ConnectionError("closed by the near cache channel")
        if self._transport is not None:
            self._transport.abort()


class _NodeChannel:
    """The two connections of one node, its heartbeat and its reader."""

    def __init__(self, owner: Tracking, name: str, client: Redis, slot: int) -> None:
        self.owner = owner
        self.name = name
        self.client = client
        self.cluster = owner.tracked is not None  # (set before the channels are made)
        self.beat_prefix_b = owner.beats.encode()  # any beat of this process
        self.avoid: set[int] = set()  # slots a beat was redirected from in this session
        self.tag(slot)
        self.products_b = owner.products.encode()
        self.sub: _Resp | None = None
        self.ctl: _Resp | None = None
        self.ttl_ms = str(int(owner.broken_after_s * 4000) + 1000)
        #: The beat out now: when it was sent, its number and key, its reply and its return.
        self.in_flight = False
        self.sent_at = 0.0
        self.number = 0
        self._expected = b""
        self._replied = self._back = False
        self._info: Any = b""  # the CLUSTER INFO reply sent with the beat
        self.epoch = b""  # the cluster's config epoch when the topology was last checked
        #: When the next beat is due (monotonic; inf while one is out): the first lookup from
        #: then on sends it, or, if none comes, the timer at twice the interval.
        self.due_at = float("inf")
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Future[None] | None = None
        self._reads_seen = -1  # near-cache lookups when last looked at (see _next)
        self._active_at = 0.0

    def tag(self, slot: int) -> None:
        """Beat in ``slot`` from now on (standalone: any)."""
        self.slot = slot
        self.beat_prefix = self.owner.beats + "{" + slot_tag(slot) + "}:"

    async def _connect(self, on_message: Callable[[Any], None] | None) -> _Resp:
        """A connection of our own to the node, opened and authenticated by redis-py as the
        service's are (RESP2, no retries: a failure ends the session), then read by us."""
        pool = self.client.connection_pool
        options: dict[str, Any] = dict(pool.connection_kwargs)
        options.update(protocol=2, socket_timeout=None, retry=Retry(NoBackoff(), 0))
        conn = pool.connection_class(**options)
        await conn.connect()  # type: ignore[no-untyped-call]
        return _Resp.take_over(conn, on_message, self.owner.fail)

    async def open(self) -> None:
        self.sub = await self._connect(self._on_message)
        client_id = await self.sub.request("CLIENT", "ID")
        confirm = await self.sub.request("SUBSCRIBE", CHANNEL)
        if not (isinstance(confirm, list) and confirm[0] == b"subscribe"):
            raise ChannelBroken(f"error: unexpected SUBSCRIBE reply {confirm!r}")
        self.ctl = await self._connect(None)
        await self.ctl.request(
            "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST",
            "PREFIX", self.owner.products, "PREFIX", self.owner.beats,
        )  # fmt: skip
        if self.cluster:
            # The nodes came from the client's slot map, which may be out of date.
            self.epoch = _config_epoch(await self.ctl.request("CLUSTER", "INFO"))
            await self.check_topology()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
        for conn in (self.sub, self.ctl):
            if conn is not None:
                conn.close()
        self.in_flight = False
        self.due_at = float("inf")

    # -- the redirect connection --------------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        """Apply invalidations in the order the node reports them."""
        if not isinstance(message, list) or len(message) != 3 or message[0] != b"message":
            return
        changed = message[2]
        near = self.owner.near
        if changed is None:  # FLUSHALL / FLUSHDB: everything changed
            near.reset()
            metrics.NEAR_RESETS.labels("flush").inc()
            return
        beats, products = self.beat_prefix_b, self.products_b
        for key in changed:
            if key.startswith(beats):
                if key == self._expected:
                    self._back = True
                    self._maybe_done()
            elif key.startswith(products) and not key.endswith(_LEASE):
                metrics.NEAR_INVALIDATIONS.inc()
                # Any bytes (a key written by hand): never an error that ends the session.
                near.invalidate(key.decode(errors="surrogateescape"))

    # -- the heartbeat ----------------------------------------------------------------------------

    def send_beat(self) -> None:
        """Write the next heartbeat. On a cluster the same write asks the node for the
        cluster's config epoch: when it moved, the primaries are compared with those tracked
        before the beat may count."""
        assert self.ctl is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.due_at = float("inf")
        self.number += 1
        self._expected = (self.beat_prefix + str(self.number)).encode()
        self._replied = self._back = False
        self.in_flight = True
        self.sent_at = self.owner.clock()
        beat = pack("SET", self._expected, b"1", "PX", self.ttl_ms)
        if self.cluster:
            self.ctl.send(_CLUSTER_INFO + beat, self._on_info, self._on_set)
        else:
            self.ctl.send(beat, self._on_set)

    def _on_info(self, reply: Any) -> None:
        self._info = reply

    def _on_set(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            text = str(reply)
            if self.cluster and text.startswith(("MOVED ", "ASK ")):
                # The beat's slot is moving or moved away (a reshard): beat in another slot of
                # this node's; the primaries are checked first.
                self._spawn(self._retag())
                return
            raise ChannelBroken(f"error: {self.name} refused a heartbeat: {text}")
        if isinstance(reply, BaseException):
            return  # the connection failed: the session is ending
        if self.cluster:
            if isinstance(self._info, BaseException):
                raise ChannelBroken(f"error: CLUSTER INFO on {self.name}: {self._info}")
            epoch = _config_epoch(self._info)
            if epoch != self.epoch or self.number % FULL_CHECK_BEATS == 0:
                self._spawn(self._checked(epoch))
                return
        self._replied = True
        self._maybe_done()

    async def _retag(self) -> None:
        await self.check_topology(retag=True)
        self.send_beat()

    async def _checked(self, epoch: bytes) -> None:
        await self.check_topology()
        self.epoch = epoch
        self._replied = True
        self._maybe_done()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (a topology check) as a task; its failure ends the session."""
        self._task = task = asyncio.ensure_future(work)

        def done(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and (exc := task.exception()) is not None:
                self.owner.fail(exc)

        task.add_done_callback(done)

    def _maybe_done(self) -> None:
        """Once the beat is both acknowledged and back: every invalidation the node sent
        before the beat's own has been applied."""
        if not (self._replied and self._back):
            return
        self._replied = self._back = self.in_flight = False
        owner = self.owner
        owner.near.advance(self.name, self.sent_at)
        # The next beat goes with the first lookup after due_at: a server that is serving is
        # awake anyway, where a timer of its own would wake it (on a 2-core VM a wake-up from
        # idle costs about as much CPU as a call). The timer is for lulls shorter than IDLE_S.
        self.due_at = self.sent_at + owner.heartbeat_s
        self._timer = asyncio.get_running_loop().call_later(2 * owner.heartbeat_s, self._next)
        owner.schedule()

    def due_now(self, now: float) -> None:
        """A lookup came at ``now``: beat if one is due."""
        if not self.in_flight and now >= self.due_at:
            self._next()

    def _next(self) -> None:
        """Beat again while lookups come; after IDLE_S without any, stop until the next one
        (the watermark ages meanwhile, so the first lookups after it go to Redis).
        Invalidations are applied all along."""
        self._timer = None
        near = self.owner.near
        now = self.owner.clock()
        if near.reads != self._reads_seen:
            self._reads_seen, self._active_at = near.reads, now
        elif now - self._active_at >= IDLE_S:
            near.set_idle(True)  # due_at stays passed: the next lookup calls due_now
            return
        near.set_idle(False)
        self.send_beat()

    # -- the cluster's topology -------------------------------------------------------------

    async def check_topology(self, retag: bool = False) -> None:
        """Fail the session unless the primaries serving slots, as this node sees them, are
        the nodes it tracks (a failover, a node added, a node emptied). ``retag``: beat from
        now on in this node's highest slot (redis-cli moves a node's lowest slots first)."""
        assert self.ctl is not None
        assert self.owner.tracked is not None
        ranges = await self.ctl.request("CLUSTER", "SLOTS")
        seen = {_primary(r) for r in ranges}
        if seen != self.owner.tracked:
            raise ChannelBroken(f"topology: primaries now {sorted(seen)}")
        if retag:
            self.avoid.add(self.slot)
            mine = (
                slot
                for r in ranges
                if _primary(r) == self.name
                for slot in range(int(r[0]), int(r[1]) + 1)
            )
            slot = max((m for m in mine if m not in self.avoid), default=None)
            if slot is None:
                raise ChannelBroken(f"topology: {self.name} has no slot to beat in")
            self.tag(slot)


def _primary(slot_range: list[Any]) -> str:
    """``host:port`` of the primary of one CLUSTER SLOTS entry (redis-py's node name)."""
    return f"{slot_range[2][0].decode()}:{slot_range[2][1]}"


def _config_epoch(info: bytes) -> bytes:
    """``cluster_current_epoch`` from a CLUSTER INFO reply: it moves whenever a slot changes
    hands (a failover, a resharded slot)."""
    start = info.find(b"cluster_current_epoch:")
    return info[start : info.find(b"\r\n", start)] if start >= 0 else info


_LEASE = LEASE_SUFFIX.encode()
_CLUSTER_INFO = pack("CLUSTER", "INFO")
__all__ = ["ChannelBroken", "Tracking"]
