"""The near cache (L1, ``CATALOG_NEAR_CACHE_ENABLED``) against the bare in-memory gRPC floor, and
a Zipf(1.1) read load with it on and off. One after another, in the same run:

* GetProduct of one product with L1 off (a Redis hit), floor (b) of bench/rpc.py
  (``bench/floor_server.py echo``: a bare grpc.aio server answering the product's stored bytes
  from memory), and GetProduct of that product held in L1: each loaded by h2load
  (bench/h2load.py), a C generator that costs the machine little CPU, with the connections and
  calls in flight of bench/loadgen.py. Floor (b) and the L1 hit run in :data:`PAIRS`
  alternating pairs, both servers up, one loaded at a time, their runs added up: a shared
  machine drifts by more than the difference measured, and alternation gives both the same
  drift. Both also at a fixed rate (open loop), where their CPU per call compares at the
  same load. Each h2load run is checked (the
  service's ``grpc_server_handled_total`` OK count, the floor's response bytes), and the L1 run
  also by the near cache's own counters: were its lookups not hits, it measured Redis, not L1.
  The idle CPU of a server with L1 on (its heartbeats) and off.
* Zipf(1.1) over all 100k products, GetProduct only, every product cached in Redis first (a
  BatchGet pass), each server started with an empty L1: bench/loadgen.py (h2load sends one
  body, so one id), a warm-up process on the first half of the draws, then the measured one on
  the second half. The L1 hit ratio is its counters' over the measured process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from redis import Redis

from bench import h2load
from bench.environment import PRODUCTS, BenchEnv
from bench.loadgen import CONNECTIONS, Spec, run_process
from bench.measure import cpu_seconds
from bench.report import Row
from bench.rpc import HOT_IDS, SERVICE, Timing, server, standard_rows, targeted
from bench.zipf import sampler
from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.keys import Keys
from core.redisclient import connect_sync
from core.settings import Settings
from devtools.serverprocess import ServerProcess

NEAR = "catalog_near_cache_requests_total"
CACHE = "catalog_cache_requests_total"
PRODUCT = HOT_IDS[0]
FLOOR = "(b) bare gRPC echo, no Redis (h2load)"
L1_HIT = "GetProduct L1 hit vs floor (b) (h2load)"
REDIS_HIT = "GetProduct Redis hit, L1 off, vs floor (b) (h2load)"
ZIPF = "Zipf(1.1) over 100k, GetProduct, L1 on vs off (loadgen.py)"
#: Floor and L1-hit runs per benchmark run, alternating (floor first, then L1 first, ...), each
#: the length of a bench/rpc.py run; their figures are added up (h2load.combine).
PAIRS = 4
#: The open-loop rate of the fixed-rate rows: one both servers sustain on a shared 2-core machine,
#: so their CPU per call is compared at the same load (the heartbeats' cost is per second).
FIXED_RATE = 1000.0
FIXED = f"(b) bare gRPC echo at a fixed {FIXED_RATE:,.0f} req/s (h2load --rps)"
FIXED_HIT = f"GetProduct L1 hit vs (b), both at a fixed {FIXED_RATE:,.0f} req/s (h2load --rps)"


def near_counts(proc: ServerProcess) -> dict[str, float]:
    return {r: proc.metric(NEAR, result=r) for r in ("hit", "miss", "suspended")}


def near_delta(proc: ServerProcess, before: dict[str, float]) -> dict[str, float]:
    """The near cache's lookups since ``before`` by result, and ``all``."""
    delta = {r: n - before[r] for r, n in near_counts(proc).items()}
    return delta | {"all": sum(delta.values())}


def ok_calls(proc: ServerProcess) -> Callable[[], float]:
    return lambda: proc.metric(
        "grpc_server_handled_total", grpc_method="GetProduct", grpc_code="OK"
    )


def h2load_run(
    proc: ServerProcess, timing: Timing, rate: float | None = None, **check: Any
) -> dict[str, Any]:
    request = pb.GetProductRequest(id=PRODUCT).SerializeToString()
    load = h2load.Load(
        proc.target, SERVICE + "GetProduct", request, CONNECTIONS, timing.concurrency,
        timing.warmup_s, timing.duration_s, proc.pids, rate,
    )  # fmt: skip
    result = h2load.run(load, **check)
    if not result["valid"]:
        print(f"  INVALID h2load run on {' '.join(proc.command)}: {result['why']}", flush=True)
    return result


