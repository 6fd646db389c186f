"""Every Redis client of the project is built here, for one Redis or a Redis Cluster.

``CATALOG_REDIS_MODE`` picks the kind: ``standalone`` builds ``redis.asyncio.Redis`` on
``CATALOG_REDIS_URL``; ``cluster`` builds :class:`core.clusterclient.Cluster` (a repaired
``redis.asyncio.RedisCluster``), for which the URL names any node and the others are discovered.
Credentials, TLS (``rediss://`` and its ``ssl_*`` query parameters) and timeouts apply to every
node alike. Cluster clients send every command to the primary of its slot: a replica may still
hold a value its primary has already invalidated, so nothing reads from replicas.

Besides :func:`connect`, the few things that differ between the two kinds live here, so callers
never ask which one they hold: :func:`transaction` (MULTI/EXEC on the node of the commands'
slot), :class:`ReplicaWait` (``WAIT`` after writes, on every node that took them) and the id of
a blocking reader's connection (:func:`reader_id`, :func:`unblock`). Lua scripts run through
:class:`core.redisscript.Script`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeAlias, cast

import redis
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import AskError, ClusterDownError, RedisError, TryAgainError

from core.clusterclient import Cluster, ClusterUnavailable, CrossSlot, SlotTransaction
from core.keys import Keys
from core.settings import PREFIX, Settings, SettingsError

#: Either kind of client: what every function taking "a Redis" accepts.
RedisClient: TypeAlias = Redis | RedisCluster


def connect(
    settings: Settings,
    *,
    socket_timeout: float | None = None,
    connect_timeout: float | None = None,
    max_connections: int | None = None,
    pool_timeout: float | None = None,
    single_connection: bool = False,
    retries: int | None = None,
) -> RedisClient:
    """A client for ``settings.redis_url`` of the kind ``settings.redis_mode`` names.

    ``socket_timeout``/``connect_timeout``: default the settings' read-path values.
    ``max_connections``: the pool size (per node in cluster mode); with ``pool_timeout`` a
    caller waits up to that long for a free connection instead of failing at once.
    ``single_connection``: one connection (per node in cluster mode), for blocking reads whose
    connection must be known (:func:`reader_id`). ``retries``: attempts after a connection
    error or timeout (default: redis-py's); the read path passes 0 (its breaker decides).
    No I/O happens here: a cluster client learns the slot map on its first command.
    """
    options = _timeouts(settings, socket_timeout, connect_timeout)
    if retries is not None:
        options["retry"] = Retry(NoBackoff(), retries)
    try:
        if settings.redis_mode == "cluster":
            if single_connection:
                max_connections = 1
            if max_connections is not None:
                options["max_connections"] = max_connections
            gate = max_connections if pool_timeout is not None else None
            gate_timeout = pool_timeout or 1.0
            return Cluster.from_url(
                settings.redis_url, gate=gate, gate_timeout=gate_timeout, **options
            )
        if single_connection:
            return Redis.from_url(settings.redis_url, single_connection_client=True, **options)
        if pool_timeout is not None:
            pool = BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=max_connections or 50,
                timeout=pool_timeout,
                **options,
            )
            return Redis(connection_pool=pool)
        if max_connections is not None:
            options["max_connections"] = max_connections
        return Redis.from_url(settings.redis_url, **options)
    except (TypeError, ValueError) as exc:  # a URL option this kind of client does not take
        raise SettingsError(
            f"{PREFIX}REDIS_URL ({settings.redis_url_safe}) does not suit "
            f"{PREFIX}REDIS_MODE={settings.redis_mode}: {exc}"
        ) from None


def _timeouts(
    settings: Settings, socket_timeout: float | None, connect_timeout: float | None
) -> dict[str, Any]:
    """Client timeouts: the given ones, else the settings' read-path values."""
    return {
        "socket_timeout": settings.redis_socket_timeout_s
        if socket_timeout is None
        else socket_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout_s
        if connect_timeout is None
        else connect_timeout,
    }


def connect_sync(
    settings: Settings, *, socket_timeout: float | None = None, connect_timeout: float | None = None
) -> redis.Redis | redis.RedisCluster:
    """A blocking client of the same kind, for tools (a start-up PING, server statistics). A
    cluster client connects as it is built: that may raise ``RedisClusterException``."""
    timeouts = _timeouts(settings, socket_timeout, connect_timeout)
    if settings.redis_mode == "cluster":
        return redis.RedisCluster.from_url(settings.redis_url, **timeouts)
    return redis.Redis.from_url(settings.redis_url, **timeouts)


def cancel_pending() -> bool:
    """True when the current task has been asked to stop. A cancellation that meets a failing
    connection can get lost in redis-py (CPython 3.11): it comes out as a ``ConnectionError``,
    or not at all. A loop that is stopped by cancelling it checks this after each Redis call,
    or it outlives its cancellation, and so does whoever awaits it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


async def pubsub_client(client: RedisClient) -> Redis:
    """A plain client to SUBSCRIBE on: ``client`` itself, or on a cluster a client of one primary
    (classic pub/sub reaches every node of a cluster). Ask again after each lost subscription:
    the node may be the one that failed."""
    if isinstance(client, Cluster):
        await client.ready()
        primaries = client.get_primaries()
        if not primaries:
            raise ClusterUnavailable("the cluster client knows no primary to subscribe on")
        return client.node_client(random.choice(primaries))
    if isinstance(client, RedisCluster):
        raise TypeError("pub/sub on a cluster needs a client built by core.redisclient.connect")
    return client


def transaction(client: RedisClient) -> Pipeline:
    """A MULTI/EXEC pipeline; in cluster mode every queued command's keys must share one hash
    slot (else :class:`~core.clusterclient.CrossSlot`) and it runs on that slot's primary."""
    if isinstance(client, Cluster):
        return SlotTransaction(client)
    if isinstance(client, RedisCluster):
        raise TypeError("cluster transactions need a client built by core.redisclient.connect")
    return client.pipeline(transaction=True)


async def keys_in_namespace(client: RedisClient, pattern: str) -> AsyncIterator[bytes]:
    """SCAN MATCH ``pattern`` over the server, or over every primary of a cluster (a key may
    come twice, as SCAN allows)."""
    async for key in client.scan_iter(match=pattern, count=1000):
        yield key


async def mget(client: RedisClient, keys: list[str]) -> list[bytes | None]:
    """MGET in one request, or one per slot on a cluster (not atomic across slots)."""
    if isinstance(client, RedisCluster):
        return cast(list[bytes | None], await client.mget_nonatomic(keys))
    return cast(list[bytes | None], await client.mget(keys))


# -- WAIT -------------------------------------------------------------------------------------


_SLOT_MOVED = (AskError, TryAgainError, ClusterDownError)  # MOVED is an AskError


@cache
def slot_tag(slot: int) -> str:
    """A hash tag whose slot is ``slot`` (found by search, then remembered)."""
    for n in itertools.count():
        if key_slot(str(n).encode()) == slot:
            return str(n)
    raise AssertionError("unreachable")


class ReplicationShortfall(RedisError):
    """Fewer replicas than ``CATALOG_REDIS_WAIT_REPLICAS`` acknowledged writes in time: they
    may be lost with their primary, so whatever they record must not be marked done."""


@dataclass(frozen=True, slots=True)
class ReplicaWait:
    """``WAIT replicas timeout_ms`` after writes, on every node that took them.

    ``WAIT`` counts the replicas that have the writes *of its own connection*, and a pool hands
    out any connection, so on each node it first writes a fence key (``SET <ns>:fence:{tag}
    PX``, in a slot of that node) and sends ``WAIT`` right behind it on the same connection: a
    replica that has the fence has everything the node acknowledged before it. ``replicas`` 0
    waits for nothing and sends nothing.
    """

    keys: Keys
    replicas: int = 0
    timeout_ms: int = 1000

    @classmethod
    def from_settings(cls, settings: Settings, keys: Keys) -> ReplicaWait:
        return cls(keys, settings.redis_wait_replicas, settings.redis_wait_timeout_ms)

    async def __call__(self, client: RedisClient, written: Iterable[str] | None = None) -> bool:
        """True when every node that holds ``written`` (None: every primary) has its writes on
        ``replicas`` replicas. False when one has fewer by the timeout or refused the fence;
        a lost connection raises (a ``RedisError``)."""
        if self.replicas <= 0:
            return True
        targets: list[tuple[Redis, int]] = []
        if isinstance(client, Cluster):
            await client.ready()  # a no-op once it knows the slot map
            for node, slot in _nodes_and_slots(client, written):
                targets.append((client.node_client(node), slot))
        elif isinstance(client, RedisCluster):
            raise TypeError("WAIT on a cluster needs a client built by core.redisclient.connect")
        else:
            targets.append((client, 0))
        acked = [await self._wait(node, slot) for node, slot in targets]
        if isinstance(client, Cluster) and not all(acked):
            client.refresh()  # a refused fence may mean the slot moved: learn the map again
        return all(acked)

    async def require(self, client: RedisClient, written: Iterable[str] | None = None) -> None:
        """:meth:`__call__`, raising :class:`ReplicationShortfall` instead of returning False."""
        if not await self(client, written):
            raise ReplicationShortfall(
                f"fewer than {self.replicas} replicas acknowledged within {self.timeout_ms} ms"
            )

    async def _wait(self, node: Redis, slot: int) -> bool:
        async with node.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.fence(slot_tag(slot)), "1", px=self.timeout_ms + 60_000)
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
            fenced, replicas = await pipe.execute(raise_on_error=False)
        for reply in (fenced, replicas):
            # A moved or migrating slot is a shortfall (learn the map, try again later); any
            # other error (a lost connection, an ACL without WAIT) is raised as it is.
            if isinstance(reply, RedisError) and not isinstance(reply, _SLOT_MOVED):
                raise reply
        return fenced is True and isinstance(replicas, int) and replicas >= self.replicas


