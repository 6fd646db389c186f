"""The servers a benchmark run uses: a private Redis and a seeded PostgreSQL database.

The database (``catalog_bench`` on the local PostgreSQL unless ``BENCH_DATABASE_URL`` names
another) is migrated and seeded with 100k products once and reused by later runs; the suite
writes to it only through the Zipf scenario's updates (which bump versions). Redis is a private
``redis-server`` on a free port, stopped at the end, so nothing of anyone else's is flushed; the
scenarios that compare with a Redis Cluster start a private 3-primary one the first time they ask
(:meth:`BenchEnv.cluster_settings`). Each scenario uses a key namespace of its own, so every
scenario starts cold.
"""

from __future__ import annotations

import os
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from core.settings import Settings
from devtools.localservers import RedisProcess
from devtools.rediscluster import RedisCluster

PRODUCTS = 100_000
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/catalog_bench"
#: Secrets of this run only: the service refuses to start without a page-token key, and the
#: Zipf scenario writes through UpdateProduct with this token.
PAGE_TOKEN_SECRET = secrets.token_urlsafe(32)
WRITE_TOKEN = secrets.token_urlsafe(32)
#: Every Redis of the run, standalone or a cluster's node, evicts as production would.
REDIS_ARGS = ("--maxmemory-policy", "volatile-ttl")


def ensure_database(url: str) -> None:
    """Create the database if missing, migrate it, and seed it unless it has products."""
    from core.db import libpq_url
    from core.migrations import upgrade
    from ops.seed import seed_catalog

    name = make_url(url).database
    admin = libpq_url(make_url(url).set(database="postgres").render_as_string(False))
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    upgrade(url)
    seed_catalog(url, PRODUCTS, seed=42)


@dataclass
class BenchEnv:
    workdir: Path
    database_url: str = field(
        default_factory=lambda: os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    redis: RedisProcess | None = None
    cluster: RedisCluster | None = None

    def start(self) -> BenchEnv:
        ensure_database(self.database_url)
        self.redis = RedisProcess(self.workdir / "redis", None, *REDIS_ARGS).start()
        return self

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        if self.redis is not None:
            self.redis.stop()

    def settings(self, **changes: object) -> Settings:
        """Service settings on these servers, in a fresh key namespace."""
        assert self.redis is not None
        defaults: dict[str, object] = {
            "database_url": self.database_url,
            "redis_url": self.redis.url,
            "key_namespace": f"bench{uuid.uuid4().hex[:8]}",
            "log_level": "WARNING",
            "page_token_secret": PAGE_TOKEN_SECRET,
            "write_tokens": WRITE_TOKEN,
        }
        return Settings.from_env({}, **(defaults | changes))

    def cluster_settings(self, **changes: object) -> Settings:
        """:meth:`settings` on a private Redis Cluster of 3 primaries (no replicas), started on
        the first call and stopped with the rest."""
        if self.cluster is None:
            self.cluster = RedisCluster(
                self.workdir / "cluster", primaries=3, replicas=0, extra_args=REDIS_ARGS
            ).start()
        return self.settings(redis_url=self.cluster.url, redis_mode="cluster", **changes)
