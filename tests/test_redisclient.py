"""The client factory, the script runner and the cluster client's repairs, on real servers.

Each cluster repair of core/clusterclient.py is shown failing with redis-py's own client first
(where that is what the test is about), then working with ours. Tests that change server state
(SCRIPT FLUSH, a slot half-migrated) run on a cluster of this module's own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ClusterError, MaxConnectionsError, RedisClusterException, RedisError

from core.clusterclient import Cluster, ClusterUnavailable, CrossSlot
from core.keys import Keys
from core.redisclient import (
    RedisClient,
    connect,
    keys_in_namespace,
    reader_id,
    transaction,
    unblock,
)
from core.redisscript import Script
from core.settings import Settings, SettingsError
from devtools.localservers import RedisProcess, free_port
from devtools.rediscluster import RedisCluster as ClusterLauncher
from tests.helpers import delete_namespace, make_settings, metric

ECHO = Script("return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}")


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterLauncher]:
    with ClusterLauncher(tmp_path_factory.mktemp("own-cluster"), primaries=3) as cluster:
        yield cluster


@pytest.fixture
async def topo(topo_settings: Settings) -> AsyncIterator[RedisClient]:
    client = connect(topo_settings, socket_timeout=5.0, connect_timeout=5.0)
    yield client
    await delete_namespace(client, topo_settings.key_namespace)
    await client.aclose()


def cluster_settings(url: str, **overrides: Any) -> Settings:
    return make_settings(redis_url=url, redis_mode="cluster", key_namespace="own", **overrides)


def calls(cluster: ClusterLauncher, port: int, command: str) -> int:
    """How often the node on ``port`` ran ``command`` (INFO commandstats, e.g. 'script|load')."""
    for line in cluster.cli("INFO", "commandstats", port=port).splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


# -- settings and the factory ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CATALOG_REDIS_MODE": "sentinel"}, "CATALOG_REDIS_MODE must be standalone or cluster"),
        (
            {"CATALOG_REDIS_MODE": "cluster", "CATALOG_REDIS_URL": "redis://h:6379/2"},
            "CATALOG_REDIS_MODE=cluster needs a redis:// or rediss:// URL of database 0",
        ),
        (
            {"CATALOG_REDIS_MODE": "cluster", "CATALOG_REDIS_URL": "unix:///tmp/r.sock"},
            "CATALOG_REDIS_MODE=cluster needs",
        ),
        ({"CATALOG_REDIS_WAIT_REPLICAS": "-1"}, "CATALOG_REDIS_WAIT_REPLICAS must be >= 0"),
    ],
)
def test_bad_redis_mode_settings_are_refused_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_connect_builds_the_kind_the_mode_names_without_io() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens: building must not connect
    assert type(connect(make_settings(redis_url=url))) is Redis
    cluster = connect(make_settings(redis_url=url, redis_mode="cluster"))
    assert isinstance(cluster, Cluster)
    reader = connect(make_settings(redis_url=url, redis_mode="cluster"), single_connection=True)
    assert all(n.max_connections == 1 for n in cast(Cluster, reader).startup_nodes)


def test_a_url_option_the_cluster_client_does_not_take_is_a_settings_error() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0?single_connection_client=true"
    with pytest.raises(SettingsError, match=r"CATALOG_REDIS_URL .* does not suit"):
        connect(make_settings(redis_url=url, redis_mode="cluster"))


async def test_no_node_answering_is_a_connection_error_not_a_cluster_exception() -> None:
    client = connect(
        make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_mode="cluster")
    )
    with pytest.raises(ClusterUnavailable):
        await client.get("k")
    await client.aclose()


# -- scripts --------------------------------------------------------------------------------


async def test_a_script_runs_on_either_topology(topo: RedisClient, topo_settings: Settings) -> None:
    key = topo_settings.key_namespace + ":script:{x}"
    assert await ECHO(topo, [key], ["a"]) == [key.encode(), b"a", 1]
    assert await ECHO(topo, [key], ["b"]) == [key.encode(), b"b", 2]


async def test_a_script_whose_keys_span_slots_is_a_cross_slot_error(
    own_cluster: ClusterLauncher,
) -> None:
    client = connect(cluster_settings(own_cluster.url))
    with pytest.raises(CrossSlot):
        await Script("return 1")(client, ["own:{a}", "own:{b}"])
    await client.aclose()


async def test_noscript_on_one_node_reloads_there_and_the_call_succeeds(
    own_cluster: ClusterLauncher,
) -> None:
    """SCRIPT FLUSH on the key's node (as a restart or a promoted replica would leave it): the
    next call gets NOSCRIPT, loads the script on that node only and runs it."""
    client = cast(Cluster, connect(cluster_settings(own_cluster.url)))
    script = Script("return redis.call('INCR', KEYS[1])")
    key = "own:noscript:{k}"
    assert await script(client, [key]) == 1  # loaded on every primary up front
    node = client.get_node_from_key(key)
    assert node is not None
    own_cluster.cli("SCRIPT", "FLUSH", port=int(node.port))
    loads = {p: calls(own_cluster, p, "script|load") for p in own_cluster.ports}
    noscript = calls(own_cluster, int(node.port), "evalsha")

    assert await script(client, [key]) == 2
    after = {p: calls(own_cluster, p, "script|load") for p in own_cluster.ports}
    assert {p: after[p] - loads[p] for p in after} == {
        p: 1 if p == int(node.port) else 0 for p in after
    }
    assert calls(own_cluster, int(node.port), "evalsha") == noscript + 2  # NOSCRIPT, then ok
    await client.delete(key)
    await client.aclose()


async def test_many_calls_go_as_one_request_per_node_and_survive_noscript(
    own_cluster: ClusterLauncher,
) -> None:
    """Script.many on a cluster (one pipeline: a request per node, not per call): replies in
    the calls' order, each call run once; those that meet NOSCRIPT on a flushed node run again
    alone, after a load there."""
    client = cast(Cluster, connect(cluster_settings(own_cluster.url)))
    await client.ready()
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    keys = [f"own:many:{{{n}}}" for n in range(30)]  # 30 slots, spread over every node
    nodes = {int(client.get_node_from_key(k).port) for k in keys}  # type: ignore[union-attr]
    assert len(nodes) == 3
    assert await script.many(client, [([k], [n]) for n, k in enumerate(keys)]) == list(range(30))
    flushed = next(iter(nodes))
    own_cluster.cli("SCRIPT", "FLUSH", port=flushed)
    before = {p: calls(own_cluster, p, "evalsha") for p in nodes}
    replies = await script.many(client, [([k], [1]) for k in keys])
    assert replies == [n + 1 for n in range(30)]
    owners = [int(client.primary_for(k).port) for k in keys]
    on = {p: owners.count(p) for p in nodes}
    spent = {p: calls(own_cluster, p, "evalsha") - before[p] for p in nodes}
    # Every call once; on the flushed node each ran twice (NOSCRIPT, then alone after one load).
    assert spent == {p: on[p] * (2 if p == flushed else 1) for p in nodes}
    assert calls(own_cluster, flushed, "script|load") >= 1
    await client.delete(*keys)
    await client.aclose()


async def test_concurrent_first_calls_of_a_new_client_after_a_flush_all_succeed(
    own_cluster: ClusterLauncher,
) -> None:
    """The first commands of a client arrive all at once (redis-py loses some of these while it
    learns the slot map) and meet NOSCRIPT everywhere: each runs exactly once."""
    client = connect(cluster_settings(own_cluster.url), socket_timeout=10.0, retries=0)
    script = Script("return redis.call('INCR', KEYS[1]) -- concurrent")
    keys = [f"own:burst:{{{n}}}" for n in range(60)]
    for port in own_cluster.ports:
        own_cluster.cli("SCRIPT", "FLUSH", port=port)
    results = await asyncio.gather(*(script(client, [k]) for k in keys for _ in range(3)))
    assert sorted(results) == sorted([1, 2, 3] * len(keys))
    await client.delete(*keys)
    await client.aclose()


# -- the cluster client's repairs -------------------------------------------------------------


async def half_migrated(
    cluster: ClusterLauncher, client: RedisCluster, key: str
) -> tuple[int, int]:
    """Start moving ``key``'s slot to another primary and move ``key`` itself, then stop: the
    source answers ASK for it until the slot is handed over. (source port, target port)."""
    slot = client.keyslot(key)
    source = client.get_node_from_key(key)
    assert source is not None
    target = next(n for n in client.get_primaries() if n.name != source.name)
    ids = {
        int(n.port): cluster.cli("CLUSTER", "MYID", port=int(n.port)).strip()
        for n in (source, target)
    }
    cluster.cli(
        "CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[int(source.port)], port=int(target.port)
    )
    cluster.cli(
        "CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[int(target.port)], port=int(source.port)
    )
    cluster.cli("MIGRATE", "127.0.0.1", str(target.port), key, "0", "5000", port=int(source.port))
    return int(source.port), int(target.port)


def hand_over(cluster: ClusterLauncher, slot: int, target: int) -> None:
    owner = cluster.cli("CLUSTER", "MYID", port=target).strip()
    for port in cluster.primaries():
        cluster.cli("CLUSTER", "SETSLOT", str(slot), "NODE", owner, port=port)


async def test_ask_redirections_are_followed_with_many_connections_to_the_target(
    own_cluster: ClusterLauncher,
) -> None:
    """redis-py 8.1 sends ASKING and the command on different connections: with a warm pool on
    the target every call ends in 'TTL exhausted'. Ours sends both on one."""
    ours = cast(Cluster, connect(cluster_settings(own_cluster.url), socket_timeout=5.0))
    # The read path's client (no retries) routes a GET by its own fast path (Cluster._node_of).
    fast = cast(Cluster, connect(cluster_settings(own_cluster.url), socket_timeout=5.0, retries=0))
    theirs = RedisCluster.from_url(own_cluster.url)
    key = "own:ask:{hot}"
    await ours.set(key, "v")
    assert await fast.get(key) == b"v"  # learns the slot map: the slot's old owner
    await theirs.initialize()
    _, target = await half_migrated(own_cluster, ours, key)
    try:
        # Warm both clients' pools on the target: several free connections each.
        warm = [f"own:warm:{n}" for n in range(3000)]
        there = [k for k in warm if ours.get_node_from_key(k).port == target][:40]  # type: ignore[union-attr]
        for client in (ours, theirs):
            await asyncio.gather(*(client.set(k, "1") for k in there))

        with pytest.raises(ClusterError, match="TTL exhausted"):
            await theirs.get(key)
        assert [await ours.get(key) for _ in range(20)] == [b"v"] * 20
        assert [await fast.get(key) for _ in range(20)] == [b"v"] * 20, "ASK, fast path"
        script = Script("return redis.call('GET', KEYS[1])")
        assert await asyncio.gather(*(script(ours, [key]) for _ in range(20))) == [b"v"] * 20
        assert await script.many(ours, [([key], ())] * 5) == [b"v"] * 5, "a pipeline too"
    finally:
        hand_over(own_cluster, ours.keyslot(key), target)
        own_cluster.wait_ok()
    assert await ours.get(key) == b"v"
    assert await fast.get(key) == b"v", "MOVED: the fast path follows the slot"
    assert fast.nodes_manager.get_node_from_slot(ours.keyslot(key)).port == target
    await ours.delete(key, *there)
    await ours.aclose()
    await fast.aclose()
    await theirs.aclose()


async def test_stream_reads_ask_no_node_where_their_keys_are(own_cluster: ClusterLauncher) -> None:
    client = connect(cluster_settings(own_cluster.url))
    stream = "own:getkeys:events"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    await client.xadd(stream, {"a": "1"})
    before = sum(calls(own_cluster, p, "command|getkeys") for p in own_cluster.ports)
    for _ in range(5):
        await client.xreadgroup("g", "c", {stream: ">"}, count=10, block=1)
    assert sum(calls(own_cluster, p, "command|getkeys") for p in own_cluster.ports) == before
    await client.delete(stream)
    await client.aclose()


async def test_a_bounded_pool_makes_a_burst_wait_instead_of_failing(
    own_cluster: ClusterLauncher,
) -> None:
    """Each call holds a connection (BLPOP with a timeout on an empty list): a burst bigger than
    the pool fails at once on redis-py's client and queues on ours."""
    settings = cluster_settings(own_cluster.url)
    ours = connect(settings, max_connections=2, pool_timeout=30.0, socket_timeout=5.0)
    theirs = RedisCluster.from_url(own_cluster.url, max_connections=2)
    key = "own:burst:{empty}"
    with pytest.raises(MaxConnectionsError):
        await asyncio.gather(*(theirs.blpop([key], 0.05) for _ in range(10)))
    assert await asyncio.gather(*(ours.blpop([key], 0.05) for _ in range(10))) == [None] * 10
    await ours.aclose()
    await theirs.aclose()