def _nodes_and_slots(
    client: Cluster, written: Iterable[str] | None
) -> list[tuple[ClusterNode, int]]:
    """One (primary, slot it owns) per node that holds ``written``, or per primary: its highest
    slot. ``redis-cli --cluster reshard`` and ``rebalance`` move a node's lowest slots first,
    and a fence in a slot being migrated meets ``ASK`` (a shortfall): with the lowest slot, no
    WAIT on that node would succeed while a reshard takes slots from it."""
    chosen: dict[str, tuple[ClusterNode, int]] = {}
    if written is not None:
        for key in written:
            slot = client.keyslot(key)
            node = client.nodes_manager.get_node_from_slot(slot)
            chosen.setdefault(node.name, (node, slot))
        return list(chosen.values())
    primaries = {node.name for node in client.get_primaries()}
    for slot in reversed(range(REDIS_CLUSTER_HASH_SLOTS)):
        nodes = client.nodes_manager.slots_cache.get(slot)
        if nodes and nodes[0].name not in chosen:
            chosen[nodes[0].name] = (nodes[0], slot)
            if len(chosen) == len(primaries):
                break
    return list(chosen.values())


# -- blocking reads ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReaderId:
    """The connection a blocking read waits on: its node (None: standalone) and client id."""

    node: str | None
    id: int


