"""The dead-letter stream: entries the invalidator gave up on, and how operators re-drive them.

A dead letter is the original entry's fields, unchanged, plus ``dlq_*`` fields saying why
(:data:`REASON`), which entry it was, who gave up and when. Re-driving strips the ``dlq_*`` fields,
appends the original fields to the event stream and deletes the dead letter in one MULTI, so a
re-driven entry is either back in the event stream or still a dead letter, never neither.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis

from core.events import RawFields
from core.keys import Keys

PREFIX = "dlq_"
REASON = PREFIX + "reason"
ENTRY_ID = PREFIX + "entry_id"
CONSUMER = PREFIX + "consumer"
AT = PREFIX + "at"


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def dead_letter_fields(
    fields: RawFields | None, *, reason: str, entry_id: bytes | str, consumer: str
) -> dict[str, str]:
    """The original fields (lossy only for non-UTF-8 bytes) plus why it was dead-lettered."""
    out = {_text(k): _text(v) for k, v in (fields or {}).items()}
    out.update(
        {
            REASON: reason,
            ENTRY_ID: _text(entry_id),
            CONSUMER: consumer,
            AT: str(int(time.time() * 1000)),
        }
    )
    return out


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    reason: str
    fields: dict[str, str]

    @property
    def original(self) -> dict[str, str]:
        """The fields the publisher wrote."""
        return {k: v for k, v in self.fields.items() if not k.startswith(PREFIX)}


async def list_dead_letters(
    redis: Redis, keys: Keys, *, count: int = 100, start: str = "-"
) -> list[DeadLetter]:
    """Oldest first, from ``start`` (inclusive)."""
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]],
        await redis.xrange(keys.dead_letter_stream, min=start, max="+", count=count),
    )
    out = []
    for entry_id, raw in entries:
        fields = {_text(k): _text(v) for k, v in raw.items()}
        out.append(DeadLetter(_text(entry_id), fields.get(REASON, ""), fields))
    return out


async def redrive(redis: Redis, keys: Keys, ids: Sequence[str], *, maxlen: int) -> int:
    """Append each dead letter's original fields to the event stream and delete it; returns how
    many were re-driven (ids no longer in the dead-letter stream are skipped)."""
    done = 0
    for entry_id in ids:
        found = cast(
            list[Any], await redis.xrange(keys.dead_letter_stream, min=entry_id, max=entry_id)
        )
        if not found:
            continue
        letter = DeadLetter(entry_id, "", {_text(k): _text(v) for k, v in found[0][1].items()})
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.stream, letter.original, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
            pipe.xdel(keys.dead_letter_stream, entry_id)
            await pipe.execute()
        done += 1
    return done
