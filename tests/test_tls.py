"""TLS and mTLS on the gRPC ports, with certificates made at test time and real handshakes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.settings import Settings, SettingsError
from core.tls import server_credentials
from invalidator.health import Health
from service.app import Service, start
from tests.certs import Authority, Issued


class Pki:
    """A server CA with the server's certificate; a client CA with a client's; a rogue client."""

    def __init__(self, directory: Path) -> None:
        self.server_ca = Authority(directory, "server-ca")
        self.server = self.server_ca.issue("server", server=True)
        self.client_ca = Authority(directory, "client-ca")
        self.client = self.client_ca.issue("client", server=False)
        self.rogue = Authority(directory, "rogue-ca").issue("rogue", server=False)

    def tls(self, settings: Settings, *, mutual: bool) -> Settings:
        return settings.replace(
            grpc_address="127.0.0.1:0",
            tls_cert_file=str(self.server.cert),
            tls_key_file=str(self.server.key),
            tls_client_ca_file=str(self.client_ca.cert) if mutual else "",
        )

    def channel(self, port: int, client: Issued | None = None) -> aio.Channel:
        key, chain = client.read() if client else (None, None)
        credentials = grpc.ssl_channel_credentials(
            self.server_ca.cert.read_bytes(), private_key=key, certificate_chain=chain
        )
        return aio.secure_channel(f"127.0.0.1:{port}", credentials)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def tls_service(settings: Settings, pki: Pki) -> AsyncIterator[Service]:
    service = await start(pki.tls(settings, mutual=False))
    yield service
    await service.stop(grace=0)


@pytest.fixture
async def mtls_service(settings: Settings, pki: Pki) -> AsyncIterator[Service]:
    service = await start(pki.tls(settings, mutual=True))
    yield service
    await service.stop(grace=0)


async def get_product(channel: aio.Channel) -> grpc.StatusCode:
    """The status of one GetProduct over ``channel`` (OK when the product came back)."""
    stub = catalog_pb2_grpc.CatalogServiceStub(channel)
    try:
        reply = await stub.GetProduct(pb.GetProductRequest(id="p0000001"), timeout=10)
    except aio.AioRpcError as exc:
        return exc.code()
    assert reply.id == "p0000001"
    return grpc.StatusCode.OK


async def test_a_tls_client_is_served(tls_service: Service, pki: Pki) -> None:
    async with pki.channel(tls_service.port) as channel:
        assert await get_product(channel) == grpc.StatusCode.OK
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_plaintext_client_gets_nothing_from_a_tls_port(tls_service: Service) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{tls_service.port}") as channel:
        assert await get_product(channel) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_that_does_not_trust_the_server_ca_refuses_it(
    tls_service: Service, tmp_path: Path
) -> None:
    stranger = Authority(tmp_path, "other-ca")
    credentials = grpc.ssl_channel_credentials(stranger.cert.read_bytes())
    async with aio.secure_channel(f"127.0.0.1:{tls_service.port}", credentials) as channel:
        assert await get_product(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_serves_a_client_with_a_certificate_of_the_client_ca(
    mtls_service: Service, pki: Pki
) -> None:
    async with pki.channel(mtls_service.port, pki.client) as channel:
        assert await get_product(channel) == grpc.StatusCode.OK


async def test_mtls_refuses_a_client_without_a_certificate(mtls_service: Service, pki: Pki) -> None:
    async with pki.channel(mtls_service.port) as channel:
        assert await get_product(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_client_certificate_of_another_ca(
    mtls_service: Service, pki: Pki
) -> None:
    async with pki.channel(mtls_service.port, pki.rogue) as channel:
        assert await get_product(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_plaintext_client(mtls_service: Service) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{mtls_service.port}") as channel:
        assert await get_product(channel) == grpc.StatusCode.UNAVAILABLE


async def test_the_invalidator_health_port_speaks_mtls(settings: Settings, pki: Pki) -> None:
    health = Health()
    await health.start("127.0.0.1:0", server_credentials(pki.tls(settings, mutual=True)))
    try:
        request = health_pb2.HealthCheckRequest()
        async with pki.channel(health.port, pki.client) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # not started yet
        for channel in (
            pki.channel(health.port),
            aio.insecure_channel(f"127.0.0.1:{health.port}"),
        ):
            async with channel:
                with pytest.raises(aio.AioRpcError) as err:
                    await health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await health.stop()


def test_tls_settings_must_come_together() -> None:
    for partial in (
        {"tls_cert_file": "server.pem"},
        {"tls_key_file": "server.key"},
        {"tls_client_ca_file": "client-ca.pem"},
    ):
        with pytest.raises(SettingsError, match="CATALOG_TLS_CERT_FILE"):
            Settings.from_env({}, **partial)


def test_tls_settings_from_the_environment(pki: Pki) -> None:
    settings = Settings.from_env(
        {
            "CATALOG_TLS_CERT_FILE": str(pki.server.cert),
            "CATALOG_TLS_KEY_FILE": str(pki.server.key),
            "CATALOG_TLS_CLIENT_CA_FILE": str(pki.client_ca.cert),
        }
    )
    assert server_credentials(settings) is not None
    assert server_credentials(Settings.from_env({})) is None


def test_unusable_tls_files_stop_start_up_naming_the_variable(
    settings: Settings, pki: Pki, tmp_path: Path
) -> None:
    tls = pki.tls(settings, mutual=True)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    cases = {
        "CATALOG_TLS_CERT_FILE": {"tls_cert_file": str(tmp_path / "missing.pem")},
        "CATALOG_TLS_KEY_FILE": {"tls_key_file": str(tmp_path / "missing.key")},
        "CATALOG_TLS_CLIENT_CA_FILE": {"tls_client_ca_file": str(not_pem)},
        "matching private key": {"tls_key_file": str(pki.client.key)},  # another cert's key
    }
    for expected, change in cases.items():
        with pytest.raises(SettingsError, match=expected):
            server_credentials(tls.replace(**change))