# -- transactions, scans, blocking reads --------------------------------------------------------


async def test_a_transaction_runs_when_its_keys_share_a_slot(
    topo: RedisClient, topo_settings: Settings
) -> None:
    ns = topo_settings.key_namespace
    async with transaction(topo) as pipe:
        pipe.sadd(f"{ns}:{{t}}:set", "m")
        pipe.rename(f"{ns}:{{t}}:missing", f"{ns}:{{t}}:other")
        added, renamed = await pipe.execute(raise_on_error=False)
    assert added == 1 and isinstance(renamed, RedisError)  # MULTI: one refusal, the rest ran
    if topo_settings.redis_mode == "cluster":
        async with transaction(topo) as pipe:
            pipe.set(f"{ns}:{{a}}", 1)
            pipe.set(f"{ns}:{{b}}", 1)
            with pytest.raises(CrossSlot):
                await pipe.execute()


async def test_a_transaction_follows_its_slot_to_a_new_owner(own_cluster: ClusterLauncher) -> None:
    client = cast(Cluster, connect(cluster_settings(own_cluster.url), socket_timeout=5.0))
    key = "own:tx:{moving}"
    await client.set(key, "1")
    _, target = await half_migrated(own_cluster, client, key)
    hand_over(own_cluster, client.keyslot(key), target)
    own_cluster.wait_ok()
    # The client still believes the source owns the slot: MOVED, then the target.
    async with transaction(client) as pipe:
        pipe.incr(key)
        pipe.get(key)
        assert await pipe.execute() == [2, b"2"]
    await client.delete(key)
    await client.aclose()


