"""Bad input gets the documented status before any Redis command or SQL, and no input is a bug.

The service under test has a Redis and a database of this module's own. "No I/O" is measured,
not assumed: Redis's own ``INFO commandstats`` and connection count before and after (only our
INFO calls may appear), and every connection checkout and statement of the service's SQLAlchemy
engine. A positive control shows both counters move for a valid request. The fuzz then sends
generated values for every field of every RPC's request and accepts any status but INTERNAL
and UNKNOWN (a bug's statuses).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.protobuf import descriptor, field_mask_pb2, message_factory
from google.protobuf.message import Message
from grpc import aio
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis import Redis
from sqlalchemy import event

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.pagetokens import PageTokens
from devtools.localservers import RedisProcess
from service.app import Service, start
from service.auth import bearer_metadata
from tests.conftest import create_database, drop_database
from tests.helpers import WRITE_TOKEN, make_settings, writer_channel

if TYPE_CHECKING:
    from catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub as Stub

SECRET = "bad-input-test-secret"
TOKENS = PageTokens(SECRET)
SERVICE = pb.DESCRIPTOR.services_by_name["CatalogService"]
BAD_IDS = {
    "empty": "",
    "10 KB": "p" * 10_240,
    "65 chars": "p" * 65,
    "colon": "p:1",
    "star": "p*",
    "brace": "{p0000001}",
    "space": "p 1",
    "NUL": "p\x001",
    "unicode": "pé1",
    "emoji": "p\U0001f600",
    "zero-width": "p\u200b1",
    "newline": "p0000001\n",
}


@pytest.fixture(scope="module")
def own_database(pg_base_url: str) -> Iterator[str]:
    """Migrated and seeded, written to by the fuzz (UpdateProduct) and by nobody else."""
    from core.migrations import upgrade
    from ops.seed import seed_catalog

    url = create_database(pg_base_url)
    try:
        upgrade(url)
        seed_catalog(url, products=150, seed=42)
        yield url
    finally:
        drop_database(url)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with RedisProcess(Path(tmp_path_factory.mktemp("bad-input-redis"))) as server:
        yield server


@dataclass
class Counted:
    """The service plus counters of everything it sends to PostgreSQL and Redis."""

    service: Service
    redis: Redis
    sql: list[str]

    def redis_commands(self) -> dict[str, int]:
        """Calls per command, plus connections ever accepted, as Redis itself counts them."""
        stats: dict[str, Any] = self.redis.info("commandstats")
        calls = {name: int(v["calls"]) for name, v in stats.items()}
        calls["connections"] = int(self.redis.info("stats")["total_connections_received"])
        return calls

    def io(self) -> Callable[[], tuple[dict[str, int], int]]:
        """Start measuring; the returned function gives (Redis calls moved, SQL events)."""
        before, sql = self.redis_commands(), len(self.sql)

        def moved() -> tuple[dict[str, int], int]:
            after = self.redis_commands()
            diff = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
            diff.pop("cmdstat_info", None)  # our own measuring
            return diff, len(self.sql) - sql

        return moved


@pytest.fixture(scope="module")
async def counted(own_database: str, own_redis: RedisProcess) -> AsyncIterator[Counted]:
    settings = make_settings(
        database_url=own_database,
        redis_url=own_redis.url,
        grpc_address="127.0.0.1:0",
        metrics_port=0,
        page_token_secret=SECRET,
        health_check_interval_s=3600,  # no background SQL while we count
    )
    service = await start(settings)
    sql: list[str] = []
    engine = service.engine.sync_engine
    event.listen(engine, "checkout", lambda *_: sql.append("checkout"))
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, stmt, *_: sql.append(stmt))
    admin = Redis.from_url(own_redis.url)
    yield Counted(service, admin, sql)
    admin.close()
    await service.stop(grace=0)


@pytest.fixture
async def stub(counted: Counted) -> AsyncIterator[Stub]:
    async with writer_channel(f"127.0.0.1:{counted.service.port}") as channel:
        yield catalog_pb2_grpc.CatalogServiceStub(channel)


def update(product: pb.Product, *paths: str) -> pb.UpdateProductRequest:
    return pb.UpdateProductRequest(
        product=product, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )


def rows() -> Iterator[Any]:
    """(rpc, request) pairs that are INVALID_ARGUMENT, named by what is wrong."""
    token = TOKENS.encode("p0000010", "c00001", "")
    other = PageTokens("another-secret").encode("p0000010", "", "")

    def row(name: str, rpc: str, request: Message, *marks: pytest.MarkDecorator) -> Any:
        return pytest.param(rpc, request, id=f"{rpc}: {name}", marks=marks)

    for name, bad in BAD_IDS.items():
        yield row(f"id {name}", "GetProduct", pb.GetProductRequest(id=bad))
        yield row(f"batch id {name}", "BatchGetProducts", pb.BatchGetProductsRequest(ids=[bad]))
        if bad:  # an empty filter means "no filter"
            yield row(f"category {name}", "ListProducts", pb.ListProductsRequest(category_id=bad))
            yield row(f"brand {name}", "ListProducts", pb.ListProductsRequest(brand_id=bad))
        yield row(f"product.id {name}", "UpdateProduct", update(pb.Product(id=bad), "name"))
        yield row(
            f"views id {name}",
            "RecordProductViews",
            pb.RecordProductViewsRequest(product_ids=[bad]),
        )
    listing: dict[str, pb.ListProductsRequest] = {
        "page_size -1": pb.ListProductsRequest(page_size=-1),
        "page_size min int32": pb.ListProductsRequest(page_size=-(2**31)),
        "token random": pb.ListProductsRequest(page_token="bm90IGEgdG9rZW4"),
        "token random bytes": pb.ListProductsRequest(
            page_token=base64.urlsafe_b64encode(bytes(range(7, 47))).decode().rstrip("=")
        ),
        "token truncated": pb.ListProductsRequest(category_id="c00001", page_token=token[:-3]),
        "token one char changed": pb.ListProductsRequest(
            category_id="c00001",
            page_token=token[:5] + ("A" if token[5] != "A" else "B") + token[6:],
        ),
        "token last char re-encoded": pb.ListProductsRequest(
            category_id="c00001", page_token=token[:-1] + ("A" if token[-1] != "A" else "B")
        ),
        "token padded": pb.ListProductsRequest(category_id="c00001", page_token=token + "=="),
        "token of another category": pb.ListProductsRequest(category_id="c00002", page_token=token),
        "token without its filter": pb.ListProductsRequest(page_token=token),
        "token with a brand added": pb.ListProductsRequest(
            category_id="c00001", brand_id="b0001", page_token=token
        ),
        "token signed with another secret": pb.ListProductsRequest(page_token=other),
        "token 10 KB": pb.ListProductsRequest(page_token="A" * 10_240),
        "token NUL": pb.ListProductsRequest(page_token="\x00"),
    }
    for name, list_request in listing.items():
        yield row(name, "ListProducts", list_request)
    valid = [f"p{n:07d}" for n in range(1, 102)]
    yield row("no ids", "BatchGetProducts", pb.BatchGetProductsRequest())
    yield row("101 ids", "BatchGetProducts", pb.BatchGetProductsRequest(ids=valid))
    yield row(
        "101 duplicates", "BatchGetProducts", pb.BatchGetProductsRequest(ids=["p0000001"] * 101)
    )
    yield row(
        "one bad id among 100",
        "BatchGetProducts",
        pb.BatchGetProductsRequest(ids=[*valid[:99], "p:1"]),
    )
    good = pb.Product(id="p0000001", name="New name")
    for name, paths in {
        "empty mask": (),
        "unknown path": ("no_such_field",),
        "unknown among known": ("name", "no_such_field"),
        "id is not updatable": ("id",),
        "sku is not updatable": ("sku",),
        "version is not updatable": ("version",),
        "final_price is output only": ("final_price",),
        "subfield of category": ("category.name",),
        "empty path": ("",),
        "wildcard": ("*",),
    }.items():
        yield row(f"mask {name}", "UpdateProduct", update(good, *paths))
    for name, text in {
        "NUL": "a\x00b",
        "escape": "a\x1b[31mb",
        "DEL": "a\x7f",
        "C1": "a\x85",
    }.items():
        yield row(
            f"name with {name}", "UpdateProduct", update(pb.Product(id="p1", name=text), "name")
        )
        yield row(
            f"description with {name}",
            "UpdateProduct",
            update(pb.Product(id="p1", description=text), "description"),
        )
    yield row(
        "name with a line break",
        "UpdateProduct",
        update(pb.Product(id="p1", name="two\nlines"), "name"),
    )
    yield row(
        "no product",
        "UpdateProduct",
        pb.UpdateProductRequest(update_mask=field_mask_pb2.FieldMask(paths=["name"])),
    )
    yield row("mask path of 10 KB", "UpdateProduct", update(good, "x" * 10_240))
    yield row(
        "mask of 100 long unknown paths",
        "UpdateProduct",
        update(good, *(f"no_such_field_{n}_{'x' * 100}" for n in range(100))),
    )
    yield row("no views", "RecordProductViews", pb.RecordProductViewsRequest())
    yield row(
        "1001 views",
        "RecordProductViews",
        pb.RecordProductViewsRequest(product_ids=["p0000001"] * 1001),
    )


async def call(stub: Stub, rpc: str, request: Message) -> grpc.StatusCode:
    try:
        await getattr(stub, rpc)(request, timeout=10)
    except aio.AioRpcError as exc:
        assert len(exc.details() or "") < 256, "details are short and never echo the input"
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("rpc", "request_"), list(rows()))
async def test_bad_input_is_invalid_argument_before_any_io(
    counted: Counted, stub: Stub, rpc: str, request_: Message
) -> None:
    moved = counted.io()
    assert await call(stub, rpc, request_) == grpc.StatusCode.INVALID_ARGUMENT
    redis_calls, sql = moved()
    assert redis_calls == {} and sql == 0, f"I/O before rejecting: redis {redis_calls}, sql {sql}"


def not_utf8(desc: descriptor.Descriptor) -> bytes:
    """A message of type ``desc`` whose first string field (maybe nested) is not UTF-8."""
    for f in desc.fields:
        if f.type == _F.TYPE_STRING:
            inner = b"\xff\xfe"
        elif f.type == _F.TYPE_MESSAGE:
            inner = not_utf8(cast(descriptor.Descriptor, f.message_type))
        else:
            continue
        return bytes([f.number << 3 | 2, len(inner)]) + inner
    raise AssertionError(f"{desc.full_name} has no string field")


@pytest.mark.parametrize("rpc", [m.name for m in SERVICE.methods])
@pytest.mark.parametrize(
    "raw", [b"\xff\xff\xff", b"\x0a\x05ab", None], ids=["corrupt", "truncated", "string not UTF-8"]
)
async def test_bytes_that_are_no_request_are_invalid_argument_before_any_io(
    counted: Counted, rpc: str, raw: bytes | None
) -> None:
    raw = raw or not_utf8(SERVICE.methods_by_name[rpc].input_type)
    moved = counted.io()
    async with writer_channel(f"127.0.0.1:{counted.service.port}") as channel:
        send = channel.unary_unary(f"/{SERVICE.full_name}/{rpc}", None, None)  # raw bytes
        with pytest.raises(aio.AioRpcError) as err:
            await send(raw, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert moved() == ({}, 0)


async def test_control_characters_log_nothing_at_error(
    stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's mistake is not the server's error: no ERROR line, no request data logged."""
    request = update(pb.Product(id="p0000001", name="secret\x00name"), "name")
    assert await call(stub, "UpdateProduct", request) == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "secret" not in caplog.text


