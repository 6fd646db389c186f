"""``catalog serve --workers 2``: two processes share the port and stop together on SIGTERM."""

from __future__ import annotations

import signal

import pytest
from grpc import aio

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.settings import Settings, SettingsError
from devtools.serverprocess import scrape
from tests.processes import ServerProcess

pytestmark = pytest.mark.slow


async def test_two_workers_serve_one_port_and_stop_on_sigterm(settings: Settings) -> None:
    server = ServerProcess(settings.replace(workers=2)).start()
    try:
        assert len(server.pids) == 3, "the parent and two workers"
        calls = 20
        for _ in range(calls):  # a fresh channel per call: connections land on either worker
            async with aio.insecure_channel(server.target) as channel:
                stub = catalog_pb2_grpc.CatalogServiceStub(channel)
                reply = await stub.GetProduct(pb.GetProductRequest(id="p0000001"))
                assert reply.id == "p0000001"
        # Each worker exports its own counters on its own port; together they saw every call.
        ok = {"grpc_method": "GetProduct", "grpc_code": "OK"}
        per_worker = [
            scrape(port, "grpc_server_handled_total", **ok) for port in server.metrics_ports
        ]
        assert len(per_worker) == 2
        assert sum(per_worker) == calls
        assert server.metric("catalog_cache_requests_total", op="get") == calls
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.stop()


def test_several_workers_need_a_fixed_port() -> None:
    with pytest.raises(SettingsError, match="CATALOG_WORKERS"):
        Settings.from_env({}, workers=2, grpc_address="127.0.0.1:0")


def test_a_taken_worker_metrics_port_is_a_configuration_error(settings: Settings) -> None:
    """Worker 1's metrics port (base + 1) is taken by another process: the group exits with a
    message naming the port range, not a traceback."""
    import socket
    import subprocess
    import sys

    from devtools.localservers import free_port
    from devtools.serverprocess import free_port_run
    from tests.processes import settings_env

    base = free_port_run(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        env = settings_env(
            settings.replace(workers=2, grpc_address=f"127.0.0.1:{free_port()}", metrics_port=base)
        )
        done = subprocess.run(
            [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode != 0
    assert f"cannot serve metrics on 127.0.0.1:{base + 1}" in done.stderr
    assert "CATALOG_METRICS_PORT + N - 1" in done.stderr
    assert "Traceback" not in done.stderr
