"""Secrets that must be set, ``*_FILE`` secrets, blank values, every credential form redacted,
encrypted TLS keys and reflection as a setting."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc import aio

from core.settings import DEV_PAGE_TOKEN_SECRET, PREFIX, Settings, SettingsError, redact_url
from core.tls import server_credentials
from devtools.localservers import free_port
from service.app import start
from tests.certs import Authority
from tests.helpers import PAGE_TOKEN_SECRET, WRITE_TOKEN

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "hunter2-Zq7"


def cli(*args: str, env: dict[str, str], stdin: int | None = subprocess.DEVNULL) -> tuple[int, str]:
    """``catalog ARGS`` with only ``env`` as CATALOG_* settings: (status, output)."""
    done = subprocess.run(
        [sys.executable, "-m", "ops", *args],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT, stdin=stdin, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


# Item: the page-token secret must be set.


@pytest.mark.parametrize("value", [None, "", DEV_PAGE_TOKEN_SECRET])
def test_serve_exits_2_without_a_page_token_secret_of_its_own(value: str | None) -> None:
    env = {f"{PREFIX}GRPC_ADDRESS": f"127.0.0.1:{free_port()}", f"{PREFIX}METRICS_PORT": "0"}
    if value is not None:
        env[f"{PREFIX}PAGE_TOKEN_SECRET"] = value
    status, output = cli("serve", env=env)
    assert status == 2, output
    assert "configuration error: CATALOG_PAGE_TOKEN_SECRET" in output
    assert "Traceback" not in output


async def test_start_refuses_the_development_secret(settings: Settings) -> None:
    for value in ("", DEV_PAGE_TOKEN_SECRET):
        with pytest.raises(SettingsError, match="CATALOG_PAGE_TOKEN_SECRET"):
            await start(settings.replace(page_token_secret=value, grpc_address="127.0.0.1:0"))


def test_every_secret_can_come_from_a_file(tmp_path: Path) -> None:
    files = {
        "DATABASE_URL": f"postgresql+psycopg://catalog:{PASSWORD}@db/catalog",
        "REDIS_URL": f"redis://svc:{PASSWORD}@redis:6379/0",
        "PAGE_TOKEN_SECRET": PASSWORD * 3,
        "WRITE_TOKENS": f"{WRITE_TOKEN},{PASSWORD * 3}",
    }
    env = {}
    for name, value in files.items():
        path = tmp_path / name.lower()
        path.write_text(value + "\n")  # as `echo value > file` writes it
        env[f"{PREFIX}{name}_FILE"] = str(path)
    settings = Settings.from_env(env)
    assert settings.database_url == files["DATABASE_URL"]
    assert settings.redis_url == files["REDIS_URL"]
    assert settings.page_token_secret == files["PAGE_TOKEN_SECRET"]
    assert settings.write_token_list == (WRITE_TOKEN, PASSWORD * 3)
    assert PASSWORD not in repr(settings)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PAGE_TOKEN_SECRET": "x" * 20, "PAGE_TOKEN_SECRET_FILE": "{file}"}, "not both"),
        ({"PAGE_TOKEN_SECRET_FILE": "{missing}"}, "PAGE_TOKEN_SECRET_FILE: cannot read"),
        ({"WRITE_TOKENS_FILE": "  "}, "WRITE_TOKENS_FILE is blank"),
        ({"WRITE_TOKENS_FILE": "{empty}"}, "is empty"),
        ({"WRITE_TOKENS": "short"}, "WRITE_TOKENS: each token must be 16"),
        ({"WRITE_TOKENS": f"{WRITE_TOKEN},with a space inside it"}, "WRITE_TOKENS"),
        ({"WRITE_CLIENTS": "spiffe://x/writer"}, "needs mTLS"),
        ({"TLS_CERT_FILE": "   "}, "TLS_CERT_FILE is blank"),
        ({"TLS_CLIENT_CA_FILE": "\t"}, "TLS_CLIENT_CA_FILE is blank"),
        ({"PAGE_TOKEN_SECRET": " "}, "PAGE_TOKEN_SECRET is blank"),
    ],
)
def test_bad_secret_settings_are_errors_that_show_no_secret(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    (tmp_path / "file").write_text("from-a-file-" + PASSWORD)
    (tmp_path / "empty").write_text("\n")
    paths = {"file": tmp_path / "file", "missing": tmp_path / "nope", "empty": tmp_path / "empty"}
    environ = {PREFIX + k: v.format(**paths) for k, v in env.items()}
    with pytest.raises(SettingsError, match=message) as caught:
        Settings.from_env(environ)
    assert PASSWORD not in str(caught.value) and "short" not in str(caught.value)


# Item: redaction of every credential form libpq and redis-py accept.


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg://catalog:{PASSWORD}@db:5432/catalog",
        f"postgresql+psycopg://catalog@db:5432/catalog?password={PASSWORD}",
        f"postgresql+psycopg://catalog@db/catalog?sslmode=require&password={PASSWORD}&x=1",
        f"postgresql+psycopg://catalog@db/catalog?sslpassword={PASSWORD}",
        f"postgresql+psycopg://catalog@db/catalog?%70assword={PASSWORD}",
        f"postgresql+psycopg://catalog@db/catalog?PASSWORD={PASSWORD}",
        f"postgresql+psycopg://catalog:pa/ss{PASSWORD}@db/catalog",  # SQLAlchemy allows '/'
        f"postgresql+psycopg://catalog:pa?s#s{PASSWORD}@db/catalog",
        f"postgresql+psycopg://catalog:{PASSWORD}@@db/catalog",
        f"redis://:{PASSWORD}@redis:6379/0",
        f"redis://svc:{PASSWORD}@redis:6379/0",
        f"redis://redis:6379/0?password={PASSWORD}",
        f"rediss://svc@redis:6380/0?ssl_ca_certs=/ca.pem&password={PASSWORD}",
        f"unix://:{PASSWORD}@/run/redis.sock?db=0",
        f"unix:///run/redis.sock?db=0&password={PASSWORD}",
    ],
)
def test_redact_url_hides_every_credential_form(url: str) -> None:
    redacted = redact_url(url)
    assert PASSWORD not in redacted
    assert "***" in redacted
    settings_url = {"postgresql": "database_url", "redis": "redis_url", "rediss": "redis_url"}
    field = settings_url.get(url.split("://")[0].split("+")[0], "redis_url")
    assert PASSWORD not in repr(Settings.from_env({}, **{field: url}))


def test_redact_url_keeps_what_is_not_secret() -> None:
    url = "postgresql+psycopg://catalog@db:5432/catalog?sslmode=verify-full&sslrootcert=/ca.pem"
    assert redact_url(url) == url
    assert (
        redact_url(f"redis://svc:{PASSWORD}@redis:6379/0?db=1")
        == "redis://svc:***@redis:6379/0?db=1"
    )


def test_migrate_prints_no_password_given_in_the_query() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/catalog?password={PASSWORD}"
    status, output = cli("migrate", env={f"{PREFIX}DATABASE_URL": url})
    assert status == 1, output
    assert "PostgreSQL unreachable at" in output
    assert PASSWORD not in output


# Item: an encrypted TLS key is a configuration error.


@pytest.fixture(scope="module")
def encrypted_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(certificate, the same key encrypted with a pass-phrase)."""
    directory = tmp_path_factory.mktemp("enc")
    issued = Authority(directory, "ca").issue("server", server=True)
    key = serialization.load_pem_private_key(issued.key.read_bytes(), None)
    encrypted = directory / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass-phrase"),
        )
    )
    return issued.cert, encrypted