async def test_a_description_keeps_tabs_and_line_breaks(stub: Stub) -> None:
    text = "line one\r\n\tline two"
    reply = await stub.UpdateProduct(
        update(pb.Product(id="p0000002", description=text), "description"), timeout=10
    )
    assert reply.description == text


async def test_the_io_counters_see_a_valid_request(counted: Counted, stub: Stub) -> None:
    """The control: without it, the test above would pass against counters that see nothing."""
    moved = counted.io()
    request = pb.GetProductRequest(id=f"control-{uuid.uuid4().hex}")  # valid, never cached
    assert await call(stub, "GetProduct", request) == grpc.StatusCode.NOT_FOUND
    redis_calls, sql = moved()
    assert redis_calls and sql > 0


@pytest.mark.parametrize(
    ("request_", "count"),
    [
        pytest.param(pb.ListProductsRequest(page_size=0), 20, id="page_size 0 means 20"),
        pytest.param(
            pb.ListProductsRequest(page_size=2**31 - 1), 100, id="huge page_size is clamped"
        ),
        pytest.param(pb.ListProductsRequest(page_size=1000), 100, id="page_size 1000 is clamped"),
    ],
)
async def test_odd_but_valid_paging_is_served(
    stub: Stub, request_: pb.ListProductsRequest, count: int
) -> None:
    reply = await stub.ListProducts(request_, timeout=10)
    assert len(reply.products) == count  # the module's catalog has 150 products


