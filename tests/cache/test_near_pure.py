"""The near cache's own rules (core/cache/near.py), with an injected clock: the watermark gate,
tickets against racing invalidations, versions, resets and the size bounds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from core.cache import entry
from core.cache.near import ENTRY_OVERHEAD, NearCache

FUTURE_MS = 10**14  # fresh_until far ahead


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def raw(version: int, body: bytes = b"c\nb\nproduct", fresh_until: int = FUTURE_MS) -> bytes:
    return entry.pack(body, version, fresh_until, 1)


def near_cache(clock: Clock, **kw: int) -> NearCache:
    near = NearCache(
        kw.get("entries", 100), kw.get("bytes", 1 << 20), 50, clock=clock, wall_ms=lambda: 1000.0
    )
    near.reset(["node"])
    near.advance("node", clock.now)
    return near


def fill(near: NearCache, key: str, value: bytes) -> bool:
    return near.put(key, value, near.ticket(key))


def test_serves_only_while_the_watermark_is_within_the_bound() -> None:
    clock = Clock()
    near = near_cache(clock)
    assert fill(near, "k", raw(1))
    clock.now += 0.050
    assert near.get("k") == raw(1)
    clock.now += 0.001  # 51 ms since the last heartbeat came back
    assert near.get("k") is None
    assert not near.put("j", raw(1), near.ticket("j")), "no fill while not up to date"
    near.advance("node", clock.now)
    assert near.get("k") == raw(1)


def test_the_oldest_node_sets_the_watermark() -> None:
    clock = Clock()
    near = NearCache(10, 1 << 20, 50, clock=clock, wall_ms=lambda: 1000.0)
    near.reset(["a", "b"])
    near.advance("a", clock.now)
    assert not near.serving(), "b has sent no heartbeat yet"
    near.advance("b", clock.now - 0.040)
    assert near.serving()
    clock.now += 0.011
    assert not near.serving()
    near.advance("unknown", clock.now)
    assert not near.serving(), "a node not tracked in this session counts for nothing"


def test_an_invalidation_during_the_read_voids_its_fill() -> None:
    clock = Clock()
    near = near_cache(clock)
    ticket = near.ticket("k")
    near.invalidate("k")  # the key changed after the read began
    assert not near.put("k", raw(1), ticket)
    assert near.get("k") is None
    # Another key's invalidation does not void this read; and the bookkeeping is gone.
    ticket = near.ticket("k")
    near.invalidate("other")
    assert near.put("k", raw(1), ticket)
    assert near._inflight == {} and near._voided == {}


def test_concurrent_reads_of_one_key_are_each_voided() -> None:
    clock = Clock()
    near = near_cache(clock)
    first, second = near.ticket("k"), near.ticket("k")
    near.invalidate("k")
    third = near.ticket("k")
    assert not near.put("k", raw(1), first)
    assert not near.put("k", raw(1), second)
    assert near.put("k", raw(2), third)


def test_a_reset_voids_every_ticket_and_empties_the_table() -> None:
    clock = Clock()
    near = near_cache(clock)
    fill(near, "a", raw(1))
    ticket = near.ticket("b")
    near.reset()
    assert len(near) == 0 and near.size_bytes == 0
    assert not near.put("b", raw(1), ticket)
    assert near.serving(), "a flush keeps the watermarks: the channel is intact"
    near.reset([])
    assert not near.serving(), "a lost channel serves nothing until a new one proves itself"


def test_versions_never_go_backwards() -> None:
    clock = Clock()
    near = near_cache(clock)
    assert fill(near, "k", raw(5))
    assert not fill(near, "k", raw(4))
    assert near.get("k") == raw(5)
    assert fill(near, "k", raw(6))
    assert near.get("k") == raw(6)


def test_negative_missing_and_expired_entries_are_not_served() -> None:
    clock = Clock()
    near = near_cache(clock)
    assert not fill(near, "neg", b"")
    assert not near.put("none", None, near.ticket("none"))
    assert fill(near, "old", raw(1, fresh_until=999))  # the wall clock says 1000
    assert near.get("old") is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 30), st.integers(0, 300)), max_size=200),
    st.integers(1, 20),
    st.integers(200, 5000),
)
def test_bounds_hold_and_eviction_is_least_recently_used(
    ops: list[tuple[int, int]], max_entries: int, max_bytes: int
) -> None:
    clock = Clock()
    near = near_cache(clock, entries=max_entries, bytes=max_bytes)
    order: list[str] = []  # least recently used first, as a model
    sizes: dict[str, int] = {}
    for key_n, body_len in ops:
        key = f"k{key_n}"
        if body_len % 3 == 0:  # a read
            got = near.get(key)
            assert (got is not None) == (key in sizes)
            if got is not None:
                order.remove(key)
                order.append(key)
            continue
        value = raw(1, b"c\nb\n" + b"x" * body_len)
        size = len(value) + len(key) + ENTRY_OVERHEAD
        installed = fill(near, key, value)
        assert installed == (size <= max_bytes)
        if not installed:
            continue
        if key in sizes:
            order.remove(key)
        order.append(key)
        sizes[key] = size
        while len(order) > max_entries or sum(sizes.values()) > max_bytes:
            del sizes[order.pop(0)]
        assert len(near) == len(order) <= max_entries
        assert near.size_bytes == sum(sizes.values()) <= max_bytes


def test_suspended_time_is_counted_from_when_the_watermark_aged_out() -> None:
    clock = Clock()
    near = near_cache(clock)
    base = near.suspended_seconds()
    clock.now += 0.150  # no heartbeat for 150 ms: suspended for the last 100
    assert abs(near.suspended_seconds() - base - 0.100) < 1e-9
    near.advance("node", clock.now)
    clock.now += 0.010
    assert abs(near.suspended_seconds() - base - 0.100) < 1e-9
    clock.now += 0.060  # 20 ms past the bound again
    assert abs(near.suspended_seconds() - base - 0.120) < 1e-9


def test_idle_time_is_not_suspended_time() -> None:
    clock = Clock()
    near = near_cache(clock)
    clock.now += 0.030
    near.set_idle(True)  # the channel stops beating: nobody looks
    clock.now += 5.0
    assert near.suspended_seconds() == 0.0
    near.set_idle(False)  # a lookup: beats again; refused until the first comes back
    clock.now += 0.004
    assert abs(near.suspended_seconds() - 0.004) < 1e-9
    near.advance("node", clock.now)
    clock.now += 0.010
    assert abs(near.suspended_seconds() - 0.004) < 1e-9
    assert near.reads == 0
    near.get("k")
    assert near.reads == 1
