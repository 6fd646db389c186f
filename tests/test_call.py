"""``catalog call``: the CLI in a subprocess against real servers, JSON in and out."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from core.settings import Settings
from service.app import Service, start
from tests.certs import Authority

PROJECT = Path(__file__).resolve().parent.parent


@dataclass
class Done:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def catalog_call(*args: str, stdin: str = "") -> Done:
    """``python -m ops call ARGS`` as a shell would run it (the loop keeps serving meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops", "call", *args,
        cwd=PROJECT, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


async def test_a_short_method_name_and_json_in_and_out(service: Service) -> None:
    done = await catalog_call(
        "GetProduct", '{"id": "p0000001"}', "--target", f"127.0.0.1:{service.port}"
    )
    assert (done.code, done.err) == (0, "")
    product = done.json()
    assert product["id"] == "p0000001"
    assert product["finalPrice"]["currencyCode"]


async def test_a_full_method_name_and_the_request_from_stdin(service: Service) -> None:
    done = await catalog_call(
        "catalog.v1.CatalogService/ListProducts", "-", "--target", f"127.0.0.1:{service.port}",
        stdin='{"page_size": 3}',
    )  # fmt: skip
    assert done.code == 0, done.err
    page = done.json()
    assert [p["id"] for p in page["products"]] == ["p0000001", "p0000002", "p0000003"]
    assert page["nextPageToken"]


async def test_no_method_lists_the_services(service: Service) -> None:
    done = await catalog_call("--target", f"127.0.0.1:{service.port}")
    assert done.code == 0, done.err
    assert "catalog.v1.CatalogService" in done.out.splitlines()
    assert "  GetProduct(catalog.v1.GetProductRequest) returns (catalog.v1.Product)" in done.out
    assert "grpc.health.v1.Health" in done.out
    assert "ServerReflection" not in done.out


async def test_a_status_goes_to_stderr_by_name_with_exit_1(service: Service) -> None:
    target = ("--target", f"127.0.0.1:{service.port}")
    missing = await catalog_call("GetProduct", '{"id": "nope"}', *target)
    assert (missing.code, missing.out) == (1, "")
    assert missing.err.startswith("NOT_FOUND: ")
    invalid = await catalog_call("GetProduct", '{"id": "bad id!"}', *target)
    assert invalid.code == 1
    assert invalid.err.startswith("INVALID_ARGUMENT: ")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["GetProduct", '{"id": '], "is not a catalog.v1.GetProductRequest"),
        (["GetProduct", '{"nope": 1}'], "is not a catalog.v1.GetProductRequest"),
        (["NoSuchMethod", "{}"], "has no method NoSuchMethod"),
        (["catalog.v1.NoService/GetProduct", "{}"], "has no method catalog.v1.NoService/Get"),
        (["GetProduct", "{}", "-H", "no colon"], "-H wants 'key: value'"),
        (["GetProduct", "{}", "--cacert", "/nonexistent.pem"], "--cacert: cannot read"),
    ],
)
async def test_a_usage_error_exits_2_with_one_line_and_no_call(
    service: Service, args: list[str], says: str
) -> None:
    done = await catalog_call(*args, "--target", f"127.0.0.1:{service.port}")
    assert (done.code, done.out) == (2, "")
    assert says in done.err
    assert len(done.err.splitlines()) == 1
    assert "Traceback" not in done.err


async def test_no_server_is_unavailable_with_exit_1() -> None:
    from devtools.localservers import free_port

    done = await catalog_call("GetProduct", "{}", "--target", f"127.0.0.1:{free_port()}")
    assert done.code == 1
    assert done.err.startswith("UNAVAILABLE: ")


class _Recorder(aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.seen.append((details.method, dict(details.invocation_metadata)))
        return await continuation(details)


@pytest.fixture
async def recording_server() -> AsyncIterator[tuple[int, _Recorder]]:
    """A real gRPC server with health and reflection that records every call's metadata."""
    recorder = _Recorder()
    server = aio.server(interceptors=[recorder])
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    reflection.enable_server_reflection((health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port, recorder
    await server.stop(0)


async def test_metadata_reaches_the_server_on_every_call(
    recording_server: tuple[int, _Recorder],
) -> None:
    port, recorder = recording_server
    done = await catalog_call(
        "grpc.health.v1.Health/Check", "{}", "--target", f"127.0.0.1:{port}",
        "-H", "authorization: Bearer s3cret", "-H", "X-Request-Id:  r1 ",
    )  # fmt: skip
    assert done.code == 0, done.err
    assert done.json() == {"status": "SERVING"}
    methods = [method for method, _ in recorder.seen]
    assert methods[-1] == "/grpc.health.v1.Health/Check"
    assert any("ServerReflectionInfo" in m for m in methods)
    for _, metadata in recorder.seen:  # reflection's calls too: a gateway may demand them
        assert metadata["authorization"] == "Bearer s3cret"
        assert metadata["x-request-id"] == "r1"


async def test_mutual_tls(settings: Settings, tmp_path: Path) -> None:
    server_ca, client_ca = Authority(tmp_path, "server-ca"), Authority(tmp_path, "client-ca")
    server, client = server_ca.issue("server", server=True), client_ca.issue("c", server=False)
    svc = await start(
        settings.replace(
            grpc_address="127.0.0.1:0",
            tls_cert_file=str(server.cert),
            tls_key_file=str(server.key),
            tls_client_ca_file=str(client_ca.cert),
        )
    )
    try:
        target = ("--target", f"localhost:{svc.port}", "--cacert", str(server_ca.cert))
        with_cert = await catalog_call(
            "GetProduct", '{"id": "p0000001"}', *target,
            "--cert", str(client.cert), "--key", str(client.key),
        )  # fmt: skip
        without = await catalog_call("GetProduct", '{"id": "p0000001"}', *target)
        plaintext = await catalog_call(
            "GetProduct", '{"id": "p0000001"}', "--target", f"127.0.0.1:{svc.port}"
        )
    finally:
        await svc.stop(grace=0)
    assert with_cert.code == 0, with_cert.err
    assert with_cert.json()["id"] == "p0000001"
    assert without.code == 1
    assert without.err.startswith("UNAVAILABLE: ")
    assert plaintext.code == 1