def test_an_encrypted_key_is_a_settings_error(encrypted_key: tuple[Path, Path]) -> None:
    cert, key = encrypted_key
    settings = Settings.from_env({}, tls_cert_file=str(cert), tls_key_file=str(key))
    with pytest.raises(SettingsError, match="TLS_KEY_FILE: the private key is encrypted"):
        server_credentials(settings)


def test_serve_with_an_encrypted_key_on_a_terminal_exits_2(
    encrypted_key: tuple[Path, Path],
) -> None:
    """With a terminal OpenSSL would prompt for the pass-phrase (and wait for ever)."""
    cert, key = encrypted_key
    controller, terminal = pty.openpty()
    try:
        status, output = cli(
            "serve",
            stdin=terminal,
            env={
                f"{PREFIX}PAGE_TOKEN_SECRET": PAGE_TOKEN_SECRET,
                f"{PREFIX}GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
                f"{PREFIX}METRICS_PORT": "0",
                f"{PREFIX}TLS_CERT_FILE": str(cert),
                f"{PREFIX}TLS_KEY_FILE": str(key),
            },
        )
    finally:
        os.close(controller)
        os.close(terminal)
    assert status == 2, output
    assert "configuration error: CATALOG_TLS_KEY_FILE: the private key is encrypted" in output
    assert "Traceback" not in output


# Item: reflection is a setting (on by default).


async def test_reflection_can_be_switched_off(settings: Settings) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert Settings.from_env({}).reflection is True
    svc = await start(settings.replace(grpc_address="127.0.0.1:0", reflection=False))
    try:
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            with pytest.raises(aio.AioRpcError) as err:
                _ = [r async for r in call]
    finally:
        await svc.stop(grace=0)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# `make run` sets development secrets itself.


def test_make_run_makes_a_page_key_and_a_write_token_it_prints() -> None:
    from devtools.devrun import _dev_secrets, _usage

    settings, token = _dev_secrets(Settings.from_env({}))
    settings.check_can_serve()
    assert settings.write_token_list == (token,)
    assert f"authorization: Bearer {token}" in _usage("127.0.0.1:50051", settings, token)


def test_make_run_honours_write_tokens_from_the_environment() -> None:
    from devtools.devrun import _dev_secrets, _usage

    given = Settings.from_env({f"{PREFIX}WRITE_TOKENS": WRITE_TOKEN})
    settings, token = _dev_secrets(given)
    assert (token, settings.write_tokens) == ("", WRITE_TOKEN)
    assert WRITE_TOKEN not in _usage("127.0.0.1:50051", settings, token)
