"""The command line as operators use it: publish an event, list and re-drive dead letters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from core.cache.store import CacheStore
from core.keys import Keys
from core.settings import Settings
from invalidator.deadletter import list_dead_letters
from invalidator.settings import InvalidatorSettings
from tests.helpers import eventually
from tests.invalidator.conftest import Consumers, entries, exists, fill

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(topo_settings: Settings) -> Settings:
    """This module's tests run on one Redis and on a Redis Cluster."""
    return topo_settings


def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "CATALOG_REDIS_URL": settings.redis_url,
        "CATALOG_REDIS_MODE": settings.redis_mode,
        "CATALOG_KEY_NAMESPACE": settings.key_namespace,
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "ops", *args],
        env=environ,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_publish_writes_a_valid_entry_and_refuses_an_invalid_one(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    done = cli(settings, "publish", "product.updated", "--product-id", "p1", "--version", "3")
    assert done.returncode == 0, done.stderr
    ((_, fields),) = await entries(redis, keys.stream)
    assert (fields[b"type"], fields[b"product_id"], fields[b"version"]) == (
        b"product.updated",
        b"p1",
        b"3",
    )
    refused = cli(settings, "publish", "product.created", "--product-id", "p1")
    assert refused.returncode == 2
    assert "requires field 'category_id'" in refused.stderr
    assert await redis.xlen(keys.stream) == 1


async def test_dlq_list_and_redrive(settings: Settings, redis: Redis, keys: Keys) -> None:
    await redis.xadd(keys.dead_letter_stream, {"type": "x", "dlq_reason": "unknown event type"})
    listed = cli(settings, "dlq", "list")
    assert "unknown event type" in listed.stdout
    assert cli(settings, "dlq", "redrive", "--all").returncode == 0
    assert await redis.xlen(keys.dead_letter_stream) == 0
    ((_, fields),) = await entries(redis, keys.stream)
    assert fields == {b"type": b"x"}


def test_bad_setting_exits_2_naming_the_variable(settings: Settings) -> None:
    done = cli(settings, "dlq", "list", CATALOG_INVALIDATOR_BATCH_SIZE="many")
    assert done.returncode == 2
    assert "CATALOG_INVALIDATOR_BATCH_SIZE must be int" in done.stderr
    assert InvalidatorSettings.from_env({}).read_timeout_s > 5.0


async def test_redrive_of_poison_and_empty_letters_crashes_nothing(
    settings: Settings,
    store: CacheStore,
    consumers: Consumers,
    redis: Redis,
    keys: Keys,
) -> None:
    await fill(store, keys.product("1"))
    consumer = consumers.start("c")
    base = {"schema": "1", "type": "product.updated", "event_id": "e", "product_id": "1"}
    poison = {**base, "occurred_at": "9" * 400, "dlq_reason": "field 'occurred_at' ..."}
    empty = {"dlq_reason": "trimmed from the stream before processing", "dlq_entry_id": "1-1"}
    fixed = {**base, "occurred_at": "1", "dlq_reason": "invalidation failed on delivery 5"}
    for letter in (poison, empty, fixed):
        await redis.xadd(keys.dead_letter_stream, letter)  # type: ignore[arg-type]

    done = cli(settings, "dlq", "redrive", "--all")
    assert done.returncode == 0, done.stderr
    assert "re-drove 2 entries" in done.stdout
    assert "left in place: it holds no original fields" in done.stdout

    async def settled() -> bool:
        return (
            await exists(redis, keys.product("1")) == [False] and consumer.stats.dead_lettered == 1
        )

    await eventually(settled, what="fixed event applied, poison dead-lettered again")
    letters = await list_dead_letters(redis, keys)
    assert [d.reason for d in letters] == [
        empty["dlq_reason"],
        "field 'occurred_at' must be a non-negative integer of at most 15 digits, got "
        f"{'9' * 40!r}...",
    ]
    (_, task, _) = consumers.running[0]
    assert not task.done()

    refused = cli(settings, "dlq", "redrive", "1-0", "DROP")
    assert refused.returncode == 2
    assert "not a stream entry id: 'DROP'" in refused.stderr
