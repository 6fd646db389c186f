"""Page tokens signed with a known key still carry a position that must be a valid id; and
``catalog verify`` sets aside an entry it cannot check (exit 2) instead of crashing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
import sys
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc import aio
from redis.asyncio import Redis

from catalog.v1 import catalog_pb2 as pb
from core.cache import entry
from core.keys import Keys
from core.pagetokens import PageTokens
from core.settings import Settings
from tests.helpers import PAGE_TOKEN_SECRET
from tests.processes import settings_env

if TYPE_CHECKING:
    from catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub as Stub


def forge(position: bytes, secret: str = PAGE_TOKEN_SECRET) -> str:
    """A token for ``position`` signed with ``secret``, built as the service builds its own."""
    key = hashlib.sha256(secret.encode()).digest()
    mac = hmac.new(key, b"\x00".join((b"\x01", b"", b"", position)), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(b"\x01" + mac[:16] + position).rstrip(b"=").decode()


def run_verify(settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops", "verify"],
        env=settings_env(settings), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_forge_builds_the_services_own_tokens() -> None:
    """So the cases below differ from real tokens only in their position."""
    assert forge(b"p0000042") == PageTokens(PAGE_TOKEN_SECRET).encode("p0000042", "", "")
    assert PageTokens(PAGE_TOKEN_SECRET).decode(forge(b"p0000042"), "", "") == "p0000042"


@pytest.mark.parametrize(
    "position",
    [
        b"p0\x0000001",
        b"p00\n00001",
        b"p0000001,p0000002",
        b"\xff\xfe",
        "p\N{RIGHT-TO-LEFT OVERRIDE}1".encode(),
        b"p" * 65,
        b"p" * 60_000,  # its token is under the request size limit, far over any token issued
    ],
    ids=["nul", "newline", "comma", "not-utf8", "rlo", "65-chars", "60KB"],
)
async def test_a_forged_position_is_invalid_argument_and_caches_nothing(
    stub: Stub, settings: Settings, redis_client: Redis, position: bytes
) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await stub.ListProducts(pb.ListProductsRequest(page_size=5, page_token=forge(position)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("page_token is invalid")
    pages = [
        k async for k in redis_client.scan_iter(match=Keys(settings.key_namespace).page_pattern)
    ]
    assert pages == []


async def test_a_3mb_forged_token_is_refused_by_the_request_size_limit(
    stub: Stub, settings: Settings, redis_client: Redis
) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await stub.ListProducts(
            pb.ListProductsRequest(page_size=5, page_token=forge(b"p" * 3_000_000))
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    pages = [
        k async for k in redis_client.scan_iter(match=Keys(settings.key_namespace).page_pattern)
    ]
    assert pages == []


async def test_verify_sets_an_unreadable_page_aside_and_exits_2(
    stub: Stub, settings: Settings, redis_client: Redis
) -> None:
    """A page entry written before positions were validated (a newline splits its fields)."""
    await stub.ListProducts(pb.ListProductsRequest(page_size=3))  # one good page, checked
    keys = Keys(settings.key_namespace)
    bad = entry.PageBody("", ["p0000001"], "", "", "p\n0\x00", 3)
    raw = entry.pack(entry.pack_page(bad), 1, 2**40, 1)
    await redis_client.set(keys.page("", "", bad.after_id, 3), raw, px=60_000)
    done = run_verify(settings)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "stale: 0" in done.stdout
    assert "errors: 1" in done.stdout and "cannot be checked (ValueError)" in done.stdout


def test_verify_exits_2_when_it_cannot_reach_redis(settings: Settings) -> None:
    from devtools.localservers import free_port

    done = run_verify(settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "catalog verify: could not check: ConnectionError" in done.stderr
    assert "Traceback" not in done.stderr
