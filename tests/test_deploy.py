"""The compose stack's pieces, run for real where they can be without Docker: the PostgreSQL
roles script (migrations as the owner, the service as a role with row access only), the Redis
ACL template (the users of docs/security.md, loadable by redis-server) and the secrets script."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from catalog.v1 import catalog_pb2 as pb
from core.settings import Settings
from devtools.localservers import RedisProcess, postgres_bindir
from service.app import start
from tests.helpers import writer_channel

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOC = (ROOT / "docs" / "security.md").read_text()


@pytest.fixture
def roles(pg_base_url: str) -> Iterator[tuple[str, str]]:
    """roles.sql run with unique role and database names; (owner URL, app URL). Dropped after."""
    suffix = uuid.uuid4().hex[:8]
    owner, app, database = (
        f"catalog_owner_{suffix}",
        f"catalog_app_{suffix}",
        f"catalog_test_{suffix}",
    )
    base = make_url(pg_base_url)
    conninfo = psycopg.conninfo.make_conninfo(
        host=base.host or "127.0.0.1", port=base.port or 5432, user=base.username or "postgres",
        password=base.password or None, dbname="postgres",
    )  # fmt: skip
    subprocess.run(
        [
            str(postgres_bindir() / "psql"), "--no-psqlrc", "--quiet", "--dbname", conninfo,
            "--set", f"owner={owner}", "--set", f"app={app}", "--set", f"database={database}",
            "--set", "owner_password=owner-pw", "--set", "app_password=app-pw",
            "--file", str(DEPLOY / "postgres" / "roles.sql"),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip

    def url(user: str) -> str:
        return base.set(
            drivername="postgresql+psycopg", username=user, password=None, database=database
        ).render_as_string(hide_password=False)

    try:
        yield url(owner), url(app)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{app}"')
            conn.execute(f'DROP ROLE IF EXISTS "{owner}"')


async def test_the_owner_migrates_and_the_app_role_reads_and_writes_rows_only(
    roles: tuple[str, str], settings: Settings, redis_client: object
) -> None:
    from core.migrations import upgrade
    from ops.seed import seed_catalog

    owner_url, app_url = roles
    upgrade(owner_url)
    seed_catalog(owner_url, products=20, seed=42)
    svc = await start(settings.replace(database_url=app_url, grpc_address="127.0.0.1:0"))
    try:
        async with writer_channel(f"127.0.0.1:{svc.port}") as channel:
            from google.protobuf import field_mask_pb2

            from catalog.v1 import catalog_pb2_grpc

            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            assert (await stub.GetProduct(pb.GetProductRequest(id="p0000001"))).id == "p0000001"
            updated = await stub.UpdateProduct(  # a row update and an outbox insert
                pb.UpdateProductRequest(
                    product=pb.Product(id="p0000001", stock=3),
                    update_mask=field_mask_pb2.FieldMask(paths=["stock"]),
                )
            )
            assert updated.stock == 3
    finally:
        await svc.stop(grace=0)
    app = make_url(app_url)
    with psycopg.connect(
        host=app.host, port=app.port, user=app.username, dbname=app.database, autocommit=True
    ) as conn:
        for statement in (
            "CREATE TABLE intruder (id int)",
            "DROP TABLE products",
            "TRUNCATE outbox",
            "ALTER TABLE products ADD COLUMN x int",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        assert conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone() == (False,)


def _template_rules() -> dict[str, str]:
    lines = (DEPLOY / "redis" / "users.acl.template").read_text().splitlines()
    return {
        line.split()[1]: " ".join(line.split()[2:]) for line in lines if line.startswith("user ")
    }


def test_the_redis_acl_template_has_the_documented_users_and_no_default_user() -> None:
    documented = {
        line.split()[2]: " ".join(line.split()[3:])
        for line in DOC.splitlines()
        if line.startswith("ACL SETUSER ") and " on " in line  # not the cluster additions
    }
    rules = _template_rules()
    assert rules.pop("default") == "off"
    assert rules == documented


def test_redis_loads_the_acl_file_the_compose_stack_makes(tmp_path: Path) -> None:
    """The container's own steps: comments dropped, passwords put in, then --aclfile."""
    template = (DEPLOY / "redis" / "users.acl.template").read_text()
    acl = "\n".join(line for line in template.splitlines() if not line.startswith("#"))
    acl = acl.replace(">SERVICE_PASSWORD ", ">svc-pw ").replace(
        ">INVALIDATOR_PASSWORD ", ">inv-pw "
    )
    (tmp_path / "users.acl").write_text(acl + "\n")
    import redis

    with RedisProcess(tmp_path / "redis", None, "--aclfile", str(tmp_path / "users.acl")) as server:
        anonymous = redis.Redis(host="127.0.0.1", port=server.port)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        service = redis.Redis(
            host="127.0.0.1", port=server.port, username="catalog-service", password="svc-pw"
        )
        assert service.ping() is True
        with pytest.raises(redis.exceptions.NoPermissionError):
            service.flushall()
        service.close()
        anonymous.close()


