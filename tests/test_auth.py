"""Write authorization over real gRPC: bearer tokens, mTLS client identities, read-only mode."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from cryptography import x509
from google.protobuf import field_mask_pb2
from grpc import aio

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.settings import Settings
from service.app import Service, start
from service.auth import WRITE_METHODS, WritePolicy, bearer_metadata
from tests.certs import Issued
from tests.helpers import WRITE_TOKEN, Delta, handled
from tests.test_tls import Pki

if TYPE_CHECKING:
    from catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub as Stub

OTHER_TOKEN = "another-token-of-the-right-length"
WRITER_ID = "spiffe://catalog.test/ns/shop/sa/publisher"
READER_ID = "spiffe://catalog.test/ns/shop/sa/storefront"
REFUSED = "catalog_auth_refused_total"


def rename(name: str = "Renamed") -> pb.UpdateProductRequest:
    return pb.UpdateProductRequest(
        product=pb.Product(id="p0000001", name=name),
        update_mask=field_mask_pb2.FieldMask(paths=["name"]),
    )


async def status(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def writable(settings: Settings, fresh_database_url: str) -> AsyncIterator[Service]:
    """A service on a database of its own (renames land), writers: WRITE_TOKEN only."""
    svc = await start(settings.replace(database_url=fresh_database_url, grpc_address="127.0.0.1:0"))
    yield svc
    await svc.stop(grace=0)


@pytest.fixture
async def plain_stub(writable: Service) -> AsyncIterator[Stub]:
    async with aio.insecure_channel(f"127.0.0.1:{writable.port}") as channel:
        yield catalog_pb2_grpc.CatalogServiceStub(channel)


async def test_update_without_a_token_is_unauthenticated_and_changes_nothing(
    plain_stub: Stub,
) -> None:
    refused = Delta(REFUSED, method="UpdateProduct", reason="missing")
    counted = handled("UpdateProduct", "UNAUTHENTICATED")  # RED metrics see refusals too
    assert await status(plain_stub.UpdateProduct(rename("anonymous"))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert refused() == 1
    assert counted() == 1
    product = await plain_stub.GetProduct(pb.GetProductRequest(id="p0000001"))
    assert product.name != "anonymous"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (f"Bearer {OTHER_TOKEN}", "bad_token"),
        (f"Bearer {WRITE_TOKEN}x", "bad_token"),
        (f"Bearer {WRITE_TOKEN[:-1]}", "bad_token"),
        (f"Basic {WRITE_TOKEN}", "malformed"),
        (WRITE_TOKEN, "malformed"),
        ("Bearer " + "x" * 5000, "malformed"),
    ],
)
async def test_a_wrong_or_malformed_token_is_permission_denied(
    plain_stub: Stub, value: str, reason: str
) -> None:
    refused = Delta(REFUSED, method="UpdateProduct", reason=reason)
    counted = handled("UpdateProduct", "PERMISSION_DENIED")
    call = plain_stub.UpdateProduct(rename("intruder"), metadata=(("authorization", value),))
    assert await status(call) == grpc.StatusCode.PERMISSION_DENIED
    assert refused() == 1
    assert counted() == 1
    product = await plain_stub.GetProduct(pb.GetProductRequest(id="p0000001"))
    assert product.name != "intruder"


async def test_two_authorization_values_are_refused_even_if_one_is_right(
    plain_stub: Stub,
) -> None:
    metadata = (*bearer_metadata(WRITE_TOKEN), *bearer_metadata(OTHER_TOKEN))
    call = plain_stub.UpdateProduct(rename(), metadata=metadata)
    assert await status(call) == grpc.StatusCode.PERMISSION_DENIED


async def test_the_right_token_writes(plain_stub: Stub) -> None:
    for scheme in ("Bearer", "bearer"):  # RFC 6750: the scheme is case-insensitive
        name = f"renamed by {scheme}"
        updated = await plain_stub.UpdateProduct(
            rename(name), metadata=(("authorization", f"{scheme} {WRITE_TOKEN}"),)
        )
        assert updated.name == name


async def test_a_token_on_a_read_method_is_ignored(
    plain_stub: Stub,
) -> None:
    refused = Delta(REFUSED)
    for value in (f"Bearer {OTHER_TOKEN}", "garbage", f"Bearer {WRITE_TOKEN}"):
        metadata = (("authorization", value),)
        product = await plain_stub.GetProduct(
            pb.GetProductRequest(id="p0000001"), metadata=metadata
        )
        assert product.id == "p0000001"
        page = await plain_stub.ListProducts(pb.ListProductsRequest(page_size=2), metadata=metadata)
        assert len(page.products) == 2
    assert refused() == 0


async def test_record_views_needs_a_writer_unless_open(
    settings: Settings, redis_client: object
) -> None:
    request = pb.RecordProductViewsRequest(product_ids=["p0000001"])
    for open_, expected in ((False, grpc.StatusCode.UNAUTHENTICATED), (True, grpc.StatusCode.OK)):
        svc = await start(settings.replace(grpc_address="127.0.0.1:0", record_views_open=open_))
        try:
            async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
                stub = catalog_pb2_grpc.CatalogServiceStub(channel)
                assert await status(stub.RecordProductViews(request)) == expected
                # UpdateProduct stays guarded either way.
                assert await status(stub.UpdateProduct(rename())) == (
                    grpc.StatusCode.UNAUTHENTICATED
                )
        finally:
            await svc.stop(grace=0)


async def test_with_no_writer_configured_every_write_is_refused(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.app")
    svc = await start(settings.replace(grpc_address="127.0.0.1:0", write_tokens=""))
    try:
        read_only = [r for r in caplog.records if "read-only" in r.getMessage()]
        assert len(read_only) == 1 and read_only[0].levelno == logging.WARNING
        missing = Delta(REFUSED, method="RecordProductViews", reason="missing")
        denied = Delta(REFUSED, method="UpdateProduct", reason="read_only")
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            views = pb.RecordProductViewsRequest(product_ids=["p0000001"])
            assert await status(stub.RecordProductViews(views)) == grpc.StatusCode.UNAUTHENTICATED
            call = stub.UpdateProduct(rename(), metadata=bearer_metadata(WRITE_TOKEN))
            assert await status(call) == grpc.StatusCode.PERMISSION_DENIED
            assert (await stub.GetProduct(pb.GetProductRequest(id="p0000001"))).id == "p0000001"
        assert (missing(), denied()) == (1, 1)
    finally:
        await svc.stop(grace=0)


async def test_tokens_appear_in_no_log_record_and_no_repr(
    writable: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with aio.insecure_channel(f"127.0.0.1:{writable.port}") as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        await status(stub.UpdateProduct(rename(), metadata=bearer_metadata(OTHER_TOKEN)))
        await stub.UpdateProduct(rename(), metadata=bearer_metadata(WRITE_TOKEN))
    text = "\n".join(r.getMessage() for r in caplog.records) + repr(writable.settings)
    assert WRITE_TOKEN not in text and OTHER_TOKEN not in text


def test_read_handlers_are_not_wrapped() -> None:
    """Reads pay nothing: the policy gives them no check at all."""
    policy = WritePolicy([WRITE_TOKEN], [])
    for method in ("GetProduct", "ListProducts", "BatchGetProducts"):
        assert policy.checker(method) is None
    for method in WRITE_METHODS:
        assert policy.checker(method) is not None


# mTLS: identities from the client certificate's SANs.


class IdentityPki(Pki):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        uri = x509.UniformResourceIdentifier
        self.writer = self.client_ca.issue("writer", server=False, names=(uri(WRITER_ID),))
        self.reader = self.client_ca.issue("reader", server=False, names=(uri(READER_ID),))
        self.dns_writer = self.client_ca.issue(
            "dns-writer", server=False, names=(x509.DNSName("publisher.catalog.test"),)
        )


@pytest.fixture(scope="module")
def id_pki(tmp_path_factory: pytest.TempPathFactory) -> IdentityPki:
    return IdentityPki(tmp_path_factory.mktemp("idpki"))


@pytest.fixture
async def mtls_writable(
    settings: Settings, fresh_database_url: str, id_pki: IdentityPki
) -> AsyncIterator[Service]:
    configured = id_pki.tls(settings, mutual=True).replace(
        database_url=fresh_database_url,
        write_tokens="",
        write_clients=f"{WRITER_ID}, publisher.catalog.test",
    )
    svc = await start(configured)
    yield svc
    await svc.stop(grace=0)


async def _update_as(pki: Pki, port: int, client: Issued) -> grpc.StatusCode:
    async with pki.channel(port, client) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        assert (await stub.GetProduct(pb.GetProductRequest(id="p0000001"))).id == "p0000001"
        return await status(stub.UpdateProduct(rename(), timeout=10))


async def test_an_allowed_client_identity_writes(
    mtls_writable: Service, id_pki: IdentityPki
) -> None:
    port = mtls_writable.port
    assert await _update_as(id_pki, port, id_pki.writer) == grpc.StatusCode.OK
    assert await _update_as(id_pki, port, id_pki.dns_writer) == grpc.StatusCode.OK


async def test_a_client_identity_not_listed_is_refused(
    mtls_writable: Service, id_pki: IdentityPki
) -> None:
    refused = Delta(REFUSED, method="UpdateProduct", reason="identity")
    port = mtls_writable.port
    assert await _update_as(id_pki, port, id_pki.reader) == grpc.StatusCode.PERMISSION_DENIED
    # A certificate without SANs (only a common name) has no identity to check.
    assert await _update_as(id_pki, port, id_pki.client) == grpc.StatusCode.UNAUTHENTICATED
    assert refused() == 1
