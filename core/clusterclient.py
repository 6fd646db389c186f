"""redis-py's asyncio ``RedisCluster`` with the repairs this project relies on (redis-py 8.1).

:class:`Cluster` is what :func:`core.redisclient.connect` builds in cluster mode. It differs from
``redis.asyncio.RedisCluster`` only where that one fails us, each case covered by a test in
``tests/test_redisclient.py``:

* **ASK redirections.** redis-py sends ``ASKING`` and the redirected command as two separate pool
  checkouts, so with more than one free connection to the target node they usually go out on
  different connections: the target answers ``MOVED``, the source ``ASK`` again, and the call
  ends in ``ClusterError('TTL exhausted.')`` while a slot migrates. Here the two are written
  together on one connection (:class:`_Node`).
* **Stream reads.** ``XREADGROUP`` and ``XREAD`` declare "movable keys", so redis-py asks the
  default node where their keys are (``COMMAND GETKEYS``, twice per call) before every read; a
  dead default node then fails every read. Their keys are parsed here (:class:`_KeyParser`).
* **Internal errors.** While the slot map is being rebuilt (a failover) redis-py can fail with
  ``AttributeError``, ``IndexError`` or ``KeyError``, or with ``RedisClusterException``, which is
  not a ``RedisError``. These become :class:`ClusterUnavailable` (a ``ConnectionError``, so every
  caller's Redis-failure path applies) and the next command rebuilds the map. A command whose
  keys span slots is a bug, not an outage: :class:`CrossSlot`.
* **The first burst.** Commands that reach a new client before it has learnt the slot map are
  routed while the map is being built, and some of them fail with "Connection closed by server"
  after they ran. Here every command waits for the first ``initialize`` to finish.
* **A bounded wait for connections.** ``max_connections`` is per node and fails at once when
  exhausted (``MaxConnectionsError``); with ``gate`` the client instead lets that many commands
  run at a time and makes the others wait up to ``gate_timeout`` s, like the standalone
  ``BlockingConnectionPool`` (a pipeline takes one place, and one connection per node).
* **MULTI/EXEC.** redis-py's cluster transactions queue every command through a thread running
  its own event loop. :class:`SlotTransaction` is the standalone pipeline, run on a connection
  to the node that owns the commands' one slot, and retried there when the slot moved.

:meth:`Cluster.node_client` gives a plain client on one node's address, for what must run on
one connection of that node (a transaction; a write and the ``WAIT`` that follows it).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Sequence
from typing import Any, cast

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # the parser class is not re-exported by redis-py
    from redis._parsers import AsyncCommandsParser
except ImportError:  # pragma: no cover - older layouts
    from redis._parsers.commands import AsyncCommandsParser

# A redirect (MOVED is an AskError too), a slot mid-migration, a failover or a lost node: a
# transaction that met one of these is sent again to the slot's owner as the client knows it.
_RETRY_ON = (AskError, TryAgainError, ClusterDownError, ConnectionError, RedisTimeoutError)
TRANSACTION_ATTEMPTS = 20
TRANSACTION_PAUSE_S = 0.025
# The node a task has just been redirected to by ASK: its next command goes out with ASKING.
_ASKING: contextvars.ContextVar[str | None] = contextvars.ContextVar("catalog_asking", default=None)
# Set while this context holds a place in the client's gate (see _Gate).
_GATED: contextvars.ContextVar[bool] = contextvars.ContextVar("catalog_gated", default=False)


class ClusterUnavailable(ConnectionError):
    """The cluster client could not route or send a command (its slot map is being rebuilt, or
    no node answers). A ``ConnectionError``: nothing is known to have run."""


class CrossSlot(ResponseError):
    """The keys of one command or transaction are in different hash slots (a bug)."""


class _KeyParser(AsyncCommandsParser):
    """Finds the stream keys of XREADGROUP/XREAD locally: ``... STREAMS k1 .. kn id1 .. idn``."""

    __slots__ = ()

    async def get_keys(self, *args: Any) -> tuple[Any, ...] | None:
        if args and str(args[0]).upper() in ("XREADGROUP", "XREAD"):
            words = [a.upper() if isinstance(a, str) else a for a in args]
            for marker in ("STREAMS", b"STREAMS"):
                if marker in words:
                    rest = args[words.index(marker) + 1 :]
                    return tuple(rest[: len(rest) // 2])
        return cast(tuple[Any, ...] | None, await super().get_keys(*args))


class _Node(ClusterNode):
    """A node whose ``ASKING`` goes out with the next command, on that command's connection."""

    __slots__ = ()

    async def execute_command(self, *args: Any, asking: bool = False, **kwargs: Any) -> Any:
        pending = _ASKING.get()
        if args == ("ASKING",):  # redis-py: ASKING, then the redirected command, in one task
            _ASKING.set(self.name)
            return True
        if pending is not None:
            _ASKING.set(None)
            if pending == self.name and not asking:
                return await self._asking(*args, **kwargs)
        return await super().execute_command(*args, asking=asking, **kwargs)

    async def _asking(self, *args: Any, **kwargs: Any) -> Any:
        connection = self.acquire_connection()
        try:
            await self.disconnect_if_needed(connection)
            await connection.send_packed_command(connection.pack_commands([("ASKING",), args]))
            try:
                await connection.read_response()
                return await self.parse_response(connection, args[0], **kwargs)
            except ResponseError:
                raise
            except BaseException:
                await connection.disconnect()  # a reply may be left unread on it
                raise
        finally:
            try:
                await self.disconnect_if_needed(connection)
            finally:
                self.release(connection)