def warm_near(proc: ServerProcess, within_s: float = 10.0) -> None:
    """GetProduct of :data:`PRODUCT` until the near cache serves it (a Redis hit fills it once
    its channel is up: until the first heartbeat is back, fills are refused)."""
    deadline = time.monotonic() + within_s
    with grpc.insecure_channel(proc.target) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        while near_counts(proc)["hit"] < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the near cache served no hit within {within_s:g} s")
            stub.GetProduct(pb.GetProductRequest(id=PRODUCT))
            time.sleep(0.01)


def idle_cores(proc: ServerProcess, seconds: float) -> float:
    """The server's CPU with nothing to answer (the near cache's heartbeats, the monitors)."""
    before = cpu_seconds(proc.pids)
    time.sleep(seconds)
    return (cpu_seconds(proc.pids) - before) / seconds


def hit_rows(env: BenchEnv, timing: Timing, idle_s: float) -> list[Row]:
    on = env.settings(near_cache_enabled=True)
    off = on.replace(near_cache_enabled=False)
    key = Keys(on.key_namespace).product(PRODUCT)
    redis = connect_sync(on, socket_timeout=30)
    assert isinstance(redis, Redis)
    try:
        with server(off) as plain:
            with grpc.insecure_channel(plain.target) as channel:  # a miss fills Redis
                catalog_pb2_grpc.CatalogServiceStub(channel).GetProduct(
                    pb.GetProductRequest(id=PRODUCT)
                )
            idle_off = idle_cores(plain, idle_s)
            via_redis = h2load_run(plain, timing, ok_calls=ok_calls(plain))
        size = len(redis.get(key) or b"")
        with (
            server(on, "-m", "bench.floor_server", "echo", key) as echo,
            server(on) as l1,
        ):
            warm_near(l1)
            idle_on = idle_cores(l1, idle_s)
            floor_runs: list[dict[str, Any]] = []
            hit_runs: list[dict[str, Any]] = []
            before, reads0 = near_counts(l1), redis.info("stats")["total_reads_processed"]
            for i in range(PAIRS):  # alternating, so both meet the same machine
                for proc in (echo, l1) if i % 2 == 0 else (l1, echo):
                    if proc is echo:
                        floor_runs.append(h2load_run(echo, timing, response_size=size))
                    else:
                        hit_runs.append(h2load_run(l1, timing, ok_calls=ok_calls(l1)))
            lookups = near_delta(l1, before)
            reads = redis.info("stats")["total_reads_processed"] - reads0 - 1  # our own INFO
            floor, hit = h2load.combine(floor_runs), h2load.combine(hit_runs)
            floor_fixed = h2load_run(echo, timing, FIXED_RATE, response_size=size)
            hit_fixed = h2load_run(l1, timing, FIXED_RATE, ok_calls=ok_calls(l1))
    finally:
        redis.close()

    # Each pair's ratios, as they come: the medians hide how far the pairs scatter.
    pairs = ", ".join(
        f"{h['rps'] / f['rps']:.2f}/{h['server_cpu_s_per_1k'] / f['server_cpu_s_per_1k']:.2f}"
        for f, h in zip(floor_runs, hit_runs, strict=True)
    )
    print(f"  L1 hit / floor (b) by pair, RPS/CPU per call: {pairs}", flush=True)
    print(
        f"  L1 hit / floor (b): RPS {hit['rps'] / floor['rps']:.2f}, CPU per call "
        f"{hit['server_cpu_s_per_1k'] / floor['server_cpu_s_per_1k']:.2f} (at "
        f"{FIXED_RATE:,.0f} req/s: "
        f"{hit_fixed['server_cpu_s_per_1k'] / floor_fixed['server_cpu_s_per_1k']:.2f})",
        flush=True,
    )
    rows = standard_rows(FLOOR, floor)
    rows += targeted(
        standard_rows(L1_HIT, hit, floor), {"RPS": ">= 0.85", "server CPU per 1k req": "<= 1.15"}
    )
    rows += [
        Row(L1_HIT, "lookups served by L1", 100 * lookups["hit"] / max(1.0, lookups["all"]), "%",
            target=">= 99"),
        Row(L1_HIT, "Redis requests per call (heartbeats included)", reads / max(1, hit["count"]),
            ""),
        Row("idle server, L1 on (heartbeats)", "CPU", idle_on, "cores"),
        Row("idle server, L1 off", "CPU", idle_off, "cores"),
    ]  # fmt: skip
    rows += standard_rows(REDIS_HIT, via_redis, floor)
    rows += standard_rows(FIXED, floor_fixed)
    rows += standard_rows(FIXED_HIT, hit_fixed, floor_fixed)
    checked = ((FLOOR, floor), (L1_HIT, hit), (REDIS_HIT, via_redis), (FIXED, floor_fixed),
               (FIXED_HIT, hit_fixed))  # fmt: skip
    for scenario, r in checked:
        # 1: the run failed its check (bench/h2load.py), its figures are not to be trusted.
        rows.append(Row(scenario, "invalid run", 0.0 if r["valid"] else 1.0, "", target="== 0"))
    return rows


