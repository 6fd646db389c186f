"""bench/h2load.py's arithmetic: runs added up as one (the near group's alternating pairs)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.h2load import combine, frame, parse
from bench.measure import summarize


def run(count: int, seconds: float, latency: float, cpu: float, why: str = "") -> dict[str, Any]:
    """A result of ``h2load.run``: ``count`` calls of ``latency`` each."""
    latencies = [latency] * count
    return summarize(count, 0, seconds, latencies, cpu, cpu / 10, count) | {
        "valid": not why,
        "why": why,
        "latencies": latencies,
    }


def test_runs_combine_as_one_run_of_all_their_calls() -> None:
    a, b = run(100, 1.0, 0.001, 0.05), run(300, 2.0, 0.003, 0.25, why="1 bad")
    both = combine([a, b])
    assert both["count"] == 400
    assert both["rps"] == 400 / 3.0  # calls over time, not a mean of the two rates (100, 150)
    assert both["server_cpu_s_per_1k"] == pytest.approx(0.3 / 400 * 1000)
    assert both["server_cores"] == pytest.approx(0.1)
    assert both["client_cores"] == pytest.approx(0.01)
    assert both["p50_ms"] == 3.0 and both["p90_ms"] == 3.0  # over every call
    assert not both["valid"] and both["why"] == "1 bad"
    assert combine([a])["valid"] and combine([a])["rps"] == a["rps"]


def test_a_grpc_frame_and_the_summary_h2load_prints() -> None:
    assert frame(b"ab") == b"\x00\x00\x00\x00\x02ab"
    out = (
        "finished in 4.01s, 2500.00 req/s, 1.50MB/s\n"
        "requests: 10000 total, 10000 started, 10000 done, 9999 succeeded, 1 failed, "
        "0 errored, 0 timeout\n"
        "traffic: 6.01MB (6301234) total, 1.00KB (1024) headers (space savings 90.00%), "
        "5.62MB (5890000) data\n"
    )
    got = parse(out)
    assert got["elapsed_s"] == 4.01 and got["succeeded"] == 9999 and got["failed"] == 1
    assert got["data_bytes"] == 5890000
