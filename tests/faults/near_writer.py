"""The writer of the near-cache fault tests (tests/faults/test_near_cache_faults.py), run as a
process of its own so its CPU is not the service's: ``python -m tests.faults.near_writer OUT
RATE WORKERS MODE PART PARTS`` with the test's ``CATALOG_*`` settings in the environment (PART
of PARTS such processes: each starts at its own place in the draws).

It changes Zipf-drawn products (the readers' hot set) at ``RATE`` per second in all, from
``WORKERS`` clients, until SIGTERM, then writes one JSON line per acknowledged change to ``OUT``
(product, version, acknowledgement on ``time.monotonic()``, a clock the whole machine shares)
and a last line counting the changes it could not acknowledge. MODE ``redis``: a change is what
UpdateProduct does (a plain SQL UPDATE, then the write-through into Redis, then ``WAIT`` when
``CATALOG_REDIS_WAIT_REPLICAS`` asks for replicas), acknowledged once Redis has it; ``commit``:
the plain SQL UPDATE only, acknowledged at its commit (it reaches Redis through the
invalidator); ``entry``: the product's cached entry rewritten in Redis with the next version
(compare-and-set), no database write: the cheapest change the near cache must follow, so the
rate can reach 1,000/s on a small machine (reads that fall through to PostgreSQL would see the
older version: the test that uses it has no fault)."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
import time
from pathlib import Path

from catalog.v1 import catalog_pb2 as pb
from core.cache import entry
from core.cache.loader import REDIS_FAILURES
from core.cache.reader import Reader
from core.db import create_engine
from core.keys import Keys
from core.redisclient import ReplicaWait
from core.repository import Repository
from core.settings import Settings
from devtools.history import History
from devtools.workload import update_plain, zipf_draws
from service.app import create_redis, create_store
from tests.faults.conftest import PRODUCT_IDS

ZIPF_S = 1.1
# SET the key to ARGV[2] (its TTL kept) only if it still holds ARGV[1].
_CAS = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL') return 1 end return 0"
)
SEED = 7


class Writer:
    """One change at a time per caller, on connections of its own (module docstring)."""

    def __init__(self, settings: Settings, mode: str) -> None:
        self.engine = create_engine(settings)
        self.redis = create_redis(settings.replace(redis_pool_timeout_s=5.0))
        self.keys = Keys(settings.key_namespace)
        loader = Reader(
            create_store(self.redis, settings), Repository(self.engine), self.keys, settings
        ).loader
        assert loader is not None
        self.loader = loader
        self.replicas = ReplicaWait.from_settings(settings, self.keys)
        self.mode = mode
        self.unacknowledged = 0

    async def write(self, product_id: str, history: History) -> None:
        if self.mode == "entry":
            await self.rewrite_entry(product_id, history)
            return
        version = await update_plain(self.engine, product_id)
        if self.mode == "redis":
            try:
                await self.loader.write_through(product_id)
                acked = await self.replicas(self.redis, [self.keys.product(product_id)])
            except REDIS_FAILURES:
                acked = False
            if not acked:
                self.unacknowledged += 1
                return
        history.write(product_id, version, time.monotonic())

    async def rewrite_entry(self, product_id: str, history: History) -> None:
        """The cached entry again with the next version (header and ``Product``), set only if
        the entry is still the one read (another writer may change the same product)."""
        key = self.keys.product(product_id)
        while True:
            old = await self.redis.get(key)
            if not isinstance(old, bytes) or not old:
                self.unacknowledged += 1  # not cached: nothing to change (the load fills it)
                return
            head = entry.header(old)
            category, brand, start = entry.product_parts(old)
            product = pb.Product.FromString(old[start:])
            product.version = head.version + 1
            new = entry.pack_product(
                product.SerializeToString(), category.decode(), brand.decode(),
                head.version + 1, head.fresh_until_ms, head.load_ms,
            )  # fmt: skip
            if await self.redis.eval(_CAS, 1, key, old, new):
                history.write(product_id, head.version + 1, time.monotonic())
                return

    async def close(self) -> None:
        await self.redis.aclose()
        await self.engine.dispose()


async def paced(
    writer: Writer, history: History, draws: list[str], period: float, stop: asyncio.Event
) -> None:
    """Write ``draws`` in turn, one every ``period`` seconds at most, until ``stop``."""
    next_at = time.monotonic()
    for product_id in itertools.cycle(draws):
        if stop.is_set():
            return
        await writer.write(product_id, history)
        next_at = max(next_at + period, time.monotonic() - period)  # no burst to catch up
        if (pause := next_at - time.monotonic()) > 0:
            await asyncio.sleep(pause)


async def main(out: Path, rate: float, workers: int, mode: str, part: int, parts: int) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    writer = Writer(Settings.from_env(), mode)
    history = History()
    draws = zipf_draws(PRODUCT_IDS, 20_000, s=ZIPF_S, seed=SEED)
    step = len(draws) // (workers * parts)
    try:
        await asyncio.gather(
            *(
                paced(writer, history, draws[k * step :] + draws[: k * step], workers / rate, stop)
                for k in range(part * workers, (part + 1) * workers)
            )
        )
    finally:
        await writer.close()
        lines = [json.dumps([w.key, w.version, w.committed]) for w in history.writes]
        lines.append(json.dumps({"unacknowledged": writer.unacknowledged}))
        await asyncio.to_thread(out.write_text, "\n".join(lines) + "\n")


if __name__ == "__main__":
    out, rate, workers, mode, part, parts = sys.argv[1:7]
    asyncio.run(main(Path(out), float(rate), int(workers), mode, int(part), int(parts)))
