"""``python -m bench.deletions REDIS_URL``: time every key deletion Redis reports, in a process of
its own, so the load generator's busy event loop does not delay the timestamps.

Subscribes to ``__keyevent@0__:del`` (the caller enables the notifications), prints ``ready``
once subscribed, then records the first arrival of each key on ``time.perf_counter()``, which on
Linux is CLOCK_MONOTONIC: the same clock in every process, so the committing client can subtract
its own readings. On end of standard input it prints one ``<seconds> <key>`` line per key and
exits. Used by bench/capture.py only.
"""

from __future__ import annotations

import sys
import threading
import time

import redis


def main() -> None:
    client = redis.Redis.from_url(sys.argv[1])
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe("__keyevent@0__:del")
    gone: dict[bytes, float] = {}
    done = threading.Event()

    def listen() -> None:
        # After the caller is done, drain what is still queued (a bulk deletion can leave the
        # listener behind), until Redis has nothing more for a while.
        while True:
            message = pubsub.get_message(timeout=0.05 if not done.is_set() else 0.5)
            if message is None:
                if done.is_set():
                    return
                continue
            if message["type"] == "message":
                gone.setdefault(message["data"], time.perf_counter())

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the caller closes it
    done.set()
    thread.join()
    out = sys.stdout
    for key, at in gone.items():
        out.write(f"{at!r} {key.decode()}\n")
    out.flush()


if __name__ == "__main__":
    main()
