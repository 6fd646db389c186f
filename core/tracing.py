"""OpenTelemetry tracing, off unless the standard ``OTEL_*`` variables turn it on.

:func:`configure` reads them (through :func:`core.settings.otel_environ`): tracing is on when
``OTEL_TRACES_EXPORTER`` names an exporter (``otlp`` over gRPC, ``console``), or, with it unset,
when ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set;
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keeps it off. The SDK reads the rest
itself (endpoint, headers, ``OTEL_TRACES_SAMPLER``, ``OTEL_SERVICE_NAME``, resource attributes).

Off, nothing here costs anything per call: the SDK is not imported, handlers and clients are built
unwrapped (:func:`server_handler`, :func:`instrument_engine`, :func:`instrument_redis` are applied
only when :func:`enabled`), and the helpers the write path calls return at once.

On: a SERVER span per RPC continuing an incoming W3C ``traceparent``; CLIENT spans for SQL
statements and Redis commands made under a span (never root spans: the invalidator's polling
stays out of traces); the writer's ``traceparent`` travels in the outbox row and the stream entry
(docs/events.md), the relay publishes under a PRODUCER span and the invalidator continues with a
CONSUMER span, so one trace shows write -> commit -> relay -> invalidation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy import event

from core.events import valid_traceparent
from core.settings import SettingsError

EXPORTERS = ("otlp", "console")
MAX_STATEMENT = 2000  # characters of SQL kept in db.statement
# gRPC codes that make a server span an error (OpenTelemetry's RPC conventions): the others are
# the client's business (NOT_FOUND, INVALID_ARGUMENT, ...).
SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})

_propagator = TraceContextTextMapPropagator()
_tracer: trace.Tracer | None = None
_provider: Any = None


def exporters(environ: Mapping[str, str]) -> list[str]:
    """The exporters the ``OTEL_*`` variables ask for (empty: tracing off); SettingsError if
    they name one this service does not ship."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = environ.get("OTEL_TRACES_EXPORTER")
    if raw is None:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    if names == ["none"] or not names:
        return []
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise SettingsError(
            f"OTEL_TRACES_EXPORTER names {', '.join(map(repr, unknown))}; "
            f"supported: {', '.join(EXPORTERS)}, none"
        )
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if "otlp" in names and protocol.strip() != "grpc":
        raise SettingsError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r} is not supported: the otlp exporter "
            "shipped is OTLP over gRPC ('grpc')"
        )
    return names


def configure(environ: Mapping[str, str], service_name: str) -> bool:
    """Turn tracing on if ``environ`` asks for it (see the module docstring); True if on."""
    names = exporters(environ)
    if not names:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    use(provider)
    return True


def use(provider: Any) -> None:
    """Trace with ``provider`` (an SDK TracerProvider; tests give one with an in-memory
    exporter); None turns tracing off. Handlers and clients built earlier keep what they had."""
    global _tracer, _provider
    _provider = provider
    _tracer = None if provider is None else provider.get_tracer("catalog")


def shutdown() -> None:
    """Flush and stop the exporters (at process exit)."""
    provider = _provider
    use(None)
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


def _active() -> bool:
    """Is there a current span that records? Child spans are made only then: under a span the
    sampler dropped they would be dropped too, after costing their creation."""
    return _tracer is not None and trace.get_current_span().is_recording()


def traceparent() -> str:
    """The current span as a W3C ``traceparent``, or "" (tracing off, or no span). An unsampled
    span is passed on too (flags 00), so downstream keeps the sampling decision."""
    if _tracer is None or not trace.get_current_span().get_span_context().is_valid:
        return ""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def current_ids() -> tuple[str, str]:
    """(trace id, span id) in hex of the current span, or ("", "") (for log records)."""
    if _tracer is None:
        return "", ""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def _context_of(parent: str) -> otel_context.Context | None:
    return _propagator.extract({"traceparent": parent}) if valid_traceparent(parent) else None


class _MetadataGetter(Getter[Sequence[tuple[str, Any]]]):
    """Reads gRPC invocation metadata (a sequence of (key, value) pairs) for the propagator."""

    def get(self, carrier: Sequence[tuple[str, Any]], key: str) -> list[str] | None:
        found = [v for k, v in carrier if k == key and isinstance(v, str)]
        return found or None

    def keys(self, carrier: Sequence[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


_metadata = _MetadataGetter()


def server_handler(
    service: str, method: str, handle: Callable[[Any, Any], Awaitable[bytes]]
) -> Callable[[Any, Any], Awaitable[bytes]]:
    """``handle`` run in a SERVER span that continues the call's ``traceparent`` metadata."""
    name = f"{service}/{method}"
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

    async def traced(request: Any, context: Any) -> bytes:
        tracer = _tracer
        if tracer is None:
            return await handle(request, context)
        parent = _propagator.extract(tuple(context.invocation_metadata() or ()), getter=_metadata)
        with tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            span.set_attribute("net.sock.peer.addr", context.peer())
            result = await handle(request, context)
            span.set_attribute("rpc.grpc.status_code", 0)
            return result

    return traced


def note_status(code: int, name: str) -> None:
    """Record a call's gRPC status on the current server span (error codes mark it an error)."""
    if _tracer is None:
        return
    span = trace.get_current_span()
    span.set_attribute("rpc.grpc.status_code", code)
    if code in SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, name))


