"""``python -m bench.deletions REDIS_URL``: time every key deletion Redis reports, in a process of
its own, so the load generator's busy event loop does not delay the timestamps.

Subscribes to ``__keyevent@0__:del`` (the caller enables the notifications), prints ``ready``
once subscribed, then records the first arrival of each key on ``time.perf_counter()``, which on
Linux is CLOCK_MONOTONIC: the same clock in every process, so the committing client can subtract
its own readings. On end of standard input it publishes an end marker on the same channel,
reads up to it (so no deletion already notified is missed), prints one ``<seconds> <key>`` line
per key and exits. Used by bench/capture.py only.
"""

from __future__ import annotations

import sys
import threading
import time

import redis

CHANNEL = "__keyevent@0__:del"
# Published on the same channel when the caller is done: every deletion before it was read.
END = b"bench.deletions: end"


def main() -> None:
    client = redis.Redis.from_url(sys.argv[1])
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(CHANNEL)
    gone: dict[bytes, float] = {}

    def listen() -> None:
        for message in pubsub.listen():
            if message["type"] != "message":
                continue
            if message["data"] == END:
                return
            gone.setdefault(message["data"], time.perf_counter())

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the caller closes it
    client.publish(CHANNEL, END)  # behind every notification already sent
    thread.join()
    out = sys.stdout
    for key, at in gone.items():
        out.write(f"{at!r} {key.decode()}\n")
    out.flush()


if __name__ == "__main__":
    main()
