"""RED metrics of every RPC the server answers, and the in-flight limit they count against.

Names and labels are the grpc-ecosystem ones (go-grpc-prometheus, py-grpc-prometheus), so stock
dashboards and alerts apply:

* ``grpc_server_started_total{grpc_type,grpc_service,grpc_method}``
* ``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}``
* ``grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}`` (histogram, every code)
* ``grpc_server_in_flight{grpc_type,grpc_service,grpc_method}``: started minus handled

Every call is counted: refused (RESOURCE_EXHAUSTED), cancelled by the client (CANCELLED), cut by
its deadline (DEADLINE_EXCEEDED), and the health and reflection services too (:class:`Counted`
wraps whatever handlers they register).

The in-flight limit (``CATALOG_MAX_CONCURRENT_RPCS``) is enforced here, by :class:`CallLimit`,
rather than by gRPC's ``maximum_concurrent_rpcs``: gRPC refuses an excess call inside its Cython
server loop after the method lookup (an interceptor still sees the call) but without running any
handler or telling anyone, so a refused call cannot be told from one about to run and refusals
would go uncounted.

Hot path: the per-method :class:`MethodStats` is bound when the handler is built; a call adds
two integers and one histogram observation. Counters are plain ints on the event loop's thread,
read by the scrape thread through :class:`_Collector` (a read of an int is atomic in CPython).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from prometheus_client import REGISTRY
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)
access_log = logging.getLogger("catalog.access")

CODES: tuple[grpc.StatusCode, ...] = tuple(sorted(grpc.StatusCode, key=lambda c: c.value[0]))
LABELS = ("grpc_type", "grpc_service", "grpc_method")
UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI_STREAM = (
    "unary",
    "server_stream",
    "client_stream",
    "bidi_stream",
)
REFUSED_DETAILS = "too many calls in flight; retry with backoff"

#: ``grpc_server_handling_seconds``: its buckets' upper bounds (seconds).
BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class Durations:
    """One method's ``grpc_server_handling_seconds``: plain counts per bucket (the last one
    past every bound) and their sum, kept on the event loop's thread and read at scrape time;
    an observation is a bisect and two additions (prometheus_client's ``Histogram`` takes a
    lock and costs 2 us a call, a tenth of a cached GetProduct's handler)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """(``le``, count) pairs as Prometheus has them, +Inf last, and the sum."""
        counts, total = list(self.counts), self.total
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(floatToGoString, BUCKETS), "+Inf"), counts, strict=True):
            running += n
            out.append((bound, running))
        return out, total


class MethodStats:
    """Counters of one method; ``handled[code.value[0]]`` counts calls that ended with ``code``."""

    __slots__ = ("handled", "labels", "seconds", "started")

    def __init__(self, kind: str, service: str, method: str) -> None:
        self.labels = (kind, service, method)
        self.started = 0
        self.handled = [0] * len(CODES)
        self.seconds = Durations()

    def done(self, code: grpc.StatusCode, took: float) -> None:
        self.handled[code.value[0]] += 1
        self.seconds.observe(took)