async def test_namespace_scan_sees_keys_on_every_node(
    topo: RedisClient, topo_settings: Settings
) -> None:
    ns = topo_settings.key_namespace
    made = {f"{ns}:scan:{n}" for n in range(200)}
    for key in made:
        await topo.set(key, "1")
    assert {k.decode() async for k in keys_in_namespace(topo, f"{ns}:scan:*")} == made


async def test_a_blocking_read_is_interrupted_on_its_own_node(
    topo: RedisClient, topo_settings: Settings
) -> None:
    reader = connect(topo_settings, socket_timeout=120.0, single_connection=True)
    keys = Keys(topo_settings.key_namespace)
    await topo.xgroup_create(keys.stream, keys.group, id="$", mkstream=True)
    rid = await reader_id(reader, keys.stream)
    assert await reader_id(reader, keys.stream, rid) is rid  # no I/O while the slot stays put

    async def blocked_read() -> Any:
        return await reader.xreadgroup(keys.group, "c", {keys.stream: ">"}, block=60_000)

    read = asyncio.create_task(blocked_read())
    while not read.done():
        await unblock(topo, rid)  # a read sent after an UNBLOCK would wait: repeat
        await asyncio.sleep(0.02)
    assert await asyncio.wait_for(read, 10) in ([], {}, None)
    await reader.aclose()


