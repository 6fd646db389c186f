"""Secrets stay out of logs, errors and reprs; sslmode reaches libpq; no SQL is built from strings.

Passwords are unique strings per run, so "absent" means absent: the service and the invalidator
run (in this process and as subprocesses) against a Redis that requires a password they do not
have and a PostgreSQL URL whose password cannot be used (nothing listens on its port), and
every log record, stderr line, status detail and repr they produce is searched for them.
"""

from __future__ import annotations

import ast
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio
from sqlalchemy.engine import make_url

from catalog.v1 import catalog_pb2 as pb
from catalog.v1 import catalog_pb2_grpc
from core.settings import PREFIX, Settings
from devtools.localservers import RedisProcess, free_port, wait_for_port
from service.app import start
from tests.helpers import make_settings

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Secrets:
    pg_password: str
    redis_password: str
    database_url: str
    redis_url: str

    def leaked_in(self, text: str) -> list[str]:
        return [s for s in (self.pg_password, self.redis_password) if s in text]


@pytest.fixture
def secrets(tmp_path: Path) -> Iterator[Secrets]:
    """A Redis requiring a password we do not give it, and a PostgreSQL nobody answers."""
    required = f"required-{uuid.uuid4().hex}"
    redis_password = f"redispw-{uuid.uuid4().hex}"  # wrong: Redis requires `required`
    pg_password = f"pgpw-{uuid.uuid4().hex}"
    with RedisProcess(tmp_path / "redis", None, "--requirepass", required) as server:
        yield Secrets(
            pg_password,
            redis_password,
            f"postgresql+psycopg://catalog:{pg_password}@127.0.0.1:{free_port()}/catalog",
            f"redis://default:{redis_password}@127.0.0.1:{server.port}/0",
        )


def env_of(secrets: Secrets, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        f"{PREFIX}DATABASE_URL": secrets.database_url,
        f"{PREFIX}REDIS_URL": secrets.redis_url,
        f"{PREFIX}DB_CONNECT_TIMEOUT_S": "1",
        f"{PREFIX}LOG_LEVEL": "DEBUG",
        **extra,
    }


def test_settings_reprs_hide_passwords_and_the_token_secret(secrets: Secrets) -> None:
    settings = Settings.from_env(
        {},
        database_url=secrets.database_url,
        redis_url=secrets.redis_url,
        page_token_secret=secrets.pg_password,
    )
    for text in (
        repr(settings),
        str(settings),
        settings.database_url_safe,
        settings.redis_url_safe,
    ):
        assert not secrets.leaked_in(text), text
    assert "***" in repr(settings)


