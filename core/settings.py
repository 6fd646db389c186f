"""Typed, validated configuration built once from ``CATALOG_*`` environment variables.

The entry point calls :func:`Settings.from_env` and passes the frozen object down; nothing else
reads the environment. Every field has a default that works against PostgreSQL on
127.0.0.1:5432 and Redis on 127.0.0.1:6379, except the secrets: ``serve`` needs a page-token
key (:meth:`Settings.check_can_serve`) and writes need tokens or client identities. Every
secret can instead be read from a file named by ``<VARIABLE>_FILE`` (mounted secrets). Invalid
values raise :class:`SettingsError` naming the variable, the value (never a secret's) and what
was expected, so a bad deploy fails at start-up, not on first use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, get_type_hints
from urllib.parse import unquote_plus, urlsplit

PREFIX = "CATALOG_"
FILE_SUFFIX = "_FILE"
T = TypeVar("T")
#: The page-token key of earlier releases' defaults: known to everyone, so never accepted.
DEV_PAGE_TOKEN_SECRET = "dev-only-page-token-secret"
MIN_WRITE_TOKEN_LENGTH = 16
MAX_SECRET_FILE_BYTES = 64 * 1024
REDIS_MODES = ("standalone", "cluster")
# A query parameter whose (decoded, lower-cased) name contains one of these carries a secret:
# libpq's password and sslpassword, redis-py's password, and anything named like a credential.
_SECRET_PARAMS = ("pass", "secret", "token", "credential", "auth")


class SettingsError(ValueError):
    """A configuration value is missing or invalid."""


def redact_url(url: str) -> str:
    """The URL with every credential replaced by ``***`` (safe for logs and reprs).

    Covers the forms libpq (through SQLAlchemy) and redis-py accept: a password in the
    authority (``user:PASSWORD@``, ``:PASSWORD@``, also when it holds ``/``, ``?`` or ``#``,
    which SQLAlchemy's parser allows) and query parameters such as ``?password=``,
    ``&sslpassword=`` or a percent-encoded ``%70assword=``. It errs on the side of hiding:
    everything between ``://`` and the last ``@`` but the user name is hidden.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, tail = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:***@{tail}" if colon else f"{user}@{tail}"
    base, question, query = rest.partition("?")
    if question:
        params = []
        for param in query.split("&"):
            name, equals, _ = param.partition("=")
            if equals and any(s in unquote_plus(name).lower() for s in _SECRET_PARAMS):
                param = f"{name}=***"
            params.append(param)
        rest = f"{base}?{'&'.join(params)}"
    return f"{scheme}://{rest}"


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
    redis_mode: str = option(
        "standalone",
        "standalone (one Redis, or a primary with replicas) or cluster (REDIS_URL names any "
        "node of a Redis Cluster; the others are discovered)",
    )
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
        "", "HMAC key signing page tokens; same on every replica; `serve` refuses to start without"
    )
    write_tokens: str = secret(
        "", "comma-separated bearer tokens allowed to write (UpdateProduct); empty = none"
    )
    write_clients: str = option(
        "", "comma-separated client certificate identities (SAN URI or DNS) allowed to write (mTLS)"
    )
    record_views_open: bool = option(
        False, "true lets every caller call RecordProductViews; false requires a writer"
    )
    reflection: bool = option(True, "gRPC server reflection (what `grpcurl list` uses)")

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
    tag_ttl_margin_s: float = option(
        60.0, "how much longer a page set or registry lives than its members", lo=1
    )
    name_ttl_ms: int = option(
        2000,
        "longest a process serves a category or brand name it has not re-read (renames are "
        "also broadcast)",
        lo=10,
        hi=3_600_000,
    )

    near_cache_enabled: bool = option(
        False,
        "serve hot products from process memory (the near cache), kept in step with Redis "
        "through client-side-caching invalidations",
    )
    near_cache_max_entries: int = option(
        100_000, "most products the near cache holds per process", lo=1, hi=100_000_000
    )
    near_cache_max_bytes: int = option(
        64 * 1024 * 1024, "most bytes the near cache accounts for per process", lo=4096
    )
    near_cache_max_staleness_ms: int = option(
        50,
        "a near-cache hit is never older than a change Redis made this long before the read: "
        "past it without a heartbeat back, the near cache stops serving",
        lo=1, hi=60_000,
    )  # fmt: skip
    near_cache_heartbeat_ms: int = option(
        20,
        "near-cache heartbeat interval (per Redis node): a healthy watermark is about this old "
        "at most; below the staleness bound, which it eats into",
        lo=1, hi=60_000,
    )  # fmt: skip

    lease_ttl_ms: int = option(3000, "lease (fill lock) lifetime", lo=10, hi=120_000)
    lease_wait_ms: int = option(1000, "longest a reader waits for another's fill", lo=0, hi=60_000)
    lease_poll_ms: int = option(5, "poll interval while waiting for a fill", lo=1, hi=1000)

    redis_socket_timeout_s: float = option(0.25, "Redis command timeout on the read path", lo=0.001)
    redis_connect_timeout_s: float = option(0.5, "Redis connect timeout", lo=0.001)
    redis_max_connections: int = option(64, "Redis connection pool size", lo=1, hi=10_000)
    redis_pool_timeout_s: float = option(1.0, "wait for a free pooled Redis connection", lo=0.001)
    redis_wait_replicas: int = option(
        0,
        "replicas that must have an invalidation (or a relayed event) before it is acked (WAIT); "
        "0: no wait",
        lo=0, hi=16,
    )  # fmt: skip
    redis_wait_timeout_ms: int = option(
        1000, "longest WAIT for those replicas; short of them, nothing is acked", lo=1, hi=60_000
    )
    breaker_failures: int = option(5, "consecutive Redis failures that open the breaker", lo=1)
    breaker_reset_s: float = option(1.0, "how long an open breaker skips Redis", lo=0.01)

    db_pool_size: int = option(10, "PostgreSQL connections kept open", lo=1, hi=1000)
    db_max_overflow: int = option(10, "extra PostgreSQL connections under load", lo=0, hi=1000)
    db_pool_timeout_s: float = option(5.0, "wait for a free PostgreSQL connection", lo=0.01)
    db_connect_timeout_s: float = option(3.0, "PostgreSQL connect timeout", lo=0.1)
    db_statement_timeout_ms: int = option(5000, "server-side cap on one SQL statement", lo=0)
    health_check_interval_s: float = option(2.0, "how often health probes PostgreSQL", lo=0.05)

    max_concurrent_rpcs: int = option(1000, "RPCs in flight before RESOURCE_EXHAUSTED", lo=1)
    max_message_bytes: int = option(4 * 1024 * 1024, "max gRPC response size", lo=1024)
    max_request_bytes: int = option(
        128 * 1024, "max gRPC request size (the largest valid request is about 67 KB)",
        lo=96 * 1024, hi=64 * 1024 * 1024,
    )  # fmt: skip
    views_max_pending: int = option(
        50_000, "distinct product ids with views awaiting a flush; beyond: RESOURCE_EXHAUSTED",
        lo=1000, hi=10_000_000,
    )  # fmt: skip
    shutdown_grace_s: float = option(10.0, "time in-flight RPCs get after SIGTERM", lo=0)
    shutdown_drain_s: float = option(0.0, "NOT_SERVING period before refusing RPCs", lo=0)
    # Connection lifetime (service/keepalive.py): clients rebalance across replicas.
    grpc_max_connection_age_ms: int = option(
        300_000, "close connections this old (+-10%, GOAWAY): clients rebalance; 0: never",
        lo=0, hi=2**31 - 1,
    )  # fmt: skip
    grpc_max_connection_age_grace_ms: int = option(
        30_000, "RPCs still running on an aged connection get this long before it closes",
        lo=0, hi=2**31 - 1,
    )  # fmt: skip
    grpc_keepalive_time_ms: int = option(
        60_000, "ping a client after this long without activity", lo=1000, hi=2**31 - 1
    )
    grpc_keepalive_timeout_ms: int = option(
        20_000, "close a connection whose ping is not answered within this", lo=100, hi=2**31 - 1
    )
    grpc_keepalive_permit_without_calls: bool = option(
        True, "ping idle connections too, and accept clients' pings on them"
    )
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
        if self.redis_mode not in REDIS_MODES:
            raise SettingsError(
                f"{PREFIX}REDIS_MODE must be standalone or cluster, got {self.redis_mode!r}"
            )
        if self.redis_mode == "cluster":
            url = urlsplit(self.redis_url)
            if url.scheme == "unix" or url.path.strip("/") not in ("", "0"):
                raise SettingsError(
                    f"{PREFIX}REDIS_MODE=cluster needs a redis:// or rediss:// URL of database 0 "
                    f"(Redis Cluster has no other), got {redact_url(self.redis_url)!r}"
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
        if self.near_cache_heartbeat_ms >= self.near_cache_max_staleness_ms:
            raise SettingsError(
                f"{PREFIX}NEAR_CACHE_HEARTBEAT_MS ({self.near_cache_heartbeat_ms}) must be below "
                f"{PREFIX}NEAR_CACHE_MAX_STALENESS_MS ({self.near_cache_max_staleness_ms})"
            )
        if self.workers > 1 and port == "0":
            raise SettingsError(
                f"{PREFIX}WORKERS > 1 needs a fixed port in {PREFIX}GRPC_ADDRESS, not port 0"
            )
        for token in self.write_token_list:
            if (
                not MIN_WRITE_TOKEN_LENGTH <= len(token) <= 512
                or not token.isprintable()
                or " " in token
            ):
                raise SettingsError(
                    f"{PREFIX}WRITE_TOKENS: each token must be {MIN_WRITE_TOKEN_LENGTH} to 512 "
                    "printable characters without spaces or commas (the value is not shown)"
                )
        if self.write_clients.strip() and not self.tls_client_ca_file:
            raise SettingsError(
                f"{PREFIX}WRITE_CLIENTS names client certificates: it needs mTLS "
                f"({PREFIX}TLS_CLIENT_CA_FILE)"
            )
        for client in self.write_client_list:
            if len(client) > 1024 or not client.isprintable():
                raise SettingsError(
                    f"{PREFIX}WRITE_CLIENTS: identities are printable and at most 1024 "
                    f"characters, got {client[:80]!r}"
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
            if f.metadata.get("secret") and value:
                value = redact_url(value) if "://" in value else "***"
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def write_token_list(self) -> tuple[str, ...]:
        """The bearer tokens of ``write_tokens`` (blank items dropped)."""
        return _items(self.write_tokens)

    @property
    def write_client_list(self) -> tuple[str, ...]:
        """The client identities of ``write_clients`` (blank items dropped)."""
        return _items(self.write_clients)

    def check_can_serve(self) -> None:
        """What ``catalog serve`` needs beyond the rest: a page-token key nobody else knows.

        Not a ``__post_init__`` rule: migrations, the invalidator and tools never sign tokens.
        """
        if not self.page_token_secret or self.page_token_secret == DEV_PAGE_TOKEN_SECRET:
            raise SettingsError(
                f"{PREFIX}PAGE_TOKEN_SECRET (or {PREFIX}PAGE_TOKEN_SECRET_FILE) must be set to a "
                "secret of your own, the same on every replica: it is "
                + ("unset" if not self.page_token_secret else "the published development value")
            )

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


def _items(text: str) -> tuple[str, ...]:
    return tuple(item for item in (part.strip() for part in text.split(",")) if item)


def _parse(name: str, raw: str, kind: type, f: dataclasses.Field[Any]) -> Any:
    text = raw.strip()
    value: Any
    if raw and not text:
        # A blank TLS path must not quietly mean plaintext, nor a blank secret "none".
        raise SettingsError(f"{name} is blank (only whitespace): unset it or give a value")
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
        if f.metadata.get("secret") and name + FILE_SUFFIX in env:
            if name in env:
                raise SettingsError(f"set {name} or {name}{FILE_SUFFIX}, not both")
            values[f.name] = _parse(name, _read_secret_file(name, env[name + FILE_SUFFIX]), str, f)
        elif name in env:
            values[f.name] = _parse(name, env[name], hints[f.name], f)
    values.update(overrides)
    return cls(**values)


def _read_secret_file(name: str, path: str) -> str:
    """A ``*_FILE`` secret (a mounted Docker or Kubernetes secret): its text, one trailing
    newline removed. Errors name the variable and the path, never the contents."""
    variable = name + FILE_SUFFIX
    if not path.strip():
        raise SettingsError(f"{variable} is blank: unset it or name a file")
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise SettingsError(f"{variable}: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise SettingsError(f"{variable}: {path} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise SettingsError(f"{variable}: {path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text.strip():
        raise SettingsError(f"{variable}: {path} is empty")
    return text


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
            default = "(secret)" if default else "(unset)"
        rows.append((PREFIX + f.name.upper(), default, f.metadata["doc"]))
    return rows