class CallLimit:
    """Calls in flight across every service of one server, refused beyond ``limit``."""

    __slots__ = ("active", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0


_methods: dict[tuple[str, str, str], MethodStats] = {}


def method_stats(kind: str, service: str, method: str) -> MethodStats:
    """The one :class:`MethodStats` of a method (shared by servers started in one process)."""
    key = (kind, service, method)
    stats = _methods.get(key)
    if stats is None:
        stats = _methods[key] = MethodStats(kind, service, method)
    return stats


class _Collector(Collector):
    def collect(self) -> Iterator[Metric]:
        started = CounterMetricFamily(
            "grpc_server_started", "RPCs started on the server (refused ones too)", labels=LABELS
        )
        handled = CounterMetricFamily(
            "grpc_server_handled",
            "RPCs completed on the server, by status code",
            labels=(*LABELS, "grpc_code"),
        )
        in_flight = GaugeMetricFamily(
            "grpc_server_in_flight", "RPCs started and not yet completed", labels=LABELS
        )
        seconds = HistogramMetricFamily(
            "grpc_server_handling_seconds",
            "Time from a handler's start to its status, by method (every status code)",
            labels=LABELS,
        )
        for stats in list(_methods.values()):
            counts = list(stats.handled)
            started.add_metric(stats.labels, stats.started)
            for code, n in zip(CODES, counts, strict=True):
                if n:
                    handled.add_metric((*stats.labels, code.name), n)
            in_flight.add_metric(stats.labels, max(0, stats.started - sum(counts)))
            buckets, total = stats.seconds.cumulative()
            seconds.add_metric(stats.labels, buckets, total)
        yield started
        yield handled
        yield in_flight
        yield seconds


REGISTRY.register(_Collector())


def log_access(
    method: str, context: aio.ServicerContext[Any, Any], code: grpc.StatusCode, took: float
) -> None:
    """One DEBUG line per call (``catalog.access``); built only when that logger is enabled."""
    access_log.debug(
        "%s %s %s %.2fms",
        method,
        code.name,
        context.peer(),
        took * 1000,
        extra={
            "method": method,
            "peer": context.peer(),
            "status": code.name,
            "duration_ms": round(took * 1000, 3),
        },
    )


def access_logger() -> Callable[..., None] | None:
    """:func:`log_access` when ``catalog.access`` logs DEBUG, else None (decided at start-up)."""
    return log_access if access_log.isEnabledFor(logging.DEBUG) else None


def status_of_abort(context: aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """The code a handler aborted with (``context.code()``), UNKNOWN if gRPC does not say."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in CODES:
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN


def _counted(kind: str, service: str, method: str, behaviour: Any, calls: CallLimit) -> Any:
    """``behaviour`` counted, timed and limited like the CatalogService handlers."""
    stats = method_stats(kind, service, method)
    name = f"/{service}/{method}"
    ok = grpc.StatusCode.OK
    access = access_logger()

    async def begin(context: aio.ServicerContext[Any, Any]) -> None:
        stats.started += 1
        if calls.active >= calls.limit:
            stats.done(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.0)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, REFUSED_DETAILS)
        calls.active += 1

    def end(
        context: aio.ServicerContext[Any, Any], start: float, exc: BaseException | None
    ) -> None:
        calls.active -= 1
        if exc is None:
            code = ok
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):  # the client went away
            code = grpc.StatusCode.CANCELLED
        elif isinstance(exc, aio.AbortError):
            code = status_of_abort(context)
        else:
            log.error("%s failed", name, exc_info=exc, extra={"method": name})
            code = grpc.StatusCode.UNKNOWN
        took = perf_counter() - start
        stats.done(code, took)
        if access is not None:
            access(name, context, code, took)

    if inspect.isasyncgenfunction(behaviour):

        async def stream(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            start = perf_counter()
            await begin(context)
            try:
                async for item in behaviour(request, context):
                    yield item
            except BaseException as exc:
                end(context, start, exc)
                raise
            end(context, start, None)

        return stream

    async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        start = perf_counter()
        await begin(context)
        try:
            result = await behaviour(request, context)
        except BaseException as exc:
            end(context, start, exc)
            raise
        end(context, start, None)
        return result

    return call


def count_handler(
    service: str, method: str, handler: grpc.RpcMethodHandler[Any, Any], calls: CallLimit
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its behaviour counted (:func:`_counted`), whatever its streaming kind."""
    h: Any = handler
    if h.request_streaming and h.response_streaming:
        kind, attr, make = BIDI_STREAM, "stream_stream", grpc.stream_stream_rpc_method_handler
    elif h.request_streaming:
        kind, attr, make = CLIENT_STREAM, "stream_unary", grpc.stream_unary_rpc_method_handler
    elif h.response_streaming:
        kind, attr, make = SERVER_STREAM, "unary_stream", grpc.unary_stream_rpc_method_handler
    else:
        kind, attr, make = UNARY, "unary_unary", grpc.unary_unary_rpc_method_handler
    behaviour = _counted(kind, service, method, getattr(h, attr), calls)
    return make(
        behaviour,
        request_deserializer=h.request_deserializer,
        response_serializer=h.response_serializer,
    )


def _split(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


if TYPE_CHECKING:
    _GenericRpcHandler = grpc.GenericRpcHandler[Any, Any]
else:
    _GenericRpcHandler = grpc.GenericRpcHandler  # not subscriptable at run time


class _CountedGeneric(_GenericRpcHandler):
    """A generic handler whose method handlers are counted; wrapped once per known method."""

    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any], calls: CallLimit) -> None:
        self.inner = inner
        self.calls = calls
        self.wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        found = self.wrapped.get(details.method)
        if found is not None:
            return found
        handler = self.inner.service(details)
        if handler is None:  # unknown method: nothing cached, so names from outside stay out
            return None
        found = self.wrapped[details.method] = count_handler(
            *_split(details.method), handler, self.calls
        )
        return found


class Counted:
    """Stands in for the server while a standard service (health, reflection) registers: every
    handler it adds is counted and limited like the CatalogService's own."""

    def __init__(self, server: aio.Server, calls: CallLimit) -> None:
        self.server = server
        self.calls = calls

    def add_generic_rpc_handlers(
        self, handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self.server.add_generic_rpc_handlers(
            tuple(_CountedGeneric(h, self.calls) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Added as generic handlers, not registered ones: grpc.aio keeps one call request
        outstanding per registered method and waits on all of them for every call it accepts
        (``asyncio.wait`` in its server loop), so the health and reflection methods, called
        rarely, would add their cost to every CatalogService call."""
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    service,
                    {m: count_handler(service, m, h, self.calls) for m, h in handlers.items()},
                ),
            )
        )
