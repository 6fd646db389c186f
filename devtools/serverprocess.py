"""``python -m service`` as a child process, for tests and benchmarks (never production).

The child gets its settings through ``CATALOG_*`` variables and runs in a process group of its
own, so stopping it also stops the workers it forked (``--workers``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from core.settings import PREFIX, Settings
from devtools.localservers import children, free_port, wait_for_port


def settings_env(settings: Settings) -> dict[str, str]:
    """The CATALOG_* variables that reproduce ``settings`` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    for name in Settings.__dataclass_fields__:
        env[PREFIX + name.upper()] = str(getattr(settings, name))
    return env


def scrape(metrics_port: int, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``, read from /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive ports free right now (worker i's metrics: base + i)."""
    for _ in range(50):
        base = free_port()
        if base + count - 1 > 65535:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(base + 1, base + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        return base
    raise RuntimeError(f"no {count} consecutive free ports")


@dataclass
class ServerProcess:
    """``python -m service`` on free ports, with its metrics endpoint."""

    settings: Settings
    port: int = field(default_factory=free_port)
    #: Worker i (``--workers``) serves metrics on ``metrics_port + i``; chosen in :meth:`start`.
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    #: What ``python`` runs: the service, or another server taking the same settings.
    command: tuple[str, ...] = ("-m", "service")

    def start(self) -> ServerProcess:
        if not self.metrics_port:
            self.metrics_port = free_port_run(self.settings.workers)
        settings = self.settings.replace(
            grpc_address=f"127.0.0.1:{self.port}", metrics_port=self.metrics_port
        )
        self.proc = subprocess.Popen(
            [sys.executable, *self.command],
            env=settings_env(settings),
            process_group=0,
        )
        wait_for_port(self.port, timeout=30)
        for port in self.metrics_ports:
            wait_for_port(port, timeout=30)
        return self

    @property
    def metrics_ports(self) -> list[int]:
        """One metrics port per worker."""
        return [self.metrics_port + i for i in range(self.settings.workers)]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        """The server process and its direct children (workers)."""
        assert self.proc is not None
        return [self.proc.pid, *children(self.proc.pid)]

    def metric(self, name: str, **labels: str) -> float:
        """Sum over every worker of the samples of ``name`` whose labels include ``labels``."""
        return sum(scrape(port, name, **labels) for port in self.metrics_ports)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Kill the server and every process of its group (workers), then reap it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
