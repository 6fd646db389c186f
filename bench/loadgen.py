"""The load generator: a process of its own that keeps N calls in flight for a fixed time.

``python -m bench.loadgen`` reads a :class:`Spec` as JSON on stdin and prints a summary as JSON.
Requests are serialized once, up front, and responses are not decoded, so the client spends its
time on gRPC itself. Calls are spread over several connections (a server with several
``SO_REUSEPORT`` workers gets connections, not calls, spread over it). Closed loop: each of the
``concurrency`` tasks sends its next call when the previous one returns.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from bench.measure import Window

CONNECTIONS = 8
# Distinct channels must not share one connection (gRPC pools subchannels per process).
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Spec:
    targets: list[str]
    method: str
    requests: list[bytes]
    concurrency: int = 16
    warmup_s: float = 1.0
    duration_s: float = 5.0
    server_pids: list[int] = field(default_factory=list)
    burst: bool = False  # send every request at once, once (no warm-up)
    latencies: bool = False  # add the measured latencies (s) to the summary, to merge windows

    def to_json(self) -> str:
        data = self.__dict__ | {"requests": [base64.b64encode(r).decode() for r in self.requests]}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        data = json.loads(text)
        data["requests"] = [base64.b64decode(r) for r in data["requests"]]
        return cls(**data)


Call = aio.UnaryUnaryMultiCallable[bytes, bytes]


async def closed_loop(calls: list[Call], spec: Spec, window: Window) -> None:
    stop = False
    requests = spec.requests

    async def worker(n: int) -> None:
        call = calls[n % len(calls)]
        i = n
        latencies = window.latencies
        while not stop:
            request = requests[i % len(requests)]
            i += spec.concurrency
            t0 = time.perf_counter()
            try:
                await call(request, timeout=30)
            except aio.AioRpcError:
                if window.recording:
                    window.errors += 1
                continue
            window.total += 1
            if window.recording:
                latencies.append(time.perf_counter() - t0)

    tasks = [asyncio.create_task(worker(n)) for n in range(spec.concurrency)]
    await asyncio.sleep(spec.warmup_s)
    window.start()
    await asyncio.sleep(spec.duration_s)
    window.stop()
    stop = True
    await asyncio.gather(*tasks)


async def burst(calls: list[Call], spec: Spec, window: Window) -> None:
    async def one(call: Call, request: bytes) -> None:
        t0 = time.perf_counter()
        try:
            await call(request, timeout=30)
        except aio.AioRpcError:
            window.errors += 1
            return
        window.latencies.append(time.perf_counter() - t0)

    pending = [one(calls[n % len(calls)], r) for n, r in enumerate(spec.requests)]
    window.start()
    await asyncio.gather(*pending)
    window.stop()


async def run(spec: Spec) -> dict[str, Any]:
    channels = [
        aio.insecure_channel(target, options=_OWN_CONNECTION)
        for _ in range(1 if spec.burst else CONNECTIONS)
        for target in spec.targets
    ]
    try:
        await asyncio.gather(*(c.channel_ready() for c in channels))
        calls: list[Call] = [
            c.unary_unary(spec.method, request_serializer=None, response_deserializer=None)
            for c in channels
        ]
        window = Window(spec.server_pids, [])
        await (burst if spec.burst else closed_loop)(calls, spec, window)
        return window.summary(**({"latencies": window.latencies} if spec.latencies else {}))
    finally:
        for channel in channels:
            await channel.close(None)


def run_process(spec: Spec) -> dict[str, Any]:
    """Run ``spec`` in a load-generator process of its own; its summary."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        input=spec.to_json().encode(),
        capture_output=True,
        check=False,
        timeout=spec.warmup_s + spec.duration_s + 120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main() -> None:
    spec = Spec.from_json(sys.stdin.read())
    print(json.dumps(asyncio.run(run(spec))))


if __name__ == "__main__":
    main()
