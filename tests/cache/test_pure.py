"""Plain unit tests of the cache's pure pieces: breaker, single-flight, TTLs, wire encoding."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest

from catalog.v1 import catalog_pb2 as pb
from core.cache import ttl, wire
from core.cache.breaker import CircuitBreaker
from core.cache.singleflight import SingleFlight


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_k_failures_and_probes_once_after_reset() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, reset_s=2.0, clock=clock)
    for _ in range(2):
        breaker.failure()
    assert breaker.allow(), "still closed below the threshold"
    breaker.failure()
    assert not breaker.allow()
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow(), "one probe after reset_s"
    assert not breaker.allow(), "only one probe at a time"
    breaker.failure()
    assert not breaker.allow(), "a failed probe re-opens for reset_s"
    clock.now += 2.1
    assert breaker.allow()
    breaker.success()
    assert breaker.allow() and breaker.allow(), "a good probe closes it"


def test_breaker_probe_that_never_reports_does_not_wedge_it_open() -> None:
    """A probe whose call is cancelled (deadline) reports neither success nor failure."""
    clock = Clock()
    breaker = CircuitBreaker(failures=1, reset_s=1.0, clock=clock)
    breaker.failure()
    clock.now += 1.1
    assert breaker.allow(), "the probe"
    clock.now += 0.5
    assert not breaker.allow(), "one probe per window"
    clock.now += 0.6
    assert breaker.allow(), "the unanswered probe's window is over: probe again"
    breaker.success()
    assert breaker.allow()


def test_breaker_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(failures=2, reset_s=1.0, clock=Clock())
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert breaker.allow()


async def test_singleflight_shares_one_call_among_concurrent_callers() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = 0
    gate = asyncio.Event()

    async def load() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return 42

    waiters = [asyncio.ensure_future(flight.do("k", load)) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*waiters) == [42] * 50
    assert calls == 1
    assert len(flight) == 0, "finished keys are forgotten"


async def test_singleflight_survives_one_caller_cancelling() -> None:
    flight: SingleFlight[int] = SingleFlight()
    gate = asyncio.Event()

    async def load() -> int:
        await gate.wait()
        return 7

    first = asyncio.ensure_future(flight.do("k", load))
    second = asyncio.ensure_future(flight.do("k", load))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await second == 7


async def test_singleflight_propagates_errors_to_every_caller() -> None:
    flight: SingleFlight[int] = SingleFlight()

    async def load() -> int:
        await asyncio.sleep(0)
        raise RuntimeError("db down")

    results = await asyncio.gather(
        flight.do("k", load), flight.do("k", load), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)


def test_jitter_stays_within_bounds_and_spreads() -> None:
    rand = random.Random(1)
    values = [ttl.jittered_ms(100.0, 0.1, rand) for _ in range(2000)]
    assert min(values) >= 90_000 and max(values) <= 110_000
    assert len(set(values)) > 1000


def test_ttl_is_capped_at_next_price_change() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert ttl.capped_ms(300_000, now + timedelta(seconds=5), now) == 5000
    assert ttl.capped_ms(300_000, None, now) == 300_000
    assert ttl.capped_ms(300_000, now - timedelta(seconds=1), now) == ttl.MIN_TTL_MS


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16_383, 16_384, 2**31])
def test_varint_matches_protobuf(n: int) -> None:
    encoded = wire.varint(n)
    decoded, shift = 0, 0
    for byte in encoded:
        decoded |= (byte & 0x7F) << shift
        shift += 7
    assert decoded == n
    assert all(b & 0x80 for b in encoded[:-1]) and not encoded[-1] & 0x80


def test_assembled_list_response_parses_as_protobuf() -> None:
    products = [pb.Product(id=f"p{i}", name="n" * (i * 40)).SerializeToString() for i in range(5)]
    out: list[bytes] = []
    wire.repeated(1, products, out)
    out.append(wire.field(2, b"token"))
    parsed = pb.ListProductsResponse.FromString(b"".join(out))
    assert [p.id for p in parsed.products] == [f"p{i}" for i in range(5)]
    assert parsed.next_page_token == "token"


async def test_singleflight_cancels_the_load_when_its_last_caller_leaves() -> None:
    flight: SingleFlight[int] = SingleFlight()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def load() -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    callers = [asyncio.ensure_future(flight.do("k", load)) for _ in range(2)]
    await started.wait()
    callers[0].cancel()
    await asyncio.sleep(0)
    assert not cancelled.is_set(), "another caller still waits"
    callers[1].cancel()
    await asyncio.wait_for(cancelled.wait(), 5)
    assert len(flight) == 0


async def test_singleflight_new_caller_never_joins_a_load_being_cancelled() -> None:
    """The last caller leaves; the load's cancellation takes a while (psycopg cancelling a
    query). A caller arriving meanwhile gets a load of its own, not someone else's
    CancelledError."""
    flight: SingleFlight[int] = SingleFlight()
    started, cancelling, let_go = asyncio.Event(), asyncio.Event(), asyncio.Event()
    runs = 0

    async def load() -> int:
        nonlocal runs
        runs += 1
        if runs > 1:
            return 7
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelling.set()
            await let_go.wait()  # cancellation in progress
            raise
        return 0

    first = asyncio.ensure_future(flight.do("k", load))
    await started.wait()
    first.cancel()
    await cancelling.wait()
    second = asyncio.ensure_future(flight.do("k", load))
    await asyncio.sleep(0)
    let_go.set()
    assert await second == 7
    assert runs == 2


async def test_singleflight_background_load_outlives_a_caller_that_leaves() -> None:
    flight: SingleFlight[int] = SingleFlight()
    gate = asyncio.Event()

    async def load() -> int:
        await gate.wait()
        return 3

    flight.launch("k", load)
    caller = asyncio.ensure_future(flight.do("k", load))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.sleep(0)
    gate.set()
    assert await flight.do("k", load) == 3


def test_page_body_round_trips_and_keeps_ids_between_the_first_two_newlines() -> None:
    from core.cache import entry

    body = entry.PageBody("p0000040", ["p0000021", "p0000030"], "c1", "", "p0000020", 2)
    packed = entry.pack_page(body)
    assert entry.unpack_page(packed) == body
    assert packed.split(b"\n")[1] == b"p0000021,p0000030"
    empty = entry.PageBody("", [], "", "b9", "", 20)
    assert entry.unpack_page(entry.pack_page(empty)) == empty