async def test_duplicate_ids_get_one_result_each(stub: Stub) -> None:
    ids = ["p0000003"] * 100
    reply = await stub.BatchGetProducts(pb.BatchGetProductsRequest(ids=ids), timeout=10)
    assert [r.product.id for r in reply.results] == ids


# Values a fuzzer would rarely find on its own: valid ids, tokens and mask paths, and edges.
_SEEDS = ["p0000001", "p0000002", "c00001", "b0001", "name", "stock", "base_price", "category"]
_TOKENS = [TOKENS.encode("p0000005", "", ""), TOKENS.encode("p0000005", "c00001", "")]
_F = descriptor.FieldDescriptor
_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    _F.TYPE_STRING: st.sampled_from(_SEEDS + _TOKENS + list(BAD_IDS.values()))
    | st.text(max_size=80),
    _F.TYPE_BYTES: st.binary(max_size=64),
    _F.TYPE_BOOL: st.booleans(),
    _F.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    _F.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    _F.TYPE_UINT32: st.integers(0, 2**32 - 1),
    _F.TYPE_UINT64: st.integers(0, 2**64 - 1),
    _F.TYPE_DOUBLE: st.floats(),
    _F.TYPE_FLOAT: st.floats(width=32),
}


# A valid request per RPC: the fuzz also merges generated fields into it, which reaches past
# validation far more often than generated messages alone.
VALID: dict[str, Message] = {
    "GetProduct": pb.GetProductRequest(id="p0000001"),
    "ListProducts": pb.ListProductsRequest(page_size=5),
    "BatchGetProducts": pb.BatchGetProductsRequest(ids=["p0000001", "p0000002"]),
    "UpdateProduct": update(pb.Product(id="p0000001", name="Fuzzed"), "name"),
    "RecordProductViews": pb.RecordProductViewsRequest(product_ids=["p0000001"]),
}