async def test_watch_pools_reads_a_cluster_client(own_cluster: ClusterLauncher) -> None:
    from core.metrics import watch_pools

    client = connect(cluster_settings(own_cluster.url), max_connections=7)
    await client.ping()
    watch_pools(redis=client)
    assert metric("catalog_redis_pool_connections", state="max") == 7 * 3
    await client.aclose()


def test_private_redis_has_no_cluster(private_redis: RedisProcess, tmp_path: Path) -> None:
    """A cluster client pointed at a plain Redis says so (what `make run-cluster` reports)."""
    from core.redisclient import connect_sync

    with pytest.raises(RedisClusterException, match="Cluster mode is not enabled"):
        connect_sync(make_settings(redis_url=private_redis.url, redis_mode="cluster")).ping()


def test_on_a_cluster_dead_letters_share_the_stream_slot_and_a_name_that_does_not_is_refused() -> (
    None
):
    from redis.crc import key_slot

    from invalidator.settings import InvalidatorSettings

    def dead(base: Settings, **env: str) -> str:
        return InvalidatorSettings.from_env(env).keys(base).dead_letter_stream

    cluster, standalone = make_settings(redis_mode="cluster"), make_settings()
    assert dead(standalone) == "catalog:events:dead"  # unchanged on one Redis
    assert dead(cluster) == "catalog:events:dead:{catalog:events}"
    assert key_slot(dead(cluster).encode()) == key_slot(b"catalog:events")
    assert dead(cluster, CATALOG_INVALIDATOR_STREAM="ev:{s}") == "ev:{s}:dead"
    with pytest.raises(SettingsError, match="must share the hash slot of the stream"):
        dead(cluster, CATALOG_INVALIDATOR_DEAD_LETTER_STREAM="catalog:events:dead")
    with pytest.raises(SettingsError, match="has braces but no hash tag"):
        dead(cluster, CATALOG_INVALIDATOR_STREAM="ev{s")
