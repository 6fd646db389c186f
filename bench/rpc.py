"""Throughput scenarios: the floors, then each read RPC on a hit and with the cache disabled.

All run closed-loop with the same concurrency and connections, one after another, against
servers started for this run (the idle ones cost nothing measurable). Ratios compare figures of
this run only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from redis import Redis, RedisCluster

from bench.environment import BenchEnv
from bench.loadgen import Spec, run_process
from bench.measure import cpu_seconds, merge
from bench.report import Row
from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.keys import Keys
from core.redisclient import connect_sync
from core.settings import Settings
from devtools.serverprocess import ServerProcess

SERVICE = "/catalog.v1.CatalogService/"
HOT_IDS = [f"p{i:07d}" for i in range(1, 2001)]
CATEGORIES = [f"c{i:05d}" for i in range(1, 501)]


@dataclass(frozen=True)
class Timing:
    warmup_s: float
    duration_s: float
    concurrency: int = 16


def get_requests() -> list[bytes]:
    return [pb.GetProductRequest(id=i).SerializeToString() for i in HOT_IDS[:1000]]


def list_requests() -> list[bytes]:
    return [
        pb.ListProductsRequest(page_size=20, category_id=c).SerializeToString() for c in CATEGORIES
    ]


def batch_requests() -> list[bytes]:
    return [
        pb.BatchGetProductsRequest(ids=HOT_IDS[k : k + 50]).SerializeToString()
        for k in range(0, len(HOT_IDS), 50)
    ]


@contextmanager
def server(settings: Settings, *command: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(settings, command=command) if command else ServerProcess(settings)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def warm(target: str) -> None:
    """Every request of the hit scenarios once, so the measured window sees only hits."""
    with grpc.insecure_channel(target) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        for k in range(0, len(HOT_IDS), 100):
            stub.BatchGetProducts(pb.BatchGetProductsRequest(ids=HOT_IDS[k : k + 100]))
        for c in CATEGORIES:
            stub.ListProducts(pb.ListProductsRequest(page_size=20, category_id=c))


#: Requests Redis has been sent so far, not counting those of the count itself.
RequestCount = Callable[[], int]


def reads_processed(redis: Redis | RedisCluster) -> RequestCount:
    """Requests one Redis server has read (``total_reads_processed``: a Lua script counts once,
    ``INFO commandstats`` would count the commands inside it), less this count's own INFOs."""
    infos = 0

    def count() -> int:
        nonlocal infos
        infos += 1
        return int(redis.info("stats")["total_reads_processed"]) - infos

    return count


def load(
    proc: ServerProcess,
    method: str,
    requests: list[bytes],
    timing: Timing,
    count: RequestCount,
    latencies: bool = False,
    redis_pids: tuple[int, ...] = (),
) -> dict[str, Any]:
    """One closed-loop run; adds Redis requests per call (all calls, warm-up included), and
    with ``latencies`` every measured latency (for :func:`bench.measure.merge`), and the CPU
    seconds ``redis_pids`` used (warm-up included)."""
    before = count()
    redis_cpu = cpu_seconds(list(redis_pids))
    result = run_process(
        Spec(
            [proc.target],
            SERVICE + method,
            requests,
            timing.concurrency,
            timing.warmup_s,
            timing.duration_s,
            proc.pids,
            latencies=latencies,
        )
    )
    result["redis_cpu_s"] = cpu_seconds(list(redis_pids)) - redis_cpu
    result["redis_requests"] = count() - before
    result["redis_per_call"] = result["redis_requests"] / max(1, result["total"])
    return result


def alternating(
    servers: list[tuple[ServerProcess, RequestCount, tuple[int, ...]]],
    method: str,
    requests: list[bytes],
    timing: Timing,
    rounds: int = 3,
) -> list[dict[str, Any]]:
    """:func:`load` on each server (with its request count and Redis processes) in turn,
    ``rounds`` times; per server, its windows merged, with Redis CPU per 1k calls.
    Comparisons between servers then see the same changes of the machine's load (a shared
    machine's other work comes and goes over seconds)."""
    runs: list[list[dict[str, Any]]] = [[] for _ in servers]
    for _ in range(rounds):
        for mine, (proc, count, pids) in zip(runs, servers, strict=True):
            mine.append(load(proc, method, requests, timing, count, True, pids))
    out = []
    for mine in runs:
        merged = merge(mine)
        calls = max(1, merged["total"])
        merged["redis_per_call"] = sum(r["redis_requests"] for r in mine) / calls
        merged["redis_cpu_s_per_1k"] = sum(r["redis_cpu_s"] for r in mine) / calls * 1000
        out.append(merged)
    return out


