"""The command line as operators use it: publish an event, list and re-drive dead letters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis

from core.keys import Keys
from core.settings import Settings
from invalidator.settings import InvalidatorSettings
from tests.invalidator.conftest import entries

ROOT = Path(__file__).resolve().parents[2]


def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "CATALOG_REDIS_URL": settings.redis_url,
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
