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

A session ends (and the near cache is emptied) when a connection fails, a beat does not come
back within ``broken_after_s``, a node flushes its data (the invalidation of ``null``: emptied,
the session goes on), or the cluster's set of primaries changes (a failover, a node added).
The next session starts after ``RETRY_S`` with the nodes known then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AskError, MovedError, RedisError

from core import metrics
from core.cache.near import NearCache
from core.clusterclient import Cluster
from core.keys import LEASE_SUFFIX, Keys
from core.redisclient import RedisClient, slot_tag

log = logging.getLogger(__name__)

CHANNEL = b"__redis__:invalidate"
#: Wait before the next session after one ended.
RETRY_S = 0.2
#: The channel stops beating after this long without a near-cache lookup, and then looks for
#: one every IDLE_POLL_S: an idle process costs Redis and its own CPU next to nothing.
IDLE_S = 1.0
IDLE_POLL_S = 0.05
#: A cluster session compares its primaries with the cluster's at least every this many beats,
#: even when the config epoch did not move.
FULL_CHECK_BEATS = 100


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

    async def _session(self) -> None:
        nodes = await self._nodes()
        channels = [_NodeChannel(self, name, client, slot) for name, client, slot in nodes]
        self.tracked = {c.name for c in channels} if isinstance(self.redis, Cluster) else None
        self.channels = channels
        try:
            async with asyncio.timeout(self.broken_after_s):  # a paused node cannot hang it
                for channel in channels:
                    await channel.open()
            # Tracking is on everywhere: from here on no change can go unreported. Entries read
            # before are dropped, and tickets taken before are void (the epoch).
            self.near.reset([c.name for c in channels])
            self.sessions += 1
            self.tracking.set()
            tasks = [asyncio.ensure_future(c.receive()) for c in channels]
            tasks += [asyncio.ensure_future(c.beat()) for c in channels]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # raises what ended the session
                raise ChannelBroken("error: a channel task ended")  # pragma: no cover
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for channel in channels:
                await channel.close()

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


