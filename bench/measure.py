"""What a load-generating process measures: latencies, throughput and the server's CPU time.

Latencies are recorded only after the warm-up; the servers' CPU time is read from ``/proc`` at the
two edges of the measured window, so it covers exactly the requests counted.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (0 for a process that is gone)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclass
class Window:
    """One measured window: started after the warm-up, stopped at the end of the duration."""

    server_pids: list[int]
    latencies: list[float]
    errors: int = 0
    total: int = 0  # completed calls, warm-up included
    started: float = 0.0
    stopped: float = 0.0
    server_cpu0: float = 0.0
    server_cpu1: float = 0.0
    client_cpu0: float = 0.0
    client_cpu1: float = 0.0
    recording: bool = False

    def start(self) -> None:
        self.latencies.clear()
        self.errors = 0
        self.server_cpu0 = cpu_seconds(self.server_pids)
        self.client_cpu0 = time.process_time()
        self.started = time.perf_counter()
        self.recording = True

    def stop(self) -> None:
        self.recording = False
        self.stopped = time.perf_counter()
        self.server_cpu1 = cpu_seconds(self.server_pids)
        self.client_cpu1 = time.process_time()

    def summary(self, **extra: Any) -> dict[str, Any]:
        return (
            summarize(
                len(self.latencies),
                self.errors,
                self.stopped - self.started,
                sorted(self.latencies),
                self.server_cpu1 - self.server_cpu0,
                self.client_cpu1 - self.client_cpu0,
                self.total,
            )
            | extra
        )


def summarize(
    count: int,
    errors: int,
    elapsed: float,
    latencies: list[float],
    server_cpu: float,
    client_cpu: float,
    total: int,
) -> dict[str, Any]:
    """The :class:`Summary` of ``count`` calls in ``elapsed`` seconds (``latencies`` sorted;
    CPU in seconds over the same time)."""
    return asdict(
        Summary(
            count=count,
            errors=errors,
            elapsed_s=elapsed,
            rps=count / elapsed if elapsed else 0.0,
            p50_ms=percentile(latencies, 0.50) * 1000,
            p90_ms=percentile(latencies, 0.90) * 1000,
            p99_ms=percentile(latencies, 0.99) * 1000,
            server_cpu_s_per_1k=server_cpu / count * 1000 if count else float("nan"),
            server_cores=server_cpu / elapsed if elapsed else 0.0,
            client_cores=client_cpu / elapsed if elapsed else 0.0,
            total=total,
        )
    )


def merge(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of several windows on the same server(s), each summarized with its
    ``latencies``: totals add up, rates and CPU are over the windows' summed time, and the
    percentiles are of every latency."""
    return summarize(
        sum(s["count"] for s in summaries),
        sum(s["errors"] for s in summaries),
        sum(s["elapsed_s"] for s in summaries),
        sorted(x for s in summaries for x in s["latencies"]),
        sum(s["server_cores"] * s["elapsed_s"] for s in summaries),
        sum(s["client_cores"] * s["elapsed_s"] for s in summaries),
        sum(s["total"] for s in summaries),
    )


@dataclass(frozen=True)
class Summary:
    count: int
    errors: int
    elapsed_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server_cpu_s_per_1k: float
    server_cores: float
    client_cores: float
    total: int