COMPOSE = (ROOT / "docker-compose.yml").read_text()


def test_compose_file_holds_no_secret_and_publishes_on_loopback() -> None:
    """Secrets come only from files (CATALOG_*_FILE); ports bind loopback unless overridden."""
    for variable in ("DATABASE_URL", "REDIS_URL", "PAGE_TOKEN_SECRET", "WRITE_TOKENS"):
        assert re.search(rf"CATALOG_{variable}:", COMPOSE) is None, variable
        assert f"CATALOG_{variable}_FILE: /run/secrets/" in COMPOSE
    assert re.search(r"POSTGRES_PASSWORD:", COMPOSE) is None
    assert "@postgres" not in COMPOSE and "@redis" not in COMPOSE  # no URL with credentials
    ports = re.findall(r'^\s+- "(.*:\d+:\d+)"$', COMPOSE, re.MULTILINE)
    assert ports and all(p.startswith("${CATALOG_PUBLISH_ADDRESS:-127.0.0.1}:") for p in ports)


def test_make_secrets_makes_every_compose_secret_once(tmp_path: Path) -> None:
    declared = set(re.findall(r"^  (\w+):\n    file: ", COMPOSE, re.MULTILINE))
    script = DEPLOY / "make-secrets.sh"
    subprocess.run(["sh", str(script), str(tmp_path / "s")], check=True, capture_output=True)
    made = {p.name: p.read_text() for p in (tmp_path / "s").iterdir()}
    assert declared and set(made) == declared
    again = subprocess.run(
        ["sh", str(script), str(tmp_path / "s")], check=True, capture_output=True, text=True
    )
    assert again.stdout == "", "existing secrets are kept"
    assert {p.name: p.read_text() for p in (tmp_path / "s").iterdir()} == made
    password = made["db_app_password"].strip()
    assert f"catalog_app:{password}@postgres" in made["database_app_url"]
    env = {"CATALOG_WRITE_TOKENS_FILE": str(tmp_path / "s" / "write_tokens")}
    assert Settings.from_env(env).write_token_list == (made["write_tokens"].strip(),)


def _check_lock(name: str, requirements: list[str]) -> None:
    """Every requirement pinned in ``name`` at a version it admits, every pin with hashes."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = (ROOT / name).read_text()
    pinned = {
        canonicalize_name(pkg): version
        for pkg, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", lock, re.MULTILINE)
    }
    for block in re.split(r"\n(?=[A-Za-z])", lock):
        if "==" in block.split("\n")[0]:
            assert "--hash=sha256:" in block, block.split("\n")[0]
    for text in requirements:
        requirement = Requirement(text)
        version = pinned.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not in {name}"
        assert requirement.specifier.contains(version), f"{requirement.name}=={version}"


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    """requirements.lock (``make lock``) matches pyproject.toml, and the image installs only it."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    _check_lock("requirements.lock", project["dependencies"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes --no-deps -r requirements.lock" in dockerfile
    assert re.search(r"^ARG PYTHON_IMAGE=python:[^@\s]+@sha256:[0-9a-f]{64}$", dockerfile, re.M)
    assert all(
        line.split()[1].startswith("${PYTHON_IMAGE}") or "--from" in line
        for line in dockerfile.splitlines()
        if line.startswith("FROM ")
    )


def test_make_install_uses_the_dev_lock_with_hashes() -> None:
    """requirements-dev.lock pins the runtime and development dependencies; ``make install``
    installs exactly it (hashes required), then the project itself without dependencies."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    _check_lock(
        "requirements-dev.lock",
        project["dependencies"] + project["optional-dependencies"]["dev"],
    )
    makefile = re.sub(r"\\\n\s*", "", (ROOT / "Makefile").read_text())  # continuation lines
    assert "--require-hashes --no-deps -r requirements-dev.lock" in makefile
    assert "--no-deps --no-build-isolation -e ." in makefile