@contextlib.contextmanager
def span(name: str, **attributes: str | int) -> Iterator[None]:
    """A child span of the current one (nothing when tracing is off or no span is current)."""
    if not _active():
        yield
        return
    assert _tracer is not None
    with _tracer.start_as_current_span(name, attributes=attributes):
        yield


@contextlib.contextmanager
def continued(
    name: str,
    parents: Sequence[str],
    *,
    kind: SpanKind = SpanKind.CONSUMER,
    attributes: Mapping[str, str | int] | None = None,
) -> Iterator[list[str]]:
    """One span per valid ``traceparent`` in ``parents``, each continuing its trace; the first
    is current inside the block (Redis and SQL spans of the block nest under it).

    Yields ``parents`` with each continued one replaced by its new span's ``traceparent`` (the
    others unchanged), for whoever passes the context on."""
    tracer = _tracer
    contexts = [_context_of(p) if p else None for p in parents] if tracer is not None else []
    if tracer is None or not any(c is not None for c in contexts):
        yield list(parents)
        return
    spans: list[trace.Span] = []
    out: list[str] = []
    for parent, ctx in zip(parents, contexts, strict=True):
        if ctx is None:
            out.append(parent)
            continue
        s = tracer.start_span(name, context=ctx, kind=kind, attributes=attributes)
        spans.append(s)
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, context=trace.set_span_in_context(s))
        out.append(carrier["traceparent"])
    token = otel_context.attach(trace.set_span_in_context(spans[0]))
    try:
        yield out
    except BaseException as exc:
        for s in spans:
            s.record_exception(exc)
            s.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        otel_context.detach(token)
        for s in spans:
            s.end()


def instrument_engine(engine: Any) -> None:
    """CLIENT spans for the SQL statements ``engine`` (an AsyncEngine) runs under a span."""
    if _tracer is None:
        return
    sync = engine.sync_engine

    @event.listens_for(sync, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        if not _active() or ctx is None:
            return
        assert _tracer is not None
        verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "SQL"
        ctx._catalog_span = _tracer.start_span(
            f"sql {verb}",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system": "postgresql",
                "db.operation": verb,
                "db.statement": statement[:MAX_STATEMENT],
            },
        )

    @event.listens_for(sync, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        s = getattr(ctx, "_catalog_span", None)
        if s is not None:
            ctx._catalog_span = None
            s.end()

    @event.listens_for(sync, "handle_error")
    def _error(exception_context: Any) -> None:
        ctx = exception_context.execution_context
        s = getattr(ctx, "_catalog_span", None)
        if s is not None:
            ctx._catalog_span = None
            s.set_status(
                Status(StatusCode.ERROR, type(exception_context.original_exception).__name__)
            )
            s.end()


def instrument_redis(redis: Any) -> None:
    """CLIENT spans for the commands and pipelines ``redis`` (a redis.asyncio client) runs under
    a span. Patches this client object only (scripts go through its ``execute_command``)."""
    if _tracer is None:
        return
    execute_command = redis.execute_command
    make_pipeline = redis.pipeline

    async def traced_command(*args: Any, **options: Any) -> Any:
        if not _active():
            return await execute_command(*args, **options)
        assert _tracer is not None
        verb = str(args[0]).upper() if args else "?"
        with _tracer.start_as_current_span(
            f"redis {verb}",
            kind=SpanKind.CLIENT,
            attributes={"db.system": "redis", "db.operation": verb},
        ):
            return await execute_command(*args, **options)

    def traced_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make_pipeline(*args, **kwargs)
        run = pipe.execute

        async def execute(*a: Any, **k: Any) -> Any:
            if not _active():
                return await run(*a, **k)
            assert _tracer is not None
            verbs = [str(c[0][0]).upper() for c in getattr(pipe, "command_stack", ())][:20]
            with _tracer.start_as_current_span(
                "redis pipeline",
                kind=SpanKind.CLIENT,
                attributes={"db.system": "redis", "db.operation": " ".join(verbs)},
            ):
                return await run(*a, **k)

        pipe.execute = execute
        return pipe

    redis.execute_command = traced_command
    redis.pipeline = traced_pipeline