def standard_rows(
    scenario: str, r: dict[str, Any], base: dict[str, Any] | None = None
) -> list[Row]:
    """The standard figures of one run, as ratios of ``base`` when given."""
    figures = [
        ("RPS", "rps", "req/s"),
        ("p50", "p50_ms", "ms"),
        ("p90", "p90_ms", "ms"),
        ("p99", "p99_ms", "ms"),
        ("server CPU per 1k req", "server_cpu_s_per_1k", "s"),
    ]
    rows = [
        Row.vs(scenario, name, r[key], unit, base[key])
        if base
        else Row(scenario, name, r[key], unit)
        for name, key, unit in figures
    ]
    rows.append(Row(scenario, "load generator CPU", r["client_cores"], "cores"))
    if r["errors"]:
        rows.append(Row(scenario, "errors", r["errors"], "calls"))
    return rows


def targeted(rows: list[Row], targets: dict[str, str]) -> list[Row]:
    return [Row(**{**r.__dict__, "target": targets.get(r.figure, "")}) for r in rows]


def run(env: BenchEnv, timing: Timing) -> list[Row]:
    cached_settings = env.settings()
    key = Keys(cached_settings.key_namespace).product(HOT_IDS[0])
    assert env.redis is not None
    redis = connect_sync(cached_settings, socket_timeout=30)
    count = reads_processed(redis)
    rows: list[Row] = []
    try:
        with server(cached_settings) as cached:
            warm(cached.target)
            with server(cached_settings, "-m", "bench.floor_server", "redis", key) as floor:
                fl = load(floor, "GetProduct", get_requests(), timing, count)
            with server(cached_settings, "-m", "bench.floor_server", "echo", key) as echo:
                ec = load(echo, "GetProduct", get_requests(), timing, count)
            hit = {
                m: load(cached, m, reqs, timing, count)
                for m, reqs in (
                    ("GetProduct", get_requests()),
                    ("ListProducts", list_requests()),
                    ("BatchGetProducts", batch_requests()),
                )
            }
        with server(env.settings(cache_enabled=False)) as uncached:
            cold = {
                m: load(uncached, m, reqs, timing, count)
                for m, reqs in (
                    ("GetProduct", get_requests()),
                    ("ListProducts", list_requests()),
                    ("BatchGetProducts", batch_requests()),
                )
            }
        with server(cached_settings.replace(workers=2)) as two:
            w2 = load(two, "GetProduct", get_requests(), timing, count)
    finally:
        redis.close()

    rows += standard_rows("(a) floor: bare gRPC + 1 Redis GET", fl)
    rows += standard_rows("(b) bare gRPC echo, no Redis", ec)
    rows += targeted(
        standard_rows("GetProduct hit vs floor (a)", hit["GetProduct"], fl),
        {"RPS": ">= 0.9", "p50": "<= 1.15"},
    )
    rows.append(Row("GetProduct hit", "Redis requests per call", hit["GetProduct"]["redis_per_call"], "", target="<= 1.02"))  # fmt: skip  # noqa: E501
    for method in ("ListProducts", "BatchGetProducts"):
        label = {"ListProducts": "ListProducts page of 20", "BatchGetProducts": "BatchGetProducts of 50"}[method]  # fmt: skip  # noqa: E501
        rows += standard_rows(f"{label} uncached", cold[method])
        rows += targeted(standard_rows(f"{label} hit vs uncached", hit[method], cold[method]), {"RPS": ">= 3"})  # fmt: skip  # noqa: E501
        rows.append(Row(f"{label} hit", "Redis requests per call", hit[method]["redis_per_call"], "", target="<= 1.02"))  # fmt: skip  # noqa: E501
    rows += standard_rows("GetProduct uncached", cold["GetProduct"])
    rows.append(Row.vs("GetProduct hit, 2 workers vs 1", "RPS", w2["rps"], "req/s", hit["GetProduct"]["rps"]))  # fmt: skip  # noqa: E501
    rows.append(Row.vs("GetProduct hit, 2 workers vs 1", "server CPU per 1k req", w2["server_cpu_s_per_1k"], "s", hit["GetProduct"]["server_cpu_s_per_1k"]))  # fmt: skip  # noqa: E501
    rows.append(Row("GetProduct hit, 2 workers vs 1", "load generator CPU", w2["client_cores"], "cores"))  # fmt: skip  # noqa: E501
    return rows
