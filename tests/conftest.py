"""Real servers for the test suite.

Redis: a private ``redis-server`` per session (``TEST_REDIS_URL`` overrides). PostgreSQL: a fresh,
uniquely named database on ``TEST_DATABASE_URL`` (default: the local server on 127.0.0.1:5432, or a
private cluster when that one does not answer or refuses us), migrated and seeded once, dropped at
the end. Tests share those servers but never each other's data: every test gets its own Redis key
namespace, so nothing is ever flushed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from core.settings import Settings
from devtools.localservers import RedisProcess, usable_postgres
from tests.helpers import delete_namespace, make_settings, writer_channel

SEED_PRODUCTS = 300


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("TEST_REDIS_URL")
    if given:
        yield given
        return
    with RedisProcess(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A node of a 3-primary Redis Cluster (no replicas) shared by the session, started the
    first time a test asks for it (``TEST_REDIS_CLUSTER_URL`` overrides). Tests keep apart by
    key namespace, as on the shared Redis."""
    given = os.environ.get("TEST_REDIS_CLUSTER_URL")
    if given:
        yield given
        return
    from devtools.rediscluster import RedisCluster

    with RedisCluster(tmp_path_factory.mktemp("rediscluster"), primaries=3) as cluster:
        yield cluster.url


@dataclass(frozen=True)
class Topology:
    """Where a test's Redis lives: ``mode`` is a ``CATALOG_REDIS_MODE``, ``url`` a node."""

    mode: str
    url: str


@pytest.fixture(params=["standalone", "cluster"])
def redis_topology(request: pytest.FixtureRequest) -> Topology:
    """Runs the test once on the shared Redis and once on the shared Redis Cluster."""
    mode = request.param
    url = request.getfixturevalue("redis_cluster_url" if mode == "cluster" else "redis_url")
    return Topology(mode, url)


@pytest.fixture
def topo_settings(database_url: str, redis_topology: Topology) -> Settings:
    """Settings for one test on ``redis_topology``, a key namespace of its own. A module opts
    its tests in to both topologies with ``settings = pytest.fixture(lambda topo_settings:
    topo_settings, name="settings")`` (see tests/invalidator/test_group.py)."""
    return make_settings(
        database_url=database_url,
        redis_url=redis_topology.url,
        redis_mode=redis_topology.mode,
        key_namespace=f"t{uuid.uuid4().hex[:10]}",
        metrics_port=0,
    )


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis of this test's own, which it may stop and restart."""
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.stop()


def _admin_conninfo(url: str) -> tuple[str, str]:
    """(libpq conninfo of the server's maintenance db, SQLAlchemy URL template)."""
    sa_url = make_url(url)
    conninfo = psycopg.conninfo.make_conninfo(
        host=sa_url.host or "127.0.0.1",
        port=sa_url.port or 5432,
        user=sa_url.username or "postgres",
        password=sa_url.password or None,
        dbname="postgres",
    )
    return conninfo, url


def create_database(base_url: str) -> str:
    """Create a uniquely named empty database; return its SQLAlchemy URL."""
    conninfo, _ = _admin_conninfo(base_url)
    name = f"catalog_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return (
        make_url(base_url)
        .set(database=name, drivername="postgresql+psycopg")
        .render_as_string(hide_password=False)
    )


def drop_database(url: str) -> None:
    conninfo, _ = _admin_conninfo(url)
    name = make_url(url).database
    assert name is not None and name.startswith("catalog_test_")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def pg_base_url(pytestconfig: pytest.Config) -> Iterator[str]:
    """``TEST_DATABASE_URL``, else the local server, else (it does not answer or refuses us, as a
    fresh Debian's does without a password) a private cluster for the session, said in one line."""
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        yield given
        return
    plugins = pytestconfig.pluginmanager

    def say(line: str) -> None:  # on the terminal, past pytest's output capture
        terminal, capture = (
            plugins.get_plugin("terminalreporter"),
            plugins.get_plugin("capturemanager"),
        )
        if terminal is None or capture is None:
            print(line, file=sys.stderr)
            return
        with capture.global_and_fixture_disabled():
            terminal.write_line(f"\n{line}")

    with usable_postgres(LOCAL_POSTGRES, say=say) as url:
        yield url


@contextlib.contextmanager
def seeded_database(pg_base_url: str) -> Iterator[str]:
    """A new database, migrated and seeded with SEED_PRODUCTS products (seed 42); dropped after."""
    from core.migrations import upgrade
    from ops.seed import seed_catalog

    url = create_database(pg_base_url)
    try:
        upgrade(url)
        seed_catalog(url, products=SEED_PRODUCTS, seed=42)
        yield url
    finally:
        drop_database(url)


@pytest.fixture(scope="session")
def database_url(pg_base_url: str) -> Iterator[str]:
    """The session's seeded database, shared read-only."""
    with seeded_database(pg_base_url) as url:
        yield url


@pytest.fixture
def fresh_database_url(pg_base_url: str) -> Iterator[str]:
    """A seeded database of this test's own, which it may write to."""
    with seeded_database(pg_base_url) as url:
        yield url


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    """Settings for one test: shared servers, a key namespace of its own."""
    return make_settings(
        database_url=database_url,
        redis_url=redis_url,
        key_namespace=f"t{uuid.uuid4().hex[:10]}",
        metrics_port=0,
    )


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[object]:
    from core.db import create_engine

    eng = create_engine(Settings.from_env({}, database_url=database_url))
    yield eng
    await eng.dispose()


@pytest.fixture
async def db(fresh_database_url: str) -> AsyncIterator[object]:
    """An engine on a seeded database of this test's own, which it may write to."""
    from core.db import create_engine

    eng = create_engine(Settings.from_env({}, database_url=fresh_database_url))
    yield eng
    await eng.dispose()


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[object]:
    """A client on the shared Redis; deletes every key of this test's namespace afterwards."""
    from service.app import create_redis

    patient = settings.replace(redis_connect_timeout_s=5.0, redis_pool_timeout_s=30.0)
    client = create_redis(patient, socket_timeout=5.0)
    yield client
    await delete_namespace(client, settings.key_namespace)
    await client.aclose()


@pytest.fixture
async def service(settings: Settings, redis_client: object) -> AsyncIterator[object]:
    """The gRPC service in this process, on a free port, with this test's settings."""
    from service.app import start

    svc = await start(settings.replace(grpc_address="127.0.0.1:0"))
    yield svc
    await svc.stop(grace=0)


@pytest.fixture
async def stub(service: object) -> AsyncIterator[object]:
    from catalog.v1 import catalog_pb2_grpc

    async with writer_channel(f"127.0.0.1:{service.port}") as channel:  # type: ignore[attr-defined]
        yield catalog_pb2_grpc.CatalogServiceStub(channel)