def fill(target: str) -> None:
    """Every product into Redis (BatchGetProducts of 100 at a time)."""
    with grpc.insecure_channel(target) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        for k in range(0, PRODUCTS, 100):
            ids = [f"p{i:07d}" for i in range(k + 1, k + 101)]
            stub.BatchGetProducts(pb.BatchGetProductsRequest(ids=ids))


def zipf_load(
    settings: Settings, warmup_s: float, duration_s: float, draws: list[str], concurrency: int
) -> dict[str, Any]:
    """A fresh server (empty L1): warm-up on the first half of ``draws``, then the measured run
    on the second half; adds the near cache's lookups over the measured run."""
    requests = [pb.GetProductRequest(id=i).SerializeToString() for i in draws]
    half = len(requests) // 2
    with server(settings) as proc:
        method = SERVICE + "GetProduct"
        warm = run_process(Spec([proc.target], method, requests[:half], concurrency, 0.0, warmup_s))
        before = near_counts(proc)
        redis0, hits0 = proc.metric(CACHE, op="get"), proc.metric(CACHE, op="get", result="hit")
        names0 = proc.metric("catalog_db_loads_total", op="get_names")
        spec = Spec([proc.target], method, requests[half:], concurrency, 0.5, duration_s, proc.pids)
        result = run_process(spec)
        result["near"] = near_delta(proc, before)
        redis = proc.metric(CACHE, op="get") - redis0
        result["redis_hit_ratio"] = (proc.metric(CACHE, op="get", result="hit") - hits0) / max(
            1.0, redis
        )
        names = proc.metric("catalog_db_loads_total", op="get_names") - names0
        result["names_per_1k"] = names / result["total"] * 1000
        result["near_entries"] = proc.metric("catalog_near_cache_entries")
        result["first_hit_ratio"] = first_reference_hits(draws, warm["total"], result["total"])
    return result


def first_reference_hits(draws: list[str], warmed: int, measured: int) -> float:
    """The hit ratio of the measured calls of :func:`zipf_load` if only an id's first call
    since the server started missed (an unbounded cache that nothing invalidates): calls are
    taken as made in order, ``warmed`` from the first half of ``draws``, ``measured`` from the
    second."""
    seen = set(draws[:warmed])
    second = draws[len(draws) // 2 :][:measured]
    hits = 0
    for product_id in second:
        hits += product_id in seen
        seen.add(product_id)
    return hits / max(1, len(second))


def zipf_rows(env: BenchEnv, timing: Timing, warmup_s: float, duration_s: float) -> list[Row]:
    off = env.settings()
    on = off.replace(near_cache_enabled=True)
    with server(off) as filler:
        fill(filler.target)
    draws = sampler()
    r_off = zipf_load(off, warmup_s, duration_s, draws, timing.concurrency)
    r_on = zipf_load(on, warmup_s, duration_s, draws, timing.concurrency)
    near = r_on["near"]
    rows = standard_rows(f"{ZIPF}: L1 off", r_off)
    rows += standard_rows(f"{ZIPF}: L1 on vs off", r_on, r_off)
    rows += [
        Row(ZIPF, "L1 hit ratio", 100 * near["hit"] / max(1.0, near["all"]), "%"),
        Row(ZIPF, "L1 hit ratio if only first calls of an id missed", 100 * r_on["first_hit_ratio"],
            "%"),
        Row(ZIPF, "L1 lookups suspended (watermark too old)",
            100 * near["suspended"] / max(1.0, near["all"]), "%"),
        Row(ZIPF, "L1 entries at the end", r_on["near_entries"], "entries"),
        Row(f"{ZIPF}: L1 off", "Redis hit ratio", 100 * r_off["redis_hit_ratio"], "%"),
        Row(f"{ZIPF}: L1 on vs off", "Redis hit ratio (L1 misses)", 100 * r_on["redis_hit_ratio"],
            "%"),
        Row.vs(f"{ZIPF}: L1 on vs off", "name loads (SQL) per 1k calls", r_on["names_per_1k"],
               "", r_off["names_per_1k"]),
    ]  # fmt: skip
    return rows


def run(
    env: BenchEnv, timing: Timing, zipf_warmup_s: float, zipf_duration_s: float, idle_s: float
) -> list[Row]:
    h2load.require()
    return hit_rows(env, timing, idle_s) + zipf_rows(env, timing, zipf_warmup_s, zipf_duration_s)
