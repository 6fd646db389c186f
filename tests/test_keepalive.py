"""Connection lifetime: an aged connection is closed with GOAWAY and the client carries on."""

from __future__ import annotations

import asyncio

import grpc
from grpc import aio

from catalog.v1 import catalog_pb2, catalog_pb2_grpc
from core.settings import Settings
from service.app import start
from service.keepalive import server_options

AGES = 3


async def test_an_aged_connection_is_replaced_and_calls_carry_on(
    settings: Settings, redis_client: object
) -> None:
    svc = await start(
        settings.replace(
            grpc_address="127.0.0.1:0",
            grpc_max_connection_age_ms=200,
            grpc_max_connection_age_grace_ms=100,
        )
    )
    closed = 0
    try:
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            for _ in range(AGES):
                product = await stub.GetProduct(catalog_pb2.GetProductRequest(id="p0000001"))
                assert product.id == "p0000001"
                # The server's GOAWAY moves the channel out of READY; no call is running, so it
                # goes idle and reconnects on the next call. (On a loaded machine the call can
                # outlast the 200 ms age: the channel has then left READY already.)
                if channel.get_state() == grpc.ChannelConnectivity.READY:
                    await asyncio.wait_for(
                        channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 30
                    )
                assert channel.get_state() != grpc.ChannelConnectivity.READY
                closed += 1
            product = await stub.GetProduct(catalog_pb2.GetProductRequest(id="p0000001"))
            assert product.id == "p0000001"
    finally:
        await svc.stop(grace=0)
    assert closed == AGES


def test_a_zero_age_leaves_connections_open_forever() -> None:
    defaults = Settings.from_env({})
    assert dict(server_options(defaults))["grpc.max_connection_age_ms"] == 300_000
    never = dict(server_options(defaults.replace(grpc_max_connection_age_ms=0)))
    assert "grpc.max_connection_age_ms" not in never
