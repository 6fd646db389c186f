"""Lua scripts that run alike on one Redis and on a Redis Cluster.

A :class:`Script` is built once per source (at import) and called with any client of
:mod:`core.redisclient`: ``await SCRIPT(client, keys, args)``. It sends ``EVALSHA``; in cluster
mode the client routes it to the primary of its keys' slot (all keys of one call must share a
slot, else :class:`core.clusterclient.CrossSlot`).

* **Up front (cluster):** before a cluster client's first call of a script, ``SCRIPT LOAD`` runs
  on every primary, so a burst of first calls does not meet ``NOSCRIPT`` everywhere at once.
  A failure there is not the call's: it goes on, and ``NOSCRIPT`` covers the node that missed it.
* **NOSCRIPT** (a node restarted, promoted from replica or added since): ``SCRIPT LOAD`` on the
  node that owns the slot of ``keys[0]`` (every primary for a call without keys; the server in
  standalone mode), then ``EVALSHA`` once more. A second ``NOSCRIPT`` is raised.

redis-py's own ``Script`` objects are not used: on a cluster their reload after ``NOSCRIPT``
goes to every primary and fails the call when one of them does, concurrent reloads race, and
they cannot run inside a cluster pipeline either.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from core.clusterclient import Cluster
from core.redisclient import RedisClient

Arg = str | bytes | int | float


class Script:
    """One Lua source; call it with a client, its KEYS and its ARGV."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(
        self, client: RedisClient, keys: Sequence[str], args: Sequence[Arg] = ()
    ) -> Any:
        if isinstance(client, Cluster) and self.sha not in client.loaded_scripts:
            await self._preload(client)
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(client, keys)
        return await client.evalsha(self.sha, len(keys), *keys, *args)

    async def many(
        self, client: RedisClient, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]
    ) -> list[Any]:
        """Several calls (KEYS, ARGV), each within one hash slot; their replies in order. On a
        cluster they go as one pipeline (one round trip per node, redirections followed by the
        client) instead of a routed request each: an invalidator's batch of products is one
        call per product's slot. A call that meets ``NOSCRIPT`` runs again alone (loading the
        script there); any other error is raised. Elsewhere: the calls, concurrently."""
        if not isinstance(client, Cluster) or len(calls) < 2:
            return list(await asyncio.gather(*(self(client, k, a) for k, a in calls)))
        if self.sha not in client.loaded_scripts:
            await self._preload(client)
        pipe = client.pipeline()
        for keys, args in calls:
            # redis-py refuses pipe.evalsha on a cluster; the command itself routes by its keys.
            pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        replies: list[Any] = list(await pipe.execute(raise_on_error=False))
        loaded: set[str] = set()  # nodes reloaded after NOSCRIPT in this call
        for n, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                keys, args = calls[n]
                node = client.primary_for(keys[0]).name
                if node not in loaded:
                    loaded.add(node)
                    await self.load(client, keys)
                replies[n] = await self(client, keys, args)
            elif isinstance(reply, Exception):
                raise reply
        return replies

    async def _preload(self, client: Cluster) -> None:
        """SCRIPT LOAD on every primary, once per client (see the module docstring)."""
        client.loaded_scripts.add(self.sha)  # once per client, even if this load fails
        with contextlib.suppress(RedisError):
            await client.execute_command("SCRIPT LOAD", self.source)

    async def load(self, client: RedisClient, keys: Sequence[str] = ()) -> None:
        """SCRIPT LOAD where a call with ``keys`` runs (every primary when there are none)."""
        if isinstance(client, RedisCluster):
            target = client.get_node_from_key(keys[0]) if keys else RedisCluster.PRIMARIES
            await client.execute_command("SCRIPT LOAD", self.source, target_nodes=target)
        else:
            await client.script_load(self.source)


__all__ = ["Script"]
