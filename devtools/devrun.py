"""``make run``: the whole catalog on one machine, for development.

Uses the configured PostgreSQL and Redis when they let us in; when one does not answer or refuses
us (a fresh Debian's PostgreSQL asks for a password), says so in one line and starts a private one
under ``.run/`` (the PostgreSQL cluster, and so its seeded data, is reused by the next run). Then it
migrates, seeds, starts every process of ``CHILDREN`` and warms the cache. Development secrets:
a page-token key made for this run, and a write token made for it too unless
``CATALOG_WRITE_TOKENS`` (or its ``_FILE``) is set; the banner shows how to present it. It runs
until SIGINT/SIGTERM (exit 0) or until a child exits (exit with that child's code, never 0).
Either way, every child and every server it started is stopped before it returns; servers it
found running are left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import psycopg
import redis
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from core.redisclient import connect_sync
from core.settings import (
    DEV_PAGE_TOKEN_SECRET,
    FILE_SUFFIX,
    PREFIX,
    Settings,
    SettingsError,
    redact_url,
)
from devtools.localservers import RedisProcess, answers, usable_postgres
from ops.call import local_target

# The processes of a development stack, started in this order and stopped in reverse.
CHILDREN: list[tuple[str, list[str]]] = [
    ("service", [sys.executable, "-m", "service"]),
    ("invalidator", [sys.executable, "-m", "invalidator"]),
]

WARM = [sys.executable, "-m", "ops", "warm", "--top", "1000"]
RUN_DIR = Path(__file__).resolve().parent.parent / ".run"
READY_TIMEOUT_S = 60.0
log = logging.getLogger("devrun")


class _Stop(BaseException):
    """Raised by the SIGINT/SIGTERM handler: unwinds whatever start-up step is running."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.devrun", description=__doc__)
    parser.add_argument("--products", type=int, default=10_000, help="products to seed")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="where private servers live")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="devrun: %(message)s")
    for name in (log.name, "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        log.error("%s", e)
        return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    cleanup = contextlib.ExitStack()
    try:
        return _run(settings, args.run_dir, args.products, cleanup)
    except _Stop as received:
        log.info("%s received: stopping", received)
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: log.info("already stopping"))
        cleanup.close()


def _run(settings: Settings, run_dir: Path, products: int, cleanup: contextlib.ExitStack) -> int:
    """Start everything (registering its stop in ``cleanup`` first); return the exit code."""
    host, port = _grpc_target(settings.grpc_address)
    if answers(host, port):
        log.error("something already listens on %s:%d (set CATALOG_GRPC_ADDRESS)", host, port)
        return 1
    settings = _ensure_postgres(settings, run_dir, cleanup)
    settings = _ensure_redis(settings, run_dir, cleanup)

    from core.migrations import upgrade
    from ops.seed import seed_catalog

    log.info("migrating %s", settings.database_url_safe)
    upgrade(settings.database_url)
    seeded = seed_catalog(settings.database_url, products=products, seed=42)
    if seeded:
        log.info("seeded %d products", seeded)
    else:
        log.info("catalog already seeded")

    settings, generated_token = _dev_secrets(settings)
    # The values below replace any *_FILE variant (a child refuses both).
    passed = ("DATABASE_URL", "REDIS_URL", "PAGE_TOKEN_SECRET", "WRITE_TOKENS")
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in {PREFIX + n + FILE_SUFFIX for n in passed}
        },
        "CATALOG_DATABASE_URL": settings.database_url,
        "CATALOG_REDIS_URL": settings.redis_url,
        "CATALOG_PAGE_TOKEN_SECRET": settings.page_token_secret,
        "CATALOG_WRITE_TOKENS": settings.write_tokens,
        "PYTHONUNBUFFERED": "1",
    }
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    cleanup.callback(
        _stop_children, children, settings.shutdown_drain_s + settings.shutdown_grace_s
    )
    for name, cmd in CHILDREN:
        # A process group of its own: a terminal's Ctrl-C reaches only us, and we stop it in order.
        children.append((name, subprocess.Popen(cmd, env=env, process_group=0)))
        log.info("started %s (pid %d)", name, children[-1][1].pid)

    deadline = time.monotonic() + READY_TIMEOUT_S
    while not answers(host, port):
        if (code := _exit_code_of_dead(children)) is not None:
            return code
        if time.monotonic() > deadline:
            log.error("the gRPC server did not listen on %s:%d in %ss", host, port, READY_TIMEOUT_S)
            return 1
        time.sleep(0.1)
    # Warm the cache through the service's own fill path before anyone calls it.
    subprocess.run(WARM, env=env, check=False)
    print(_usage(f"{host}:{port}", settings, generated_token), flush=True)
    while (code := _exit_code_of_dead(children)) is None:
        time.sleep(0.2)
    return code


def _dev_secrets(settings: Settings) -> tuple[Settings, str]:
    """Settings with development secrets where none are set; the write token made, or ""."""
    if not settings.page_token_secret or settings.page_token_secret == DEV_PAGE_TOKEN_SECRET:
        settings = settings.replace(page_token_secret=secrets.token_urlsafe(32))
    if settings.write_token_list:
        return settings, ""
    token = "dev-" + secrets.token_urlsafe(24)
    return settings.replace(write_tokens=token), token


def _ensure_postgres(settings: Settings, run_dir: Path, cleanup: contextlib.ExitStack) -> Settings:
    """Settings whose database exists on a PostgreSQL that lets us in (a private one if need be:
    when nothing answers, or the server refuses us, as a fresh Debian's asks for a password)."""
    url = cleanup.enter_context(
        usable_postgres(settings.database_url, run_dir / "postgres", say=log.info)
    )
    _create_database_if_missing(make_url(url))
    return settings.replace(database_url=url)


