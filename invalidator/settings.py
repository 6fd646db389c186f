"""Settings of the invalidator process and the publishers, from ``CATALOG_*`` variables.

Connection settings (Redis and PostgreSQL URLs, key namespace, log level) are the service's
:class:`core.settings.Settings`; this object holds only what the invalidator adds. Same rules:
frozen, built once at the entry point, validated with errors naming the variable. Derived
invariants: the socket timeout of blocking reads is BLOCK plus a margin (never shorter), and the
in-progress heartbeat runs at a third of the reclaim min-idle, so a live consumer's batch is never
reclaimed however slow it is.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot

from core.keys import Keys, slot_mate
from core.settings import PREFIX, Settings, SettingsError, load, option
from core.settings import describe as describe_fields


@dataclass(frozen=True, slots=True)
class InvalidatorSettings:
    """Env var = ``CATALOG_`` + upper-case field name."""

    invalidator_stream: str = option("", "event stream; empty = <CATALOG_KEY_NAMESPACE>:events")
    invalidator_group: str = option("", "consumer group; empty = invalidator")
    invalidator_dead_letter_stream: str = option(
        "", "dead-letter stream; empty = <stream>:dead (cluster: <stream>:dead:{<stream>})"
    )
    invalidator_consumer: str = option(
        "", "consumer name; empty = host-pid-random (set a stable one to resume after restart)"
    )
    invalidator_batch_size: int = option(200, "entries read per XREADGROUP", lo=1, hi=10_000)
    invalidator_block_ms: int = option(5000, "XREADGROUP BLOCK while idle", lo=1, hi=600_000)
    invalidator_socket_timeout_s: float = option(
        2.0, "timeout of non-blocking Redis commands", lo=0.01
    )
    invalidator_read_timeout_margin_s: float = option(
        5.0, "blocking reads time out at BLOCK + this (never inside an idle block)", lo=0.1
    )
    invalidator_claim_min_idle_ms: int = option(
        30_000, "idle time after which another consumer's entry is reclaimed", lo=10
    )
    invalidator_claim_interval_ms: int = option(5000, "pause between reclaim passes", lo=1)
    invalidator_claim_count: int = option(100, "entries per XAUTOCLAIM call", lo=1, hi=10_000)
    invalidator_max_deliveries: int = option(
        5,
        "an entry whose invalidation fails on this delivery (or a later one) is dead-lettered",
        lo=1,
        hi=1000,
    )
    invalidator_dead_letter_maxlen: int = option(
        10_000, "the dead-letter stream is trimmed to ~this many entries", lo=10, hi=10_000_000
    )
    invalidator_retry_backoff_ms: int = option(500, "pause after a failed Redis call", lo=1)
    invalidator_stats_interval_s: float = option(
        5.0, "how often group lag/pending are sampled", lo=0.1
    )
    invalidator_consume: bool = option(True, "run the consumer loop (false: relay only)")
    invalidator_resolve_scopes: bool = option(
        True,
        "look up in PostgreSQL the products of a price_rule.changed naming only a category or "
        "brand; false (no database access): dead-letter such events",
    )
    invalidator_resolve_batch: int = option(
        1000, "product ids per INVALIDATE call when a scope is looked up", lo=1, hi=10_000
    )
    invalidator_metrics_port: int = option(9465, "Prometheus port; 0 disables", lo=0, hi=65535)
    invalidator_health_address: str = option(
        "127.0.0.1:50052", "host:port of grpc.health.v1; empty disables"
    )
    event_stream_maxlen: int = option(1_000_000, "publishers trim the stream to ~this", lo=1000)
    outbox_relay: bool = option(True, "run the outbox relay in the invalidator process")
    outbox_batch_size: int = option(500, "outbox rows published per transaction", lo=1, hi=10_000)
    outbox_poll_ms: int = option(
        1000,
        "relay's fallback poll; NOTIFY wakes it at once, this catches notifications missed "
        "while it reconnected",
        lo=1,
        hi=3_600_000,
    )
    outbox_relay_applies: bool = option(
        True,
        "the relay applies each event's invalidation itself before publishing it (the consumer "
        "then only acks it): one hop less between commit and key gone",
    )
    outbox_retention_s: float = option(86400.0, "sent outbox rows are deleted after this", lo=1)
    views_flush: bool = option(True, "run the view-counter flusher in the invalidator process")
    views_flush_interval_s: float = option(
        60.0, "seconds between view-counter flushes (the loss window if Redis dies)", lo=0.001
    )

    def __post_init__(self) -> None:
        if not (self.invalidator_consume or self.outbox_relay):
            raise SettingsError(
                f"{PREFIX}INVALIDATOR_CONSUME and {PREFIX}OUTBOX_RELAY are both false"
            )
        for name in ("invalidator_stream", "invalidator_group", "invalidator_consumer"):
            if any(c.isspace() for c in getattr(self, name)):
                raise SettingsError(f"{PREFIX}{name.upper()} must not contain spaces")

    @property
    def resolves_scopes(self) -> bool:
        """The consumer looks up the products of a category or brand in PostgreSQL."""
        return self.invalidator_consume and self.invalidator_resolve_scopes

    @property
    def heartbeat_s(self) -> float:
        """Interval at which in-progress entries are re-claimed by their own consumer."""
        return self.invalidator_claim_min_idle_ms / 3000

    @property
    def read_timeout_s(self) -> float:
        """Socket timeout of the blocking-read connection: always longer than BLOCK."""
        return self.invalidator_block_ms / 1000 + self.invalidator_read_timeout_margin_s

    def keys(self, base: Settings) -> Keys:
        """The stream, group and dead-letter names. On a cluster the dead letters share the
        stream's hash slot (an entry is dead-lettered and acked in one MULTI): by default they
        are ``<stream>:dead:{<stream>}`` there, and a configured name must hash alike."""
        keys = Keys(
            base.key_namespace,
            stream=self.invalidator_stream,
            group=self.invalidator_group,
            dead_letter_stream=self.invalidator_dead_letter_stream,
        )
        if base.redis_mode != "cluster":
            return keys
        try:
            dead = self.invalidator_dead_letter_stream or slot_mate(keys.stream, ":dead")
        except ValueError as exc:
            raise SettingsError(f"{PREFIX}INVALIDATOR_STREAM: {exc}") from None
        if key_slot(dead.encode()) != key_slot(keys.stream.encode()):
            raise SettingsError(
                f"{PREFIX}INVALIDATOR_DEAD_LETTER_STREAM {dead!r} must share the hash slot of "
                f"the stream {keys.stream!r} on a cluster "
                f"(e.g. {slot_mate(keys.stream, ':dead')!r})"
            )
        return Keys(
            base.key_namespace,
            stream=self.invalidator_stream,
            group=self.invalidator_group,
            dead_letter_stream=dead,
        )

    def consumer_name(self) -> str:
        """The configured name, else ``host-pid-random`` (unique even across restarts)."""
        if self.invalidator_consumer:
            return self.invalidator_consumer
        return f"{socket.gethostname()}-{os.getpid()}-{random.randrange(16**6):06x}"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> InvalidatorSettings:
        return load(cls, environ, overrides)

    def replace(self, **changes: Any) -> InvalidatorSettings:
        return dataclasses.replace(self, **changes)


def describe() -> list[tuple[str, str, str]]:
    """(env var, default, meaning) of every invalidator setting, for the README."""
    return describe_fields(InvalidatorSettings)
