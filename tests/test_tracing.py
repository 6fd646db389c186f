"""Tracing: one trace from an UpdateProduct with an incoming ``traceparent``, through its SQL and
Redis calls, the outbox row, the relay and the stream entry, to the invalidation. Spans go to the
SDK's in-memory exporter (the tracing sink; Redis, PostgreSQL and gRPC are real)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from google.protobuf.field_mask_pb2 import FieldMask
from grpc import aio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from redis.asyncio import Redis

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core import tracing
from core.cache.store import CacheStore
from core.db import create_engine
from core.events import parse
from core.outbox import outbox
from core.publisher import Publisher
from core.settings import Settings, SettingsError
from invalidator.consumer import Consumer
from invalidator.outbox import OutboxRelay
from invalidator.settings import InvalidatorSettings
from service.app import start
from tests.helpers import writer_channel

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
INCOMING = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    yield exporter
    tracing.use(None)


def _named(spans: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name.startswith(prefix)]


def _span_of(traceparent: str) -> int:
    return int(traceparent.split("-")[2], 16)


async def test_a_write_is_one_trace_from_rpc_to_invalidation(
    spans: InMemorySpanExporter, settings: Settings, fresh_database_url: str, redis_client: Redis
) -> None:
    base = settings.replace(grpc_address="127.0.0.1:0", database_url=fresh_database_url)
    isettings = InvalidatorSettings.from_env({}, invalidator_health_address="")
    keys = isettings.keys(base)
    svc = await start(base)
    try:
        async with writer_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            request = pb.UpdateProductRequest(
                product=pb.Product(id="p0000001", name="Traced"),
                update_mask=FieldMask(paths=["name"]),
            )
            await stub.UpdateProduct(request, metadata=(("traceparent", INCOMING),))
    finally:
        await svc.stop(grace=0)

    trace_id = int(TRACE_ID, 16)
    (server,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.name == "catalog.v1.CatalogService/UpdateProduct"
    assert server.context is not None and server.context.trace_id == trace_id
    assert server.parent is not None and server.parent.span_id == int(CALLER_SPAN, 16)
    assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == 0
    (commit,) = _named(spans, "catalog.update.commit")
    sql, redis_spans = _named(spans, "sql "), _named(spans, "redis ")
    # The outbox INSERT is the capture trigger's, inside PostgreSQL: no statement of ours.
    assert {"sql SELECT", "sql UPDATE"} <= {s.name for s in sql}
    assert redis_spans, "the write-through's Redis calls"
    for s in [commit, *sql, *redis_spans]:
        assert s.context is not None and s.context.trace_id == trace_id, s.name

    engine = create_engine(base)
    tracing.instrument_engine(engine)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(sa.select(outbox.c.fields).order_by(outbox.c.id))).all()[-1]
        written = row.fields["traceparent"]
        assert written.startswith(f"00-{TRACE_ID}-")
        assert commit.context is not None and _span_of(written) == commit.context.span_id

        publisher = Publisher(redis_client, keys, maxlen=10_000)
        relay = OutboxRelay(engine, publisher, batch_size=100, poll_s=0.01, retention_s=60)
        await relay.relay_once()
    finally:
        await engine.dispose()
    (relayed,) = _named(spans, "catalog.outbox.relay")
    assert relayed.kind == SpanKind.PRODUCER
    assert relayed.parent is not None and relayed.parent.span_id == _span_of(written)
    entries: Any = await redis_client.xrange(keys.stream)
    ((_, fields),) = entries
    carried = fields[b"traceparent"].decode()
    assert carried.startswith(f"00-{TRACE_ID}-")
    assert relayed.context is not None and _span_of(carried) == relayed.context.span_id
    assert parse(fields).traceparent == carried

    invalidator_redis = Redis.from_url(base.redis_url)  # built like the invalidator builds it
    tracing.instrument_redis(invalidator_redis)
    try:
        store = CacheStore(invalidator_redis, keys, lease_ttl_ms=5000, tag_margin_ms=60_000)
        consumer = Consumer(
            invalidator_redis, invalidator_redis, store, keys, isettings, "tracing-test"
        )
        await consumer.ensure_group()
        reply: Any = await invalidator_redis.xreadgroup(
            keys.group, consumer.name, {keys.stream: ">"}
        )
        await consumer.process([(i, f) for i, f in reply[0][1]])
    finally:
        await invalidator_redis.aclose()
    (invalidated,) = _named(spans, "catalog.invalidate")
    assert invalidated.kind == SpanKind.CONSUMER
    assert invalidated.context is not None and invalidated.context.trace_id == trace_id
    assert invalidated.parent is not None and invalidated.parent.span_id == _span_of(carried)
    under = [s for s in _named(spans, "redis ") if s.parent is not None]
    assert any(s.parent.span_id == invalidated.context.span_id for s in under)  # type: ignore[union-attr]


async def test_untraced_calls_make_no_spans_and_carry_no_traceparent(
    spans: InMemorySpanExporter, settings: Settings, redis_client: Redis
) -> None:
    tracing.use(None)  # tracing off: handlers and clients are built without any wrapping
    svc = await start(settings.replace(grpc_address="127.0.0.1:0"))
    try:
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            await stub.GetProduct(
                pb.GetProductRequest(id="p0000001"), metadata=(("traceparent", INCOMING),)
            )
    finally:
        await svc.stop(grace=0)
    assert spans.get_finished_spans() == ()
    assert tracing.traceparent() == ""


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_otel_variables_decide_whether_tracing_is_on(
    environ: dict[str, str], expected: list[str]
) -> None:
    assert tracing.exporters(environ) == expected


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
    ],
)
def test_unsupported_otel_exporters_are_configuration_errors(environ: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="OTEL_"):
        tracing.exporters(environ)


@pytest.mark.parametrize(
    "value",
    [
        INCOMING.upper(),
        INCOMING + "-extra",
        "00-" + "0" * 20,
        "x" * 4_000,  # long, yet within the entry's size limit (a larger entry is dead-lettered)
        INCOMING.replace("-", "_"),
    ],
)
def test_a_malformed_traceparent_in_an_entry_is_dropped_not_the_event(value: str) -> None:
    fields = {
        "schema": "1",
        "type": "product.updated",
        "event_id": "e1",
        "occurred_at": "1",
        "product_id": "p1",
        "traceparent": value,
    }
    event = parse(fields)
    assert event.product_id == "p1" and event.traceparent == ""
    assert parse({**fields, "traceparent": INCOMING}).traceparent == INCOMING


async def test_server_span_records_the_status_code(
    spans: InMemorySpanExporter, settings: Settings, redis_client: Redis
) -> None:
    svc = await start(settings.replace(grpc_address="127.0.0.1:0"))
    try:
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            with pytest.raises(aio.AioRpcError):
                await stub.GetProduct(pb.GetProductRequest(id="p9999999"))
    finally:
        await svc.stop(grace=0)
    (server,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == 5
    assert server.status.status_code.name == "UNSET", "NOT_FOUND is not a server error"
    assert server.parent is None, "no incoming traceparent: a new trace"


@pytest.mark.parametrize(
    "environ",
    [{"OTEL_TRACES_EXPORTER": "console"}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}],
)
def test_configure_turns_tracing_on_and_shutdown_off(environ: dict[str, str]) -> None:
    try:
        assert tracing.configure(environ, "catalog-test")
        assert tracing.enabled()
    finally:
        tracing.shutdown()
    assert not tracing.enabled()
    assert not tracing.configure({}, "catalog-test") and not tracing.enabled()