def messages(desc: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of type ``desc`` with any subset of its fields set to generated values."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.type == _F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            value = messages(cast(descriptor.Descriptor, f.message_type), depth + 1)
        else:
            value = st.integers(0, 5) if f.type == _F.TYPE_ENUM else _SCALARS[f.type]
        if f.is_repeated:  # small lists, and lists around the batch limit
            value = st.lists(value, max_size=4) | st.lists(value, min_size=99, max_size=101)
        fields[f.name] = st.none() | value
    cls = message_factory.GetMessageClass(desc)

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, v in values.items():
            if isinstance(v, list):
                getattr(message, name).extend(v)
            elif isinstance(v, Message):
                getattr(message, name).CopyFrom(v)
            elif v is not None:
                setattr(message, name, v)
        return message

    return st.fixed_dictionaries(fields).map(build)


@pytest.mark.parametrize("rpc", [m.name for m in SERVICE.methods])
async def test_no_request_of_any_rpc_is_answered_as_a_bug(counted: Counted, rpc: str) -> None:
    """Generated values for every field, and bytes that are no message at all. (The database is
    this module's own: updates may land.)"""
    method = SERVICE.methods_by_name[rpc]
    method_class = message_factory.GetMessageClass(method.input_type)
    target = f"127.0.0.1:{counted.service.port}"
    bugs = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    seen: set[grpc.StatusCode] = set()

    def fuzz() -> None:
        with grpc.insecure_channel(target) as channel:
            send = channel.unary_unary(f"/{SERVICE.full_name}/{rpc}", None, None)  # raw bytes
            generated = messages(method.input_type)
            valid = VALID.get(rpc, method_class())

            def into_valid(message: Message) -> Message:
                merged = method_class()
                merged.CopyFrom(valid)
                merged.MergeFrom(message)
                return merged

            requests = generated | generated.map(into_valid)

            @hypothesis_settings(
                max_examples=120,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(requests.map(lambda m: m.SerializeToString()) | st.binary())
            def check(request: bytes) -> None:
                try:
                    send(request, timeout=10, metadata=bearer_metadata(WRITE_TOKEN))
                    seen.add(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    call = cast(grpc.Call, exc)
                    seen.add(call.code())
                    assert call.code() not in bugs, f"{rpc}({request!r}): {call.details()}"

            check()

    await asyncio.to_thread(fuzz)  # the server runs on this loop meanwhile
    # Not only rejections: the generated requests also reach the cache and the database.
    assert seen - {grpc.StatusCode.INVALID_ARGUMENT}, f"{rpc}: all rejected (add it to VALID)"