async def test_the_service_logs_and_answers_without_passwords(
    secrets: Secrets, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(
        database_url=secrets.database_url,
        redis_url=secrets.redis_url,
        grpc_address="127.0.0.1:0",
        metrics_port=0,
        db_connect_timeout_s=1,
        breaker_failures=1,
    )
    service = await start(settings)
    details = []
    try:
        async with aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            for request in (pb.GetProductRequest(id="p0000001"), pb.GetProductRequest(id="p2")):
                with pytest.raises(aio.AioRpcError) as err:
                    await stub.GetProduct(request, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                details.append(f"{err.value.details()} {err.value.debug_error_string()}")
    finally:
        await service.stop(grace=0)
    logged = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {r.exc_info and r.exc_info[1]!r}"
        for r in caplog.records
    )
    assert "PostgreSQL" in logged, "the failures were logged"
    assert not secrets.leaked_in(logged), logged
    assert not secrets.leaked_in("\n".join(details))


def test_the_service_and_the_invalidator_processes_keep_passwords_out_of_stderr(
    secrets: Secrets, tmp_path: Path
) -> None:
    port = free_port()
    runs = {
        "serve": (
            [sys.executable, "-m", "service"],
            env_of(secrets, **{f"{PREFIX}GRPC_ADDRESS": f"127.0.0.1:{port}",
                               f"{PREFIX}METRICS_PORT": "0",
                               f"{PREFIX}PAGE_TOKEN_SECRET": secrets.pg_password}),
        ),
        "invalidator": (
            [sys.executable, "-m", "invalidator"],
            env_of(secrets, **{f"{PREFIX}INVALIDATOR_METRICS_PORT": "0",
                               f"{PREFIX}INVALIDATOR_HEALTH_ADDRESS": "",
                               f"{PREFIX}INVALIDATOR_RETRY_BACKOFF_MS": "50"}),
        ),
    }  # fmt: skip
    procs = {}
    for name, (cmd, env) in runs.items():
        procs[name] = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=(tmp_path / f"{name}.log").open("wb"),
        )  # fmt: skip
    try:
        wait_for_port(port, timeout=30)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetProduct(pb.GetProductRequest(id="p0000001"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        deadline = time.monotonic() + 30
        while True:
            exited = procs["invalidator"].poll() is not None  # before the read: no lost lines
            log = (tmp_path / "invalidator.log").read_text()
            if "WRONGPASS" in log.upper() or "invalid username" in log:
                break
            assert not exited, f"the invalidator exited without an auth error: {log}"
            assert time.monotonic() < deadline, f"the invalidator logged no auth error: {log}"
            time.sleep(0.1)  # polling a log file for a bounded time, not timing an event
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for name in runs:
        text = (tmp_path / f"{name}.log").read_text()
        assert text, f"{name} logged nothing"
        assert not secrets.leaked_in(text), f"{name} leaked a password:\n{text}"


def test_cli_errors_name_the_url_without_its_password(secrets: Secrets) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ops", "migrate"],
        env=env_of(secrets), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "PostgreSQL unreachable at postgresql+psycopg://catalog:***@" in done.stderr
    assert not secrets.leaked_in(done.stdout + done.stderr)


def with_query(url: str, **query: str) -> str:
    return make_url(url).update_query_dict(query).render_as_string(hide_password=False)


async def test_sslmode_in_the_database_url_reaches_libpq(settings: Settings) -> None:
    """The local server has no TLS: ``require`` must fail to connect, ``disable`` must work."""
    for sslmode, expected in (
        ("disable", grpc.StatusCode.OK),
        ("require", grpc.StatusCode.UNAVAILABLE),
    ):
        service = await start(
            settings.replace(
                database_url=with_query(settings.database_url, sslmode=sslmode),
                grpc_address="127.0.0.1:0",
                cache_enabled=False,
            )
        )
        try:
            async with aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                stub = catalog_pb2_grpc.CatalogServiceStub(channel)
                try:
                    await stub.GetProduct(pb.GetProductRequest(id="p0000001"), timeout=10)
                    code = grpc.StatusCode.OK
                except aio.AioRpcError as exc:
                    code = exc.code()
            assert code == expected, sslmode
        finally:
            await service.stop(grace=0)


def test_sslmode_require_makes_the_cli_fail_with_a_clear_message(database_url: str) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        f"{PREFIX}DATABASE_URL": with_query(database_url, sslmode="require"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "ops", "migrate"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "PostgreSQL unreachable at" in done.stderr and "SSL" in done.stderr, done.stderr


# Calls whose first argument is SQL, and what building it from strings looks like.
_SQL_CALLS = {"execute", "executemany", "exec_driver_sql", "text", "scalar", "scalars"}


def _is_psycopg_sql(node: ast.expr) -> bool:
    """``sql.SQL(...)``: psycopg's composition quotes what ``.format`` inserts (Identifier)."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) == "SQL"


def string_built_sql(source: str) -> list[int]:
    """Lines where an f-string, ``%``, ``+`` or ``.format`` expression is passed as SQL."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        name = (
            node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        )
        first = node.args[0]
        built = (
            isinstance(first, ast.JoinedStr)
            or (isinstance(first, ast.BinOp) and isinstance(first.op, ast.Mod | ast.Add))
            or (
                isinstance(first, ast.Call)
                and isinstance(first.func, ast.Attribute)
                and first.func.attr == "format"
                and not _is_psycopg_sql(first.func.value)
            )
        )
        if name in _SQL_CALLS and built:
            lines.append(node.lineno)
    return sorted(lines)


def test_the_sql_check_finds_what_it_must() -> None:
    bad = """
conn.execute(f"DROP TABLE {name}")
conn.execute(text("SET search_path TO %s" % schema))
conn.exec_driver_sql("TRUNCATE " + table)
conn.execute("SELECT {}".format(x))
sa.text(f"SELECT * FROM t WHERE id = '{x}'")
conn.execute(stmt, {"id": x})
conn.execute(text("SELECT 1 WHERE id = :id"), {"id": x})
conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
"""
    assert string_built_sql(bad) == [2, 3, 4, 5, 6]


def test_no_sql_is_built_from_strings() -> None:
    found = []
    for package in ("core", "service", "invalidator", "ops", "devtools"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found += [f"{path.relative_to(ROOT)}:{n}" for n in string_built_sql(path.read_text())]
    assert not found, f"SQL built from strings (use bound parameters): {found}"
