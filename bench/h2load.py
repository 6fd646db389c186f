"""h2load (nghttp2's HTTP/2 load generator, in C) driving one gRPC unary method over h2c.

A gRPC unary call is an HTTP/2 POST whose body is one length-prefixed message (a 0 byte, the
length as 4 big-endian bytes, the serialized request), with ``content-type: application/grpc``
and ``te: trailers``. h2load sends that same body on every stream, so it loads one request
(one product id); a workload of many ids needs bench/loadgen.py.

h2load reports HTTP statuses, and a gRPC call answers HTTP 200 whatever its gRPC status (that is
in the trailers, which h2load does not read), so a run is checked another way: ``ok_calls``, a
count of the calls the server answered OK (the service's ``grpc_server_handled_total``), must
grow by exactly the calls h2load completed, or, for a server without that metric, every
completed call must have carried a whole response message (h2load's DATA byte count). A run
that fails the check is returned with ``valid`` false and a ``why``.

Every h2load run makes a fixed number of calls (``-n``: h2load then completes every call it
starts, so the server's count can be compared exactly, and no call of an earlier run is still
being answered): a probe of 100 calls per connection and a warm-up of about ``warmup_s``, both
discarded, estimate the rate; the measured run makes rate x ``duration_s`` calls. Closed loop
(each connection keeps its share of ``concurrency`` calls in flight), or open loop at a fixed
``rate`` (``--rps``, spread over the connections). Latency percentiles come from h2load's
per-request log; the server's and h2load's own CPU from ``/proc`` and ``wait4`` around the
measured run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import cpu_seconds, merge, summarize

INSTALL = "apt-get install nghttp2-client"
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s)")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_DATA = re.compile(r"traffic: .*?, .*? headers .*?, [\d.]+[KMG]?B \((\d+)\) data")


def require() -> str:
    """The h2load binary's path; a clear error when it is missing."""
    path = shutil.which("h2load")
    if path is None:
        raise RuntimeError(f"h2load is not installed ({INSTALL}; `make bench` installs it)")
    return path


def frame(message: bytes) -> bytes:
    """``message`` as the body of a gRPC call: uncompressed flag, big-endian length, bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass
class Load:
    target: str  # host:port, plaintext HTTP/2 (h2c, prior knowledge)
    method: str  # /package.Service/Method
    request: bytes  # one serialized request message, sent on every call
    connections: int
    concurrency: int  # calls in flight in all, spread evenly over the connections
    warmup_s: float
    duration_s: float  # aimed at: the measured run makes warm-up rate x this many calls
    server_pids: list[int] = field(default_factory=list)
    rate: float | None = None  # calls/s in all (open loop, h2load --rps); None: closed loop


def parse(output: str) -> dict[str, float]:
    """h2load's summary: elapsed seconds, calls started/done/succeeded/failed, DATA bytes."""
    finished = _FINISHED.search(output)
    requests = _REQUESTS.search(output)
    data = _DATA.search(output)
    if finished is None or requests is None or data is None:
        raise RuntimeError(f"unexpected h2load output:\n{output[-3000:]}")
    elapsed = float(finished.group(1)) / (1000.0 if finished.group(2) == "ms" else 1.0)
    _, started, done, succeeded, failed, errored, timeout = map(int, requests.groups())
    return {
        "elapsed_s": elapsed,
        "started": started,
        "done": done,
        "succeeded": succeeded,
        "failed": failed + errored + timeout,
        "data_bytes": int(data.group(1)),
    }


def _h2load(load: Load, body: Path, *mode: str, log: Path | None = None) -> tuple[str, float]:
    """One h2load process; its output and its CPU seconds (user + system)."""
    per_connection = max(1, load.concurrency // load.connections)
    command = [
        require(), f"http://{load.target}{load.method}", "-d", str(body),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-c", str(load.connections), "-m", str(per_connection), "-t", "1", *mode,
    ]  # fmt: skip
    if load.rate is not None:
        command.append(f"--rps={load.rate / load.connections:g}")
    if log is not None:
        command.append(f"--log-file={log}")
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        output = proc.stdout.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"h2load failed ({proc.returncode}):\n{output[-3000:]}")
    return output, usage.ru_utime + usage.ru_stime


def _calls(load: Load, calls: float) -> int:
    """At least 100 calls per connection, the same number on each."""
    per_connection = max(100, round(calls / load.connections))
    return per_connection * load.connections


def run(
    load: Load,
    ok_calls: Callable[[], float] | None = None,
    response_size: int | None = None,
) -> dict[str, Any]:
    """Warm up, then measure; the figures of bench/measure.py's summary, ``valid``, ``why``
    and the latencies (for :func:`combine`). Check by ``ok_calls`` (the server's count of OK
    calls) when given, else by ``response_size`` (the response message's length)."""
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        body = Path(tmp) / "request"
        body.write_bytes(frame(load.request))
        probe = parse(_h2load(load, body, "-n", str(load.connections * 100))[0])
        rate = load.rate or probe["done"] / probe["elapsed_s"]
        warm = parse(_h2load(load, body, "-n", str(_calls(load, rate * load.warmup_s)))[0])
        calls = _calls(load, (load.rate or warm["done"] / warm["elapsed_s"]) * load.duration_s)
        log = Path(tmp) / "log"
        ok0 = ok_calls() if ok_calls is not None else 0.0
        server0 = cpu_seconds(load.server_pids)
        output, client_cpu = _h2load(load, body, "-n", str(calls), log=log)
        server_cpu = cpu_seconds(load.server_pids) - server0
        ok = ok_calls() - ok0 if ok_calls is not None else None
        latencies = sorted(
            int(fields[2]) / 1e6
            for fields in (line.split("\t") for line in log.read_text().splitlines())
            if fields[1] != "-1"
        )
    got = parse(output)
    done = int(got["succeeded"])
    why = []
    if got["failed"] or done != calls:
        why.append(f"{calls} calls asked, {done} succeeded, {got['failed']:.0f} failed")
    if ok is not None and ok != done:
        why.append(f"the server counted {ok:.0f} OK calls, h2load {done}")
    if ok is None and response_size is not None and got["data_bytes"] != done * (5 + response_size):
        why.append(f"{got['data_bytes']:.0f} response bytes, not {done} x {5 + response_size}")
    return summarize(done, int(got["failed"]), got["elapsed_s"], latencies, server_cpu,
                     client_cpu, done) | {"valid": not why, "why": "; ".join(why),
                                          "latencies": latencies}  # fmt: skip


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of :func:`run` as one (bench/measure.py's ``merge``), valid if all were."""
    return merge(results) | {
        "valid": all(r["valid"] for r in results),
        "why": "; ".join(r["why"] for r in results if r["why"]),
    }