def _create_database_if_missing(url: URL) -> None:
    conninfo = psycopg.conninfo.make_conninfo(
        host=url.host, port=url.port, user=url.username, password=url.password, dbname="postgres"
    )
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=2) as conn:
        if not url.database:
            return
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [url.database])
        if found.fetchone() is None:
            log.info("creating database %s", url.database)
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database)))


def _ensure_redis(settings: Settings, run_dir: Path, cleanup: contextlib.ExitStack) -> Settings:
    """Settings pointing at a Redis that answers PING (a private one if need be)."""
    cluster = settings.redis_mode == "cluster"
    kind = "Redis Cluster" if cluster else "Redis"
    client = None
    try:
        client = connect_sync(settings, socket_timeout=1, connect_timeout=1)
        client.ping()
        return settings
    except (redis.AuthenticationError, redis.ResponseError) as e:  # NOAUTH, WRONGPASS
        why = f"{kind} at {settings.redis_url_safe} refused us ({e})"
    except (redis.ConnectionError, redis.TimeoutError):
        why = f"no {kind} answers at {settings.redis_url_safe}"
    except redis.RedisClusterException as e:  # a plain Redis there, or no node answers
        why = f"no {kind} answers at {settings.redis_url_safe} ({e})"
    finally:
        if client is not None:
            client.close()
    if cluster:
        return _private_cluster(settings, run_dir, cleanup, why)
    log.info("%s: starting a private one in %s", why, run_dir / "redis")
    # The eviction policy the service is designed for (see docker-compose.yml).
    server = RedisProcess(
        run_dir / "redis", None, "--maxmemory", "512mb", "--maxmemory-policy", "volatile-ttl"
    )
    cleanup.callback(server.stop)
    server.start()
    return settings.replace(redis_url=server.url)


def _private_cluster(
    settings: Settings, run_dir: Path, cleanup: contextlib.ExitStack, why: str
) -> Settings:
    """A 3-primary cluster of our own (made anew each run: its nodes get new ports)."""
    from devtools.rediscluster import RedisCluster

    workdir = run_dir / "redis-cluster"
    log.info("%s: starting a private 3-primary cluster in %s", why, workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    # Each node: the eviction policy the service is designed for, and its own memory cap.
    cluster = RedisCluster(
        workdir,
        primaries=3,
        extra_args=("--maxmemory", "256mb", "--maxmemory-policy", "volatile-ttl"),
    )
    cleanup.callback(cluster.stop)
    cluster.start()
    return settings.replace(redis_url=cluster.url)


def _stop_children(children: list[tuple[str, subprocess.Popen[bytes]]], grace_s: float) -> None:
    """SIGTERM every child, newest first; SIGKILL what is still running after ``grace_s`` + 5s."""
    for _, proc in reversed(children):
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace_s + 5
    for name, proc in reversed(children):
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time: killing it", name)
            proc.kill()
            proc.wait()


def _exit_code_of_dead(children: list[tuple[str, subprocess.Popen[bytes]]]) -> int | None:
    """None while every child runs; else a non-zero code for the first that exited."""
    for name, proc in children:
        if (code := proc.poll()) is not None:
            log.error("%s exited with code %d: stopping everything", name, code)
            if code < 0:  # killed by signal -code: report it the way a shell does
                return 128 - code
            return code or 1
    return None


def _grpc_target(address: str) -> tuple[str, int]:
    """Where a local client reaches a server bound to ``address`` (wildcards mean loopback)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return ("127.0.0.1" if host in ("", "0.0.0.0", "::") else host), int(port)


def _shell_path(path: Path) -> str:
    """``path`` as short as a shell in the current directory can use it."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _usage(target: str, settings: Settings, generated_token: str) -> str:
    metrics = (
        f"http://127.0.0.1:{settings.metrics_port}/metrics" if settings.metrics_port else "off"
    )
    if generated_token:
        token, token_origin = (
            generated_token,
            "made for this run; set CATALOG_WRITE_TOKENS to choose",
        )
    else:
        token, token_origin = "$TOKEN", "one of CATALOG_WRITE_TOKENS"
    cluster = " (a node of the Redis Cluster)" if settings.redis_mode == "cluster" else ""
    call = _shell_path(Path(sys.executable).with_name("catalog")) + " call"
    if target != local_target(Settings().grpc_address):
        call += f" --target {target}"
    return f"""
catalog is serving on {target}
  PostgreSQL: {settings.database_url_safe}
  Redis:      {redact_url(settings.redis_url)}{cluster}
  metrics:    {metrics}

Call it from the shell (JSON in and out; add --help for TLS and metadata options):
  {call}
  {call} GetProduct '{{"id": "p0000001"}}'
  {call} ListProducts '{{"page_size": 5}}'
  {call} grpc.health.v1.Health/Check

or with grpcurl, if installed:
  grpcurl -plaintext -d '{{"id":"p0000001"}}' {target} catalog.v1.CatalogService/GetProduct

Writes need a bearer token ({token_origin}):
  {call} -H "authorization: Bearer {token}" UpdateProduct \\
    '{{"product": {{"id": "p0000001", "name": "Renamed"}}, "update_mask": "name"}}'

or from Python (.venv/bin/python):
  import grpc
  from catalog.v1 import catalog_pb2, catalog_pb2_grpc
  with grpc.insecure_channel("{target}") as channel:
      stub = catalog_pb2_grpc.CatalogServiceStub(channel)
      print(stub.GetProduct(catalog_pb2.GetProductRequest(id="p0000001")))

Ctrl-C stops everything.
"""


if __name__ == "__main__":
    sys.exit(main())