def _adopt(node: ClusterNode | None) -> ClusterNode | None:
    if node is not None and type(node) is ClusterNode:
        node.__class__ = _Node  # same layout (no slots of its own)
    return node


class Cluster(RedisCluster):
    """``RedisCluster`` with the repairs of the module docstring. Reads go to primaries only."""

    def __init__(
        self, *args: Any, gate: int | None = None, gate_timeout: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.commands_parser = _KeyParser()
        self._gate = asyncio.Semaphore(gate) if gate else None
        self._gate_timeout = gate_timeout
        self._node_clients: dict[str, Redis] = {}
        self.loaded_scripts: set[str] = set()  # shas loaded on every primary (core.redisscript)
        self._no_retries = self.retry.get_retries() == 0

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Cluster:
        return cast(Cluster, super().from_url(url, **kwargs))

    def get_node(
        self, host: str | None = None, port: int | None = None, node_name: str | None = None
    ) -> ClusterNode | None:
        return _adopt(super().get_node(host, port, node_name))

    async def ready(self) -> None:
        """Learn the slot map if it is not known (a no-op otherwise); failures as
        :meth:`execute_command` reports them."""
        if self._initialize:
            await self._guarded(self.initialize)

    def refresh(self) -> None:
        """Rebuild the slot map before the next command (after a failure that may mean it moved)."""
        self._initialize = True

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._gated():
            # Learn the slot map before routing: redis-py routes a command that arrives during
            # its first initialize by a map still being built.
            await self.ready()
            if args[0] == "GET" and len(args) == 2 and not kwargs and self._no_retries:
                node = self._node_of(args[1])
                if node is not None:
                    return await self._guarded(self._execute_command, node, *args)
            return await self._guarded(super().execute_command, *args, **kwargs)

    def _node_of(self, key: Any) -> ClusterNode | None:
        """The primary of ``key``'s slot from the slot map, or None (then the general path).

        A GET hit is the service's hottest call: this skips redis-py's per-call routing (an
        async command-policy lookup, the command parser to find the key, the node search and
        the retry loop), which cost about as much as the request itself. Redirections and
        failures are handled by ``_execute_command`` as on the general path; only clients
        built without retries (the read path's: its breaker decides) take it, because the
        retry loop is what is skipped."""
        if self._initialize:
            return None
        try:
            slot = key_slot(key.encode() if isinstance(key, str) else key)
            return self.nodes_manager.get_node_from_slot(slot)
        except (RedisError, RedisClusterException, IndexError, KeyError, AttributeError):
            return None

    async def _guarded(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await call(*args, **kwargs)
        except RedisClusterException as exc:
            if "same key slot" in str(exc) or "same slot" in str(exc):
                raise CrossSlot(str(exc)) from exc
            self.refresh()
            raise ClusterUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except (AttributeError, IndexError, KeyError) as exc:  # redis-py internals mid-refresh
            self.refresh()
            raise ClusterUnavailable(f"cluster client failed: {type(exc).__name__}: {exc}") from exc
        except RedisError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # CPython 3.11: a cancellation that meets a failing connect (a node just
                # killed) comes out of redis-py as a ConnectionError. Give it back.
                raise asyncio.CancelledError from exc
            raise

    def _gated(self) -> Any:
        return _Gate(self._gate, self._gate_timeout)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        """A non-transactional pipeline (commands grouped per node). Transactions:
        :func:`core.redisclient.transaction`."""
        if transaction or shard_hint:
            raise RedisClusterException(
                "cluster transactions go through core.redisclient.transaction"
            )
        return _GuardedPipeline(self)  # type: ignore[abstract]

    def node_client(self, node: ClusterNode) -> Redis:
        """A plain client on ``node``'s address, with this client's connection settings."""
        client = self._node_clients.get(node.name)
        if client is None:
            options = {k: v for k, v in node.connection_kwargs.items() if k != "retry"}
            pool = ConnectionPool(
                connection_class=node.connection_class, max_connections=16, **options
            )
            client = self._node_clients[node.name] = Redis(connection_pool=pool)
        return client

    def primary_for(self, key: str) -> ClusterNode:
        node = self.get_node_from_key(key)
        if node is None:
            raise ClusterUnavailable(f"no node serves the slot of {key!r}")
        return node

    async def aclose(self) -> None:
        clients, self._node_clients = list(self._node_clients.values()), {}
        for client in clients:
            await client.aclose()
        await super().aclose()


class _Gate:
    """At most ``n`` holders at once; a holder waits up to ``timeout`` s, then ConnectionError.

    A holder uses at most one connection per node (a command one, a pipeline one on each node
    it touches), so the gate bounds every node's connections. What a holder runs on its behalf
    (a pipeline's redirected commands, sent through :meth:`Cluster.execute_command` in the same
    context) does not wait for the gate again: it could wait for itself."""

    __slots__ = ("_sem", "_timeout", "_token")

    def __init__(self, sem: asyncio.Semaphore | None, timeout: float) -> None:
        self._sem, self._timeout = sem, timeout
        self._token: contextvars.Token[bool] | None = None

    async def __aenter__(self) -> None:
        if self._sem is None or _GATED.get():
            return
        if self._sem.locked():
            try:
                async with asyncio.timeout(self._timeout):
                    await self._sem.acquire()
            except TimeoutError:
                raise ConnectionError("no free Redis connection (all in use)") from None
        else:  # free: acquired at once, no timer (the common case)
            await self._sem.acquire()
        self._token = _GATED.set(True)

    async def __aexit__(self, *exc: object) -> None:
        if self._token is not None:
            _GATED.reset(self._token)
            self._token = None
            assert self._sem is not None
            self._sem.release()


class _GuardedPipeline(ClusterPipeline):
    """A cluster pipeline, gated like a command, whose internal errors are wrapped."""

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        client = cast(Cluster, self.cluster_client)
        async with client._gated():
            return cast(
                list[Any],
                await client._guarded(super().execute, raise_on_error, allow_redirections),
            )


class SlotTransaction(Pipeline):
    """MULTI ... EXEC of commands whose keys share one hash slot, on that slot's primary.

    Queue commands as on a standalone pipeline; :meth:`execute` finds the slot, sends the
    transaction on a connection to its owner, and when the slot moved (``MOVED``/``ASK``), is
    being migrated (``TRYAGAIN``) or the node failed, rebuilds the slot map and sends it again
    to the owner (bounded: :data:`TRANSACTION_ATTEMPTS`). A transaction is atomic where it runs,
    so a retry never applies half of one; like any MULTI after a lost connection, one whose
    reply was lost may have run.
    """

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(
            cast(ConnectionPool, None),
            cluster.response_callbacks,
            transaction=True,
            shard_hint=None,
        )
        self._owner = cluster

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        stack = list(self.command_stack)
        if not stack:
            return []
        try:
            await self._owner.ready()  # the slot map, and the parser _slot needs
            slot = await self._slot(stack)
            for attempt in range(TRANSACTION_ATTEMPTS):
                await self._owner.ready()
                node = self._owner.nodes_manager.get_node_from_slot(slot)
                self.connection_pool = self._owner.node_client(node).connection_pool
                self.command_stack = list(stack)
                try:
                    return await super().execute(raise_on_error)
                except _RETRY_ON:
                    if attempt == TRANSACTION_ATTEMPTS - 1:
                        raise
                    self._owner.refresh()
                    await asyncio.sleep(TRANSACTION_PAUSE_S)
            raise AssertionError("unreachable")
        except (RedisClusterException, AttributeError, IndexError, KeyError) as exc:
            self._owner.refresh()
            raise ClusterUnavailable(f"transaction not sent: {type(exc).__name__}: {exc}") from exc
        finally:
            await self.reset()  # type: ignore[no-untyped-call]

    async def _slot(self, stack: Sequence[tuple[Any, Any]]) -> int:
        slots = set()
        for args, _ in stack:
            try:
                slots.add(int(await self._owner._determine_slot(*args)))
            except RedisClusterException as exc:
                raise CrossSlot(str(exc)) from exc
        if len(slots) != 1:
            raise CrossSlot(f"a transaction's keys must share one hash slot, got slots {slots}")
        return slots.pop()


__all__ = ["Cluster", "ClusterUnavailable", "CrossSlot", "SlotTransaction"]
