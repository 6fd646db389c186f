"""Redis Cluster: the read hits and the invalidation on a private 3-primary cluster, with one
Redis as the baseline in the same run.

* GetProduct hit on the cluster against the same load on one Redis, in turn three times each
  (:func:`bench.rpc.alternating`; both servers started and warmed first, an idle one costs
  nothing measurable). Redis requests per
  call are counted by the cluster itself: ``INFO commandstats`` summed over every node, data
  commands only (not the INFO that counts, nor what a client sends to learn the slot map).
  Redirections (``MOVED``/``ASK`` replies, ``INFO errorstats``) over both hit loads show whether
  every command went to the right node the first time.
* ListProducts page of 20 hit, the same way. A hit is one GET of the page and one MGET per hash
  slot of its products (redis-py's non-atomic cluster MGET), so the bound of a page is 1 + the
  slots its products' keys span, computed here from the pages' real keys. Compared exactly on
  one pass over every page (each once, all hits): the data commands the pass cost against the
  sum of its pages' bounds. The load run's figure weighs the pages as the load happened to.
* Invalidation (:mod:`bench.invalidation`, its two phases as they are) on the cluster, with 1
  and 3 invalidator processes, and with 1 on one Redis as the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from redis.crc import key_slot

from bench import invalidation
from bench.environment import BenchEnv
from bench.report import Row
from bench.rpc import (
    CATEGORIES,
    RequestCount,
    Timing,
    alternating,
    get_requests,
    list_requests,
    reads_processed,
    server,
    standard_rows,
    targeted,
    warm,
)
from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.keys import Keys
from core.redisclient import connect_sync
from devtools.localservers import RedisProcess
from devtools.rediscluster import NOT_DATA, RedisCluster

GET = "GetProduct hit (cluster vs one Redis)"
LIST = "ListProducts page of 20 hit (cluster vs one Redis)"


def data_commands(cluster: RedisCluster) -> RequestCount:
    """Data commands the cluster's nodes have run so far (``INFO commandstats``, summed)."""

    def count() -> int:
        calls = cluster.commandstats()
        return sum(n for name, n in calls.items() if name.split("|")[0] not in NOT_DATA)

    return count


def pids(servers: Sequence[RedisProcess | None]) -> tuple[int, ...]:
    return tuple(s.proc.pid for s in servers if s is not None and s.proc is not None)


def page_pass(target: str, keys: Keys, count: RequestCount) -> tuple[int, list[int]]:
    """Every page of :func:`bench.rpc.list_requests` once (warmed: all hits): the Redis requests
    the pass cost, and for each page how many hash slots its products' keys span (from the
    service's own answers)."""
    spans = []
    with grpc.insecure_channel(target) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        before = count()
        for c in CATEGORIES:
            page = stub.ListProducts(pb.ListProductsRequest(page_size=20, category_id=c))
            spans.append(len({key_slot(keys.product(p.id).encode()) for p in page.products}))
        cost = count() - before
    return cost, spans


def run(env: BenchEnv, timing: Timing, seconds: float, backlog: int) -> list[Row]:
    one_settings = env.settings()
    cluster_settings = env.cluster_settings()
    assert env.cluster is not None
    one = connect_sync(one_settings, socket_timeout=30)
    on_one, on_cluster = reads_processed(one), data_commands(env.cluster)
    try:
        with server(one_settings) as single, server(cluster_settings) as clustered:
            warm(single.target)
            warm(clustered.target)
            keys = Keys(cluster_settings.key_namespace)
            cost, spans = page_pass(clustered.target, keys, on_cluster)
            errors = env.cluster.errorstats()
            both = [
                (single, on_one, pids([env.redis])),
                (clustered, on_cluster, pids(env.cluster.nodes)),
            ]
            get1, getc = alternating(both, "GetProduct", get_requests(), timing)
            list1, listc = alternating(both, "ListProducts", list_requests(), timing)
            errors = env.cluster.errorstats() - errors
    finally:
        one.close()

    bound = len(spans) + sum(spans)  # 1 + slots, per page of the pass
    rows = standard_rows("GetProduct hit, one Redis", get1)
    rows += targeted(standard_rows(GET, getc, get1), {"RPS": ">= 0.9"})
    rows.append(Row(GET, "Redis requests per call", getc["redis_per_call"], "", target="== 1"))
    rows.append(Row.vs(GET, "Redis CPU per 1k req (every node)", getc["redis_cpu_s_per_1k"], "s", get1["redis_cpu_s_per_1k"]))  # fmt: skip  # noqa: E501
    rows.append(Row(GET, "MOVED or ASK replies, both hit loads", errors["MOVED"] + errors["ASK"], "replies", target="== 0"))  # fmt: skip  # noqa: E501
    rows += standard_rows(LIST, listc, list1)
    rows.append(Row.vs(LIST, "Redis CPU per 1k req (every node)", listc["redis_cpu_s_per_1k"], "s", list1["redis_cpu_s_per_1k"]))  # fmt: skip  # noqa: E501
    rows.append(Row(LIST, "Redis requests per call, under the load", listc["redis_per_call"], ""))  # fmt: skip  # noqa: E501
    pages = f"one pass over the {len(spans)} pages"
    rows.append(Row(LIST, f"Redis requests, {pages}", cost, "requests", target=f"<= {bound}"))  # fmt: skip  # noqa: E501
    rows.append(Row(LIST, f"bound: 1 + slots its products span, summed over {pages}", bound, "requests"))  # fmt: skip  # noqa: E501
    rows.append(Row(LIST, "slots a page's products span, most", max(spans), "slots"))  # fmt: skip
    rows += invalidation.run(env, seconds, backlog, counts=(1,), label="cluster baseline: invalidation on one Redis")  # fmt: skip  # noqa: E501
    rows += invalidation.run(
        env, seconds, backlog, counts=(1, 3), settings_of=env.cluster_settings,
        label="cluster: invalidation",
    )  # fmt: skip
    return rows
