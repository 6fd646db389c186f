"""The staleness checker (devtools/history.py) on hand-made histories."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devtools.history import History, Read, Write, stale_reads


def test_a_read_of_the_latest_acknowledged_version_is_not_stale() -> None:
    h = History()
    h.write("a", 2, committed=1.0)
    h.read("a", 2, start=1.5, end=1.6)
    h.read("a", 1, start=0.5, end=1.2)  # began before the write was acknowledged
    assert h.stale_reads() == []
    assert h.worst() is None
    assert h.worst_staleness() == 0.0


def test_a_read_concurrent_with_the_write_is_not_stale() -> None:
    h = History()
    h.write("a", 2, committed=1.0)
    h.read("a", 1, start=0.9, end=1.1)
    assert h.worst_staleness() == 0.0


def test_the_known_staleness_is_reported() -> None:
    h = History()
    h.write("a", 2, committed=1.000)
    h.write("a", 3, committed=1.030)
    h.read("a", 2, start=1.010, end=1.011)
    h.read("a", 1, start=1.040, end=1.041)  # missed v2 (40 ms) and v3 (10 ms): 40 ms
    h.read("a", 2, start=1.045, end=1.046)  # missed v3: 15 ms
    h.read("a", 3, start=2.0, end=2.1)
    stale = h.stale_reads()
    assert [(s.read.version, s.missed.version) for s in stale] == [(1, 2), (2, 3)]
    worst = h.worst()
    assert worst is not None
    assert worst.read == Read("a", 1, 1.040, 1.041)
    assert worst.missed == Write("a", 2, 1.000)
    assert worst.staleness == pytest.approx(0.040)
    assert h.worst_staleness() == pytest.approx(0.040)


def test_keys_are_independent() -> None:
    h = History()
    h.write("a", 5, committed=1.0)
    h.read("b", 1, start=3.0, end=3.1)  # "b" never changed
    h.read("a", 5, start=3.0, end=3.1)
    assert h.worst_staleness() == 0.0
    h.read("a", 4, start=3.0, end=3.1)
    assert h.worst_staleness() == pytest.approx(2.0)


def test_acknowledgements_out_of_version_order_count_the_earliest() -> None:
    """v3's acknowledgement arrived before v2's: a read of v1 missed v3 from its ack on."""
    h = History()
    h.write("a", 2, committed=1.5)
    h.write("a", 3, committed=1.2)
    h.read("a", 1, start=1.3, end=1.4)
    h.read("a", 2, start=1.6, end=1.7)
    assert [round(s.staleness, 6) for s in h.stale_reads()] == [0.1, 0.4]


def test_unacknowledged_writes_are_not_counted() -> None:
    """A write the test never saw acknowledged is not in the history: reading around it is
    not stale (and a later version's read is fine)."""
    h = History()
    h.write("a", 3, committed=2.0)
    h.read("a", 1, start=1.9, end=2.0)  # v2 was made but never acknowledged
    h.read("a", 3, start=2.1, end=2.2)
    assert h.worst_staleness() == 0.0


@given(
    st.lists(st.tuples(st.integers(1, 20), st.floats(0, 100)), max_size=30),
    st.lists(st.tuples(st.integers(0, 20), st.floats(0, 100)), max_size=30),
)
def test_agrees_with_the_definition(
    writes: list[tuple[int, float]], reads: list[tuple[int, float]]
) -> None:
    ws = [Write("k", v, t) for v, t in writes]
    rs = [Read("k", v, t, t + 1) for v, t in reads]
    found = {(s.read, s.missed.committed) for s in stale_reads(rs, ws)}
    expected = set()
    for r in rs:
        times = [w.committed for w in ws if w.version > r.version and w.committed < r.start]
        if times:
            expected.add((r, min(times)))
    assert found == expected
