"""``catalog serve --workers 2``: two processes share the port and stop together on SIGTERM."""

from __future__ import annotations

import signal

import pytest
from grpc import aio

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.settings import Settings, SettingsError
from tests.processes import ServerProcess

pytestmark = pytest.mark.slow


async def test_two_workers_serve_one_port_and_stop_on_sigterm(settings: Settings) -> None:
    server = ServerProcess(settings.replace(workers=2)).start()
    try:
        assert len(server.pids) == 3, "the parent and two workers"
        for _ in range(5):  # a fresh channel per call: connections land on either worker
            async with aio.insecure_channel(server.target) as channel:
                stub = catalog_pb2_grpc.CatalogServiceStub(channel)
                reply = await stub.GetProduct(pb.GetProductRequest(id="p0000001"))
                assert reply.id == "p0000001"
        assert server.metric("catalog_cache_requests_total", op="get") >= 0
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.stop()


def test_several_workers_need_a_fixed_port() -> None:
    with pytest.raises(SettingsError, match="CATALOG_WORKERS"):
        Settings.from_env({}, workers=2, grpc_address="127.0.0.1:0")
