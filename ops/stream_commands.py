"""``catalog dlq``, ``catalog outbox`` and ``catalog publish``: the operator's side of the event
stream and of the outbox.

Each handler gets the base settings and the parsed arguments and returns the exit status (the
contract of :mod:`ops.cli`); invalidator settings are read here, and their errors exit 2 like any
configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from core.events import EVENT_TYPES, ID_FIELDS, ParseError, new_event
from core.publisher import Publisher
from core.redisclient import RedisClient, connect
from core.settings import Settings
from invalidator.deadletter import (
    Redriven,
    is_entry_id,
    list_dead_letters,
    redrive,
    redrive_all,
)
from invalidator.outbox import failed_rows, retry_failed
from invalidator.settings import InvalidatorSettings

T = TypeVar("T")
MAX_SHOWN = 2000  # characters of a set-aside row's fields printed


def register(subparsers: Any) -> None:
    """Add ``dlq``, ``outbox`` and ``publish`` to an ``add_subparsers()`` object."""
    dlq = subparsers.add_parser("dlq", help="list or re-drive dead-lettered events")
    actions = dlq.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")
    show = actions.add_parser("list", help="print dead letters, oldest first")
    show.add_argument("--count", type=int, default=50, help="how many (default 50)")
    show.add_argument("--start", default="-", help="first entry id (inclusive)")
    again = actions.add_parser("redrive", help="append dead letters to the event stream again")
    again.add_argument("ids", nargs="*", help="dead-letter entry ids")
    again.add_argument("--all", action="store_true", help="every dead letter")
    dlq.set_defaults(handler=_dlq)

    box = subparsers.add_parser("outbox", help="list or retry outbox rows the relay set aside")
    box_actions = box.add_subparsers(dest="outbox_action", required=True, metavar="ACTION")
    failed = box_actions.add_parser("failed", help="print set-aside rows, oldest first")
    failed.add_argument("--count", type=int, default=50, help="how many (default 50)")
    failed.add_argument("--after", type=int, default=0, help="only ids above this one")
    retry = box_actions.add_parser("retry", help="queue set-aside rows again (fix them first)")
    retry.add_argument("ids", nargs="+", type=int, help="outbox row ids")
    box.set_defaults(handler=_outbox)

    pub = subparsers.add_parser("publish", help="publish one event (XADD to the event stream)")
    pub.add_argument("type", choices=EVENT_TYPES)
    for name in ID_FIELDS:
        pub.add_argument("--" + name.replace("_", "-"), default="", dest=name)
    pub.add_argument(
        "--product-ids",
        default="",
        help="products.updated, price_rule.changed: comma-separated ids",
    )
    pub.add_argument("--version", type=int, default=0)
    pub.set_defaults(handler=_publish)


def _with_redis(
    base: Settings, settings: InvalidatorSettings, work: Callable[[RedisClient], Awaitable[T]]
) -> T:
    async def go() -> T:
        redis = connect(base, socket_timeout=settings.invalidator_socket_timeout_s)
        try:
            return await work(redis)
        finally:
            await redis.aclose()

    return asyncio.run(go())


def _dlq(base: Settings, args: argparse.Namespace) -> int:
    settings = InvalidatorSettings.from_env()
    keys = settings.keys(base)
    if args.dlq_action == "list":
        if not 1 <= args.count <= 10_000 or (args.start != "-" and not is_entry_id(args.start)):
            print("catalog dlq list: --count is 1-10000, --start an entry id", file=sys.stderr)
            return 2
        letters = _with_redis(
            base,
            settings,
            lambda r: list_dead_letters(r, keys, count=args.count, start=args.start),
        )
        for letter in letters:
            print(f"{letter.id}\t{letter.reason}\t{letter.original}")
        return 0
    if not args.ids and not args.all:
        print("catalog dlq redrive: give entry ids or --all", file=sys.stderr)
        return 2
    if bad := [i for i in args.ids if not is_entry_id(i)]:
        print(f"catalog dlq redrive: not a stream entry id: {bad[0][:40]!r}", file=sys.stderr)
        return 2
    maxlen = settings.event_stream_maxlen

    async def go(redis: RedisClient) -> Redriven:
        if args.all:
            return await redrive_all(redis, keys, maxlen=maxlen)
        return await redrive(redis, keys, args.ids, maxlen=maxlen)

    done = _with_redis(base, settings, go)
    print(f"re-drove {done.redriven} entries to {keys.stream}")
    if done.missing:
        print(f"{done.missing} ids were not in {keys.dead_letter_stream}")
    for entry_id in done.empty:
        print(f"{entry_id} left in place: it holds no original fields to re-drive")
    return 0


def _outbox(base: Settings, args: argparse.Namespace) -> int:
    from core.db import create_engine

    if args.outbox_action == "failed" and not (1 <= args.count <= 10_000 and args.after >= 0):
        print("catalog outbox failed: --count is 1-10000, --after >= 0", file=sys.stderr)
        return 2
    if args.outbox_action == "retry" and min(args.ids) < 1:
        print("catalog outbox retry: row ids are positive", file=sys.stderr)
        return 2

    async def go() -> int:
        engine = create_engine(base)
        try:
            if args.outbox_action == "retry":
                n = await retry_failed(engine, list(args.ids))
                print(f"queued {n} of {len(args.ids)} rows again")
                return 0 if n == len(args.ids) else 1
            for row in await failed_rows(engine, count=args.count, after_id=args.after):
                fields = json.dumps(row.fields, sort_keys=True)
                print(
                    f"{row.id}\t{row.failed_at.isoformat()}\t{row.error}\t"
                    f"{row.stream or '-'}\t{fields[:MAX_SHOWN]}"
                )
            return 0
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _publish(base: Settings, args: argparse.Namespace) -> int:
    settings = InvalidatorSettings.from_env()
    try:
        event = new_event(
            args.type,
            version=args.version,
            product_ids=tuple(args.product_ids.split(",")) if args.product_ids else (),
            **{name: getattr(args, name) for name in ID_FIELDS},
        )
    except ParseError as exc:
        print(f"catalog publish: {exc.reason}", file=sys.stderr)
        return 2
    publisher_keys = settings.keys(base)
    entry_id = _with_redis(
        base,
        settings,
        lambda r: Publisher(r, publisher_keys, maxlen=settings.event_stream_maxlen).publish(event),
    )
    print(f"{entry_id} {event.type} event_id={event.event_id}")
    return 0
