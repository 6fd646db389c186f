"""The private PostgreSQL cluster the test suite and ``make run`` start from local binaries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from devtools.localservers import PostgresCluster, postgres_dir


@pytest.fixture
def cluster_dir() -> Iterator[Path]:
    """A directory the postgres user can reach when we run as root (pytest's tmp is 0700)."""
    with postgres_dir() as path:
        yield path


def _select_one(url: str) -> int:
    u = make_url(url)
    with psycopg.connect(
        host=u.host, port=u.port, user=u.username, dbname=u.database, connect_timeout=5
    ) as conn:
        row = conn.execute("SELECT 1").fetchone()
    assert row is not None
    return int(row[0])


def test_cluster_starts_restarts_survives_kill_and_stops(cluster_dir: Path) -> None:
    with PostgresCluster(cluster_dir / "pg") as cluster:
        assert cluster.is_running()
        assert _select_one(cluster.url) == 1
        with psycopg.connect(cluster.url.replace("+psycopg", "")) as c:
            c.execute("CREATE TABLE kept (n int)")
            c.execute("INSERT INTO kept VALUES (7)")

        cluster.restart()
        assert _select_one(cluster.url) == 1

        cluster.kill()
        assert not cluster.is_running()
        with pytest.raises(psycopg.OperationalError):
            _select_one(cluster.url)

        cluster.start()  # crash recovery keeps committed rows
        with psycopg.connect(cluster.url.replace("+psycopg", "")) as c:
            assert c.execute("SELECT n FROM kept").fetchall() == [(7,)]

        cluster.stop()
        assert not cluster.is_running()
        with pytest.raises(psycopg.OperationalError):
            _select_one(cluster.url)


def test_an_initialised_cluster_is_reused_on_its_port(cluster_dir: Path) -> None:
    first = PostgresCluster(cluster_dir / "pg").start()
    try:
        again = PostgresCluster(cluster_dir / "pg")
        assert again.port == first.port
        assert again.is_running()
    finally:
        first.stop()
    reused = PostgresCluster(cluster_dir / "pg")
    assert reused.port == first.port
    with reused:
        assert _select_one(reused.url) == 1