async def reader_id(reader: RedisClient, key: str, known: ReaderId | None = None) -> ReaderId:
    """The id of the connection ``reader`` (built with ``single_connection=True``) reads ``key``
    on; ``known`` is returned as is while the key's slot stays on its node (no I/O)."""
    if isinstance(reader, Cluster):
        await reader.ready()  # a no-op once it knows the slot map
    if isinstance(reader, RedisCluster):
        node = reader.get_node_from_key(key)
        if node is None:
            raise ClusterUnavailable(f"no node serves the slot of {key!r}")
        if known is not None and known.node == node.name:
            return known
        return ReaderId(node.name, int(await reader.client_id(target_nodes=node)))
    if known is not None:
        return known
    return ReaderId(None, int(await reader.client_id()))


async def unblock(client: RedisClient, reader: ReaderId) -> None:
    """CLIENT UNBLOCK the blocking read on ``reader``'s connection, from another connection."""
    if reader.node is None:
        await client.client_unblock(reader.id)
        return
    assert isinstance(client, RedisCluster)
    node = client.get_node(node_name=reader.node)
    if node is not None:
        await client.client_unblock(reader.id, target_nodes=node)


__all__ = [
    "ClusterUnavailable",
    "CrossSlot",
    "ReaderId",
    "RedisClient",
    "ReplicaWait",
    "ReplicationShortfall",
    "cancel_pending",
    "connect",
    "connect_sync",
    "is_cluster",
    "keys_in_namespace",
    "mget",
    "reader_id",
    "transaction",
    "unblock",
]
