"""The dead-letter stream: entries the invalidator gave up on, and how operators re-drive them.

A dead letter is the original entry's fields plus ``dlq_*`` fields saying why (:data:`REASON`),
which entry it was, who gave up and when. The copy is bounded whatever the entry was: values are
cut to :data:`MAX_VALUE_CHARS`, names to :data:`MAX_NAME_CHARS`, and fields past
:data:`~core.events.MAX_ENTRY_BYTES` of copy are dropped; :data:`TRUNCATED` then says what
was cut. An entry within the contract's limits is copied unchanged (lossy only for non-UTF-8
bytes). The stream itself is trimmed with ``MAXLEN ~`` on every XADD.

Re-driving strips the ``dlq_*`` fields, appends the original fields to the event stream and
deletes the dead letter in one MULTI, so a re-driven entry is either back in the event stream or
still a dead letter, never neither. A letter with no original fields is left in place.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from core.events import MAX_ENTRY_BYTES, RawFields
from core.keys import Keys
from core.redisclient import RedisClient, transaction

PREFIX = "dlq_"
REASON = PREFIX + "reason"
ENTRY_ID = PREFIX + "entry_id"
CONSUMER = PREFIX + "consumer"
AT = PREFIX + "at"
TRUNCATED = PREFIX + "truncated"
MAX_NAME_CHARS = 128
MAX_VALUE_CHARS = 1024
MAX_REASON_CHARS = 500
_ELLIPSIS = "..."
_ENTRY_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else str(value)


def _cut(value: Any, limit: int) -> tuple[str, bool]:
    """``value`` as text of at most ``limit`` characters, and whether it was cut. Bytes are
    sliced before decoding, so a 1 MB value is never decoded whole."""
    text = _text(value[: limit * 4] if isinstance(value, bytes) else value)
    if len(text) <= limit and not (isinstance(value, bytes) and len(value) > limit * 4):
        return text, False
    return text[: limit - len(_ELLIPSIS)] + _ELLIPSIS, True


def dead_letter_fields(
    fields: RawFields | None, *, reason: str, entry_id: bytes | str, consumer: str
) -> dict[str, str]:
    """The original fields, bounded (see the module docstring), plus why it was dead-lettered."""
    out: dict[str, str] = {}
    budget, cut, dropped = MAX_ENTRY_BYTES, 0, 0
    for raw_name, raw_value in (fields or {}).items():
        name, name_cut = _cut(raw_name, MAX_NAME_CHARS)
        value, value_cut = _cut(raw_value, MAX_VALUE_CHARS)
        size = len(name.encode()) + len(value.encode())
        if size > budget or name.startswith(PREFIX) or name in out:
            dropped += 1  # "dlq_" names are ours; a cut name may collide with another
            continue
        budget -= size
        cut += name_cut or value_cut
        out[name] = value
    if cut or dropped:
        out[TRUNCATED] = f"{cut} fields cut, {dropped} dropped"
    out.update(
        {
            REASON: _cut(reason, MAX_REASON_CHARS)[0],
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
    redis: RedisClient, keys: Keys, *, count: int = 100, start: str = "-"
) -> list[DeadLetter]:
    """Oldest first, from ``start`` (inclusive)."""
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]],
        await redis.xrange(keys.dead_letter_stream, min=start, max="+", count=count),
    )
    out = []
    for entry_id, raw in entries:
        fields = _decoded(raw)
        out.append(DeadLetter(_text(entry_id), fields.get(REASON, ""), fields))
    return out


def is_entry_id(text: str) -> bool:
    """A stream entry id as XRANGE takes it (``ms-seq`` or ``ms``)."""
    return _ENTRY_ID.fullmatch(text) is not None


@dataclass(slots=True)
class Redriven:
    """Outcome of a re-drive: ``empty`` letters (no original fields) are left in place."""

    redriven: int = 0
    missing: int = 0
    empty: list[str] = field(default_factory=list)


async def redrive(redis: RedisClient, keys: Keys, ids: Sequence[str], *, maxlen: int) -> Redriven:
    """Append each dead letter's original fields to the event stream and delete it. Ids no
    longer in the dead-letter stream are counted as missing. Whether the event is still poison
    is the consumer's business: it dead-letters it again, with its reason."""
    out = Redriven()
    for entry_id in ids:
        found = cast(
            list[Any], await redis.xrange(keys.dead_letter_stream, min=entry_id, max=entry_id)
        )
        if not found:
            out.missing += 1
            continue
        await _redrive_one(
            redis, keys, DeadLetter(entry_id, "", _decoded(found[0][1])), maxlen, out
        )
    return out


async def redrive_all(redis: RedisClient, keys: Keys, *, maxlen: int, page: int = 100) -> Redriven:
    """Re-drive every dead letter that exists now, ``page`` at a time (bounded memory). Letters
    added meanwhile (a still-poison event dead-lettered again) are not re-driven a second time."""
    out = Redriven()
    last = await _newest_id(redis, keys, page)
    start = "-"
    while last is not None:
        batch = cast(
            list[Any], await redis.xrange(keys.dead_letter_stream, min=start, max=last, count=page)
        )
        for entry_id, raw in batch:
            letter = DeadLetter(_text(entry_id), "", _decoded(raw))
            await _redrive_one(redis, keys, letter, maxlen, out)
        if len(batch) < page:
            break
        start = "(" + _text(batch[-1][0])
    return out


async def _newest_id(redis: RedisClient, keys: Keys, page: int) -> str | None:
    """Id of the newest dead letter, by paging XRANGE (the invalidator's ACL user has XRANGE,
    not XREVRANGE or XINFO STREAM)."""
    newest, start = None, "-"
    while True:
        batch = cast(
            list[Any], await redis.xrange(keys.dead_letter_stream, min=start, count=page * 10)
        )
        if not batch:
            return newest
        newest = _text(batch[-1][0])
        start = "(" + newest


async def _redrive_one(
    redis: RedisClient, keys: Keys, letter: DeadLetter, maxlen: int, out: Redriven
) -> None:
    original = letter.original
    if not original:  # nothing to append (XADD needs a field): the letter stays
        out.empty.append(letter.id)
        return
    async with transaction(redis) as pipe:  # the dead letters share the stream's slot
        pipe.xadd(keys.stream, original, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
        pipe.xdel(keys.dead_letter_stream, letter.id)
        await pipe.execute()
    out.redriven += 1


def _decoded(raw: Any) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}
