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


def test_redis_cluster_forms_serves_every_slot_and_fails_over(tmp_path: Path) -> None:
    """Three primaries with a replica each: every slot is served; killing a primary promotes its
    replica and the cluster is whole again."""
    import redis

    from devtools.rediscluster import RedisCluster

    with RedisCluster(tmp_path / "cluster", primaries=3, replicas=1) as cluster:
        client = redis.RedisCluster.from_url(cluster.url)
        try:
            keys = [f"k{i}" for i in range(300)]
            for key in keys:
                client.set(key, key)
            slots = {client.keyslot(k) for k in keys}  # type: ignore[no-untyped-call]
            owners = {client.get_node_from_key(k).port for k in keys}  # type: ignore[no-untyped-call]
            assert len(slots) > 100 and len(owners) == 3
            before = sorted(cluster.primaries())
            assert len(before) == 3

            victim = owners.pop()
            cluster.node(victim).stop()
            cluster.wait_ok()
            after = cluster.primaries()
            assert victim not in after and len(after) == 3
        finally:
            client.close()
        client = redis.RedisCluster.from_url(f"redis://127.0.0.1:{after[0]}/0")
        try:
            assert [client.get(k) for k in keys] == [k.encode() for k in keys]
        finally:
            client.close()
