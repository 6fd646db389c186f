"""PostgreSQL restarted under a read load on a service process (cache off: every read needs it).

Acceptance figures (issue #6): reads during the outage get UNAVAILABLE, never UNKNOWN, INTERNAL
or a hang (DEADLINE_EXCEEDED at a 2 s deadline); 0 errors among reads started after PostgreSQL is
back (the pool's pre-ping replaces the connections the restart killed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from core.settings import Settings
from devtools.localservers import PostgresCluster
from devtools.serverprocess import ServerProcess
from tests.faults.conftest import ReadLoad, wait_until

pytestmark = pytest.mark.fault


@pytest.fixture
def server(settings: Settings, pg_cluster: PostgresCluster) -> Iterator[ServerProcess]:
    proc = ServerProcess(settings.replace(database_url=pg_cluster.url, cache_enabled=False))
    yield proc.start()
    proc.stop()


async def test_reads_get_unavailable_while_postgresql_restarts_and_succeed_after(
    server: ServerProcess, pg_cluster: PostgresCluster
) -> None:
    load = ReadLoad(server.target, deadline_s=2.0, max_seconds=60).start()
    await wait_until(lambda: load.codes()["OK"] >= 200, 15, "reads served")

    await asyncio.to_thread(pg_cluster.stop, "fast")
    down_at = time.monotonic()
    await wait_until(
        lambda: load.codes(since=down_at)["UNAVAILABLE"] >= 50, 15, "reads refused as UNAVAILABLE"
    )
    await asyncio.to_thread(pg_cluster.start)
    back_at = time.monotonic()
    await wait_until(lambda: load.codes(since=back_at)["OK"] >= 500, 30, "reads served again")
    outcomes = await load.stop()

    during = load.codes(since=down_at) - load.codes(since=back_at)
    after = load.codes(since=back_at)
    print(
        f"\noutage {back_at - down_at:.2f} s: {dict(during)}; after: {dict(after)}; slowest "
        f"refusal {max(o.seconds for o in outcomes if o.code.name != 'OK') * 1000:.0f} ms"
    )
    assert set(load.codes()) <= {"OK", "UNAVAILABLE"}, load.codes()
    assert set(after) == {"OK"}, after
