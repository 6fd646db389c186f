"""Stampede: 1,000 concurrent GetProduct calls on one cold key, split over two server processes.

Exactly one database load per key is the target: single-flight inside each process, the lease
across them. Several rounds, each on a key never read before; the figures are the worst round's
loads and the median round's latencies.
"""

from __future__ import annotations

import statistics

from bench.environment import BenchEnv
from bench.loadgen import Spec, run_process
from bench.report import Row
from bench.rpc import SERVICE, server
from catalog.v1 import catalog_pb2 as pb

CALLS = 1000


def run(env: BenchEnv, rounds: int = 3) -> list[Row]:
    settings = env.settings()
    loads: list[float] = []
    results = []
    with server(settings) as a, server(settings) as b:
        for n in range(rounds):
            request = pb.GetProductRequest(id=f"p{90_001 + n:07d}").SerializeToString()

            def db_loads() -> float:
                return sum(s.metric("catalog_db_loads_total", op="get_products") for s in (a, b))

            before = db_loads()
            spec = Spec(
                [a.target, b.target],
                SERVICE + "GetProduct",
                [request] * CALLS,
                server_pids=a.pids + b.pids,
                burst=True,
            )
            results.append(run_process(spec))
            loads.append(db_loads() - before)
    scenario = f"stampede: {CALLS} calls, cold key, 2 processes"
    return [
        Row(scenario, "DB loads per key (worst round)", max(loads), "loads", target="== 1"),
        Row(scenario, "p50", statistics.median(r["p50_ms"] for r in results), "ms"),
        Row(scenario, "p99", statistics.median(r["p99_ms"] for r in results), "ms"),
        Row(scenario, "errors", sum(r["errors"] for r in results), "calls", target="== 0"),
    ]