class _NodeChannel:
    """The two connections of one node, its heartbeat and its reader."""

    def __init__(self, owner: Tracking, name: str, client: Redis, slot: int) -> None:
        self.owner = owner
        self.name = name
        self.client = client
        self.beat_prefix_b = owner.beats.encode()  # any beat of this process
        self.avoid: set[int] = set()  # slots a beat was redirected from in this session
        self.tag(slot)
        self.products_b = owner.products.encode()
        self.sub: AbstractConnection | None = None
        self.ctl: AbstractConnection | None = None
        self.sent_at = 0.0
        self.number = 0
        self.returned = asyncio.Event()
        self._expected = b""  # the key of the beat in flight
        self.epoch = b""  # the cluster's config epoch when the topology was last checked
        self._reads_seen = -1  # near-cache lookups when last looked at (see _while_idle)
        self._active_at = 0.0

    def tag(self, slot: int) -> None:
        """Beat in ``slot`` from now on (standalone: any)."""
        self.slot = slot
        self.beat_prefix = self.owner.beats + "{" + slot_tag(slot) + "}:"

    def _connection(self) -> AbstractConnection:
        """A connection of our own to the node: RESP2, no retries (a failure ends the session),
        no socket timeout (the redirect connection blocks until a message comes; each beat on
        the control connection is bounded as a whole, see :meth:`beat`)."""
        pool = self.client.connection_pool
        options: dict[str, Any] = dict(pool.connection_kwargs)
        options.update(protocol=2, socket_timeout=None, retry=Retry(NoBackoff(), 0))
        return pool.connection_class(**options)

    async def open(self) -> None:
        self.sub = self._connection()
        await self.sub.connect()  # type: ignore[no-untyped-call]
        client_id = await self._call(self.sub, "CLIENT", "ID")
        await self.sub.send_command("SUBSCRIBE", CHANNEL)
        confirm = await self.sub.read_response()
        if not (isinstance(confirm, list) and confirm[0] == b"subscribe"):
            raise ChannelBroken(f"error: unexpected SUBSCRIBE reply {confirm!r}")
        self.ctl = self._connection()
        await self.ctl.connect()  # type: ignore[no-untyped-call]
        await self._call(
            self.ctl, "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST",
            "PREFIX", self.owner.products, "PREFIX", self.owner.beats,
        )  # fmt: skip
        if self.owner.tracked is not None:
            # The nodes came from the client's slot map, which may be out of date.
            self.epoch = _config_epoch(await self._call(self.ctl, "CLUSTER", "INFO"))
            await self.check_topology()

    @staticmethod
    async def _call(conn: AbstractConnection, *args: Any) -> Any:
        await conn.send_command(*args)
        return await conn.read_response()

    async def close(self) -> None:
        for conn in (self.sub, self.ctl):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.disconnect()

    async def receive(self) -> None:
        """Apply invalidations in the order the node reports them."""
        assert self.sub is not None
        owner = self.owner
        products, beats = self.products_b, self.beat_prefix_b
        while True:
            message = await self.sub.read_response()
            if not isinstance(message, list) or len(message) != 3 or message[0] != b"message":
                continue
            changed = message[2]
            if changed is None:  # FLUSHALL / FLUSHDB: everything changed
                owner.near.reset()
                metrics.NEAR_RESETS.labels("flush").inc()
                continue
            for key in changed:
                if key.startswith(beats):
                    if key == self._expected:
                        self.returned.set()
                elif key.startswith(products) and not key.endswith(_LEASE):
                    metrics.NEAR_INVALIDATIONS.inc()
                    # Any bytes (a key written by hand): never an error that ends the session.
                    owner.near.invalidate(key.decode(errors="surrogateescape"))

    async def beat(self) -> None:
        """Write a heartbeat, wait for it to come back, advance the watermark, pause; until
        something fails. On a cluster each beat first asks the node for the cluster's config
        epoch (same write, so no extra round trip): when it moved, the primaries are compared
        with those tracked before the beat may count.

        A beat costs one write and three wake-ups (its reply, its invalidation, the pause):
        the control connection has no socket timeout (redis-py would run every send and read
        under ``wait_for``, a task each); one ``asyncio.timeout`` bounds the whole beat."""
        assert self.ctl is not None
        ctl, owner = self.ctl, self.owner
        ttl_ms = str(int(owner.broken_after_s * 4000) + 1000)
        cluster = owner.tracked is not None
        while True:
            self.number += 1
            self._expected = (self.beat_prefix + str(self.number)).encode()
            beat = ("SET", self._expected, b"1", "PX", ttl_ms)
            self.returned.clear()
            self.sent_at = owner.clock()
            try:
                async with asyncio.timeout(owner.broken_after_s):
                    if cluster:
                        await ctl.send_packed_command(
                            ctl.pack_commands([("CLUSTER", "INFO"), beat]), check_health=False
                        )
                        info = await ctl.read_response()
                        try:
                            await ctl.read_response()
                        except (AskError, MovedError):
                            # The beat's slot is moving or moved away (a reshard): beat in
                            # another slot of this node's; the primaries are checked first.
                            await self.check_topology(retag=True)
                            continue
                        epoch = _config_epoch(info)
                        if epoch != self.epoch or self.number % FULL_CHECK_BEATS == 0:
                            await self.check_topology()
                            self.epoch = epoch
                    else:
                        await ctl.send_packed_command(ctl.pack_command(*beat), check_health=False)
                        await ctl.read_response()
                    await self.returned.wait()
            except TimeoutError:
                raise ChannelBroken(
                    f"stalled: no heartbeat back from {self.name} within "
                    f"{owner.broken_after_s:.1f}s"
                ) from None
            # Every invalidation the node sent before the beat's own has been applied.
            owner.near.advance(self.name, self.sent_at)
            await asyncio.sleep(owner.heartbeat_s)
            await self._while_idle()

    async def _while_idle(self) -> None:
        """Return at once while lookups come; after IDLE_S without any, until the next one
        (the watermark ages meanwhile, so the first lookups after it go to Redis). Invalidations
        are applied all along."""
        near = self.owner.near
        now = self.owner.clock()
        if near.reads != self._reads_seen:
            self._reads_seen, self._active_at = near.reads, now
            return
        if now - self._active_at < IDLE_S:
            return
        near.set_idle(True)
        try:
            while near.reads == self._reads_seen:  # noqa: ASYNC110 (get() stays signal-free)
                await asyncio.sleep(IDLE_POLL_S)
        finally:
            near.set_idle(False)
        self._reads_seen, self._active_at = near.reads, self.owner.clock()

    async def check_topology(self, retag: bool = False) -> None:
        """Fail the session unless the primaries serving slots, as this node sees them, are
        the nodes it tracks (a failover, a node added, a node emptied). ``retag``: beat from
        now on in this node's highest slot (redis-cli moves a node's lowest slots first)."""
        assert self.ctl is not None
        assert self.owner.tracked is not None
        ranges = await self._call(self.ctl, "CLUSTER", "SLOTS")
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
__all__ = ["ChannelBroken", "Tracking"]
