"""``python -m bench [--quick] [--runs N] [--only NAME ...]``: run every scenario N times (3;
1 with ``--quick``, which also shortens every duration), print the medians as one table, and
write them to ``docs/benchmarks.md`` and ``bench/results.json`` (replacing the figures of the
groups that ran, keeping the others')."""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import capture, cluster, invalidation, near, rpc, stampede, zipf
from bench.environment import BenchEnv
from bench.report import Row, medians, table, write

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "bench" / "NOTES.md"


def scenarios(quick: bool) -> dict[str, Callable[[BenchEnv], list[Row]]]:
    timing = rpc.Timing(1.0, 2.5) if quick else rpc.Timing(1.0, 4.0)
    return {
        "rpc": lambda env: rpc.run(env, timing),
        "stampede": lambda env: stampede.run(env),
        "invalidation": lambda env: invalidation.run(
            env, 5.0 if quick else 30.0, 10_000 if quick else 30_000
        ),
        "zipf": lambda env: zipf.run(env, 2.0 if quick else 3.0, 5.0 if quick else 12.0),
        "capture": lambda env: capture.run(
            env, 5.0 if quick else 20.0, idle_s=10.0 if quick else 30.0
        ),
        "price_rule": lambda env: capture.run_price_rule(env),
        # Its invalidation phases are shorter than the invalidation group's: it runs them three
        # times (one Redis, then the cluster with 1 and 3 invalidators).
        "cluster": lambda env: cluster.run(
            env, timing, 5.0 if quick else 15.0, 10_000 if quick else 20_000
        ),
        "near": lambda env: near.run(
            env, timing, 2.0 if quick else 3.0, 5.0 if quick else 12.0, 1.0 if quick else 3.0
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short run (about 2 minutes)")
    parser.add_argument("--runs", type=int, help="repetitions (default 3, or 1 with --quick)")
    parser.add_argument("--only", nargs="*", help="scenario groups to run (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    every = scenarios(args.quick)
    if unknown := set(args.only or ()) - every.keys():
        parser.error(f"no scenario group {', '.join(sorted(unknown))} (groups: {', '.join(every)})")
    chosen = {k: v for k, v in every.items() if not args.only or k in args.only}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="catalog-bench-") as tmp:
        env = BenchEnv(Path(tmp)).start()
        try:
            results: dict[str, list[list[Row]]] = {name: [] for name in chosen}
            for n in range(runs):
                for name, scenario in chosen.items():
                    print(f"run {n + 1}/{runs}: {name} ...", flush=True)
                    results[name].append(scenario(env))
        finally:
            env.stop()
    final = {name: medians(group_runs) for name, group_runs in results.items()}
    print(table([row for rows in final.values() for row in rows]))
    print(f"\n{runs} run(s) in {time.monotonic() - started:.0f} s")
    if not args.no_write:
        write(final, runs, NOTES.read_text().strip(), ROOT / "docs" / "benchmarks.md",
              ROOT / "bench" / "results.json", list(every))  # fmt: skip


if __name__ == "__main__":
    main()
