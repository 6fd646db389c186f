"""Typed, validated configuration built once from ``CATALOG_*`` environment variables.

The entry point calls :func:`Settings.from_env` and passes the frozen object down; nothing else
reads the environment. Every field has a default that works against PostgreSQL on
127.0.0.1:5432 and Redis on 127.0.0.1:6379. Invalid values raise :class:`SettingsError` naming the
variable, the value and what was expected, so a bad deploy fails at start-up, not on first use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar, get_type_hints
from urllib.parse import urlsplit, urlunsplit

PREFIX = "CATALOG_"
T = TypeVar("T")
DEV_PAGE_TOKEN_SECRET = "dev-only-page-token-secret"


class SettingsError(ValueError):
    """A configuration value is missing or invalid."""


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe for logs and reprs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def secret(default: str, doc: str) -> Any:
    return field(default=default, repr=False, metadata={"doc": doc, "secret": True})


def option(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "lo": lo, "hi": hi})


@dataclass(frozen=True, slots=True)
class Settings:
    """All knobs of the service and the invalidator. Env var = ``CATALOG_`` + upper-case name."""

    database_url: str = secret(
        "postgresql+psycopg://postgres@127.0.0.1:5432/catalog", "SQLAlchemy URL of PostgreSQL"
    )
    redis_url: str = secret("redis://127.0.0.1:6379/0", "Redis URL (redis:// or rediss://)")
    grpc_address: str = option("127.0.0.1:50051", "host:port the gRPC server listens on")
    tls_cert_file: str = option("", "PEM certificate (chain) of the gRPC ports; empty = plaintext")
    tls_key_file: str = option("", "PEM private key of TLS_CERT_FILE")
    tls_client_ca_file: str = option("", "PEM CA; when set, client certificates are required")
    metrics_port: int = option(
        9464, "Prometheus metrics HTTP port (worker i: this + i); 0 disables", lo=0, hi=65535
    )
    metrics_address: str = option("127.0.0.1", "address the metrics HTTP server binds")
    key_namespace: str = option("catalog", "prefix of every Redis key (several catalogs per Redis)")
    cache_enabled: bool = option(True, "false serves every read from PostgreSQL (baseline, debug)")
    page_token_secret: str = secret(
        DEV_PAGE_TOKEN_SECRET, "HMAC key signing page tokens; same on every replica"
    )

    product_ttl_s: float = option(300.0, "TTL of a cached product", lo=1, hi=7 * 86400)
    page_ttl_s: float = option(300.0, "TTL of a cached list page (ids only)", lo=1, hi=7 * 86400)
    product_stale_s: float = option(
        60.0, "a product past its TTL is served this long while one refresh runs; 0 disables"
    )
    page_stale_s: float = option(
        60.0, "a list page past its TTL is served this long while one refresh runs; 0 disables"
    )
    product_xfetch_beta: float = option(
        1.0, "probabilistic early refresh of products (XFetch beta); 0 disables", lo=0, hi=100
    )
    page_xfetch_beta: float = option(
        1.0, "probabilistic early refresh of list pages (XFetch beta); 0 disables", lo=0, hi=100
    )
    negative_ttl_s: float = option(30.0, "TTL of a 'no such product' entry", lo=0.1, hi=3600)
    ttl_jitter: float = option(0.1, "relative TTL jitter (0.1 = +-10%)", lo=0, hi=0.5)
    tag_ttl_margin_s: float = option(60.0, "how much longer a tag set lives than its members", lo=1)

    lease_ttl_ms: int = option(3000, "lease (fill lock) lifetime", lo=10, hi=120_000)
    lease_wait_ms: int = option(1000, "longest a reader waits for another's fill", lo=0, hi=60_000)
    lease_poll_ms: int = option(5, "poll interval while waiting for a fill", lo=1, hi=1000)

    redis_socket_timeout_s: float = option(0.25, "Redis command timeout on the read path", lo=0.001)
    redis_connect_timeout_s: float = option(0.5, "Redis connect timeout", lo=0.001)
    redis_max_connections: int = option(64, "Redis connection pool size", lo=1, hi=10_000)
    redis_pool_timeout_s: float = option(1.0, "wait for a free pooled Redis connection", lo=0.001)
    breaker_failures: int = option(5, "consecutive Redis failures that open the breaker", lo=1)
    breaker_reset_s: float = option(1.0, "how long an open breaker skips Redis", lo=0.01)

    db_pool_size: int = option(10, "PostgreSQL connections kept open", lo=1, hi=1000)
    db_max_overflow: int = option(10, "extra PostgreSQL connections under load", lo=0, hi=1000)
    db_pool_timeout_s: float = option(5.0, "wait for a free PostgreSQL connection", lo=0.01)
    db_connect_timeout_s: float = option(3.0, "PostgreSQL connect timeout", lo=0.1)
    db_statement_timeout_ms: int = option(5000, "server-side cap on one SQL statement", lo=0)
    health_check_interval_s: float = option(2.0, "how often health probes PostgreSQL", lo=0.05)

    max_concurrent_rpcs: int = option(1000, "RPCs in flight before RESOURCE_EXHAUSTED", lo=1)
    max_message_bytes: int = option(4 * 1024 * 1024, "max gRPC message size", lo=1024)
    shutdown_grace_s: float = option(10.0, "time in-flight RPCs get after SIGTERM", lo=0)
    shutdown_drain_s: float = option(0.0, "NOT_SERVING period before refusing RPCs", lo=0)
    workers: int = option(
        1, "server processes sharing the gRPC port (SO_REUSEPORT); each its own metrics port",
        lo=1, hi=64,
    )  # fmt: skip
    log_level: str = option("INFO", "logging level (DEBUG adds the access log)")
    log_format: str = option("text", "log lines: text, or json (one object per line)")

    def __post_init__(self) -> None:
        if urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            raise SettingsError(
                f"{PREFIX}REDIS_URL must start with redis://, rediss:// or unix://, "
                f"got {redact_url(self.redis_url)!r}"
            )
        if not self.database_url.startswith("postgresql"):
            raise SettingsError(
                f"{PREFIX}DATABASE_URL must be a postgresql+psycopg:// URL, "
                f"got {redact_url(self.database_url)!r}"
            )
        host, sep, port = self.grpc_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SettingsError(
                f"{PREFIX}GRPC_ADDRESS must be host:port, got {self.grpc_address!r}"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file) or (
            self.tls_client_ca_file and not self.tls_cert_file
        ):
            raise SettingsError(
                f"{PREFIX}TLS_CERT_FILE and {PREFIX}TLS_KEY_FILE go together, and "
                f"{PREFIX}TLS_CLIENT_CA_FILE needs them"
            )
        if not self.key_namespace or any(c in self.key_namespace for c in "{}: "):
            raise SettingsError(
                f"{PREFIX}KEY_NAMESPACE must be non-empty without braces, colons or spaces"
            )
        if self.lease_wait_ms > self.lease_ttl_ms:
            raise SettingsError(
                f"{PREFIX}LEASE_WAIT_MS ({self.lease_wait_ms}) must not exceed "
                f"{PREFIX}LEASE_TTL_MS ({self.lease_ttl_ms})"
            )
        if self.workers > 1 and port == "0":
            raise SettingsError(
                f"{PREFIX}WORKERS > 1 needs a fixed port in {PREFIX}GRPC_ADDRESS, not port 0"
            )
        if self.metrics_port and self.metrics_port + self.workers - 1 > 65535:
            raise SettingsError(
                f"{PREFIX}METRICS_PORT + {PREFIX}WORKERS - 1 must be <= 65535 "
                "(worker i serves metrics on METRICS_PORT + i)"
            )
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"{PREFIX}LOG_FORMAT must be text or json, got {self.log_format!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(
                f"{PREFIX}LOG_LEVEL must be DEBUG..CRITICAL, got {self.log_level!r}"
            )

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                value = redact_url(value) if "://" in value else "***"
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def database_url_safe(self) -> str:
        return redact_url(self.database_url)

    @property
    def redis_url_safe(self) -> str:
        return redact_url(self.redis_url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``CATALOG_*`` variables (default ``os.environ``), then overrides."""
        return load(cls, environ, overrides)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _parse(name: str, raw: str, kind: type, f: dataclasses.Field[Any]) -> Any:
    text = raw.strip()
    value: Any
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be true or false, got {raw!r}")
    if kind is str:
        return text
    try:
        value = kind(text)
    except ValueError:
        raise SettingsError(f"{name} must be {kind.__name__}, got {raw!r}") from None
    lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
    if lo is not None and value < lo:
        raise SettingsError(f"{name} must be >= {lo}, got {raw!r}")
    if hi is not None and value > hi:
        raise SettingsError(f"{name} must be <= {hi}, got {raw!r}")
    return value


def load(cls: type[T], environ: Mapping[str, str] | None, overrides: Mapping[str, Any]) -> T:
    """Instantiate a settings dataclass from ``CATALOG_<FIELD>`` variables, then ``overrides``."""
    env = os.environ if environ is None else environ
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        name = PREFIX + f.name.upper()
        if name in env:
            values[f.name] = _parse(name, env[name], hints[f.name], f)
    values.update(overrides)
    return cls(**values)


def otel_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The standard OpenTelemetry variables (``OTEL_*``), for :func:`core.tracing.configure`.
    They keep their standard names; like every other variable they are read only here."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith("OTEL_")}


def describe(cls: type[Any] = Settings) -> list[tuple[str, str, str]]:
    """(env var, default, meaning) for every field: the README's configuration tables."""
    rows = []
    for f in fields(cls):
        default = str(f.default)
        if f.metadata.get("secret") and "://" not in default:
            default = "(secret)"
        rows.append((PREFIX + f.name.upper(), default, f.metadata["doc"]))
    return rows
