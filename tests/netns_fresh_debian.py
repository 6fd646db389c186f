"""A fresh Debian's PostgreSQL, replayed in a network namespace of its own: run as
``unshare -n python -m tests.netns_fresh_debian`` (root), by tests/test_fresh_debian.py.

``apt-get install postgresql`` leaves a cluster on 127.0.0.1:5432 that wants a scram-sha-256
password for TCP connections, which the ``postgres`` role does not have. In a new network namespace
127.0.0.1:5432 is free (the machine's own server is out of reach and untouched), so this starts
such a cluster there, then runs ``make run``'s launcher and a slice of ``make test`` against it
and prints what they did as one JSON object on stdout.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from core.db import libpq_url
from devtools.localservers import PostgresCluster, postgres_dir, postgres_refusal, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
LOCAL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PASSWORD = "only-the-admin-knows"
# What `make test` runs here: a migration on an empty database, reads from the seeded one.
TESTS = [
    "tests/test_migrations.py::test_upgrade_on_empty_database_reaches_head",
    "tests/test_repository.py::test_unknown_ids_are_absent",
]


def loopback_up() -> None:
    """``ip link set lo up`` without iproute2 (SIOCGIFFLAGS / SIOCSIFFLAGS on ``lo``)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))


def packaged_cluster(workdir: Path) -> PostgresCluster:
    """A cluster on 127.0.0.1:5432 configured like Debian's: scram-sha-256 on TCP, the postgres
    role with a password nobody told us."""
    cluster = PostgresCluster(workdir, port=5432).start()
    (cluster.datadir / "pg_hba.conf").write_text(
        "host all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n"
    )
    with psycopg.connect(libpq_url(LOCAL), autocommit=True) as conn:  # trusted until the reload
        conn.execute(f"ALTER ROLE postgres PASSWORD '{PASSWORD}'")
        conn.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 30
    while postgres_refusal(LOCAL) is None:  # the postmaster reloads when it gets to the signal
        assert time.monotonic() < deadline, "pg_hba.conf was not reloaded"
        time.sleep(0.05)
    return cluster


def run_make_run(run_dir: Path) -> dict[str, Any]:
    """``make run``'s launcher until its banner, one ``catalog call``, then Ctrl-C."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CATALOG_")}
    devrun = subprocess.Popen(
        [sys.executable, "-m", "devtools.devrun", "--products", "20", "--run-dir", str(run_dir)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert devrun.stdout is not None
    banner = []
    try:
        for line in devrun.stdout:
            banner.append(line)
            if "Ctrl-C stops everything" in line:
                break
        call = subprocess.run(
            [sys.executable, "-m", "ops", "call", "GetProduct", '{"id": "p0000001"}'],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        devrun.send_signal(signal.SIGINT)
        _, log = devrun.communicate(timeout=120)
    return {
        "banner": "".join(banner),
        "log": log,
        "exit": devrun.returncode,
        "call_exit": call.returncode,
        "call_out": call.stdout,
        "call_err": call.stderr,
    }


def run_make_test(basetemp: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEST_", "CATALOG_"))}
    # A basetemp of its own: pytest would otherwise prune other sessions' numbered directories.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
         str(basetemp), *TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    return {"exit": done.returncode, "out": done.stdout + done.stderr}


def main() -> None:
    loopback_up()
    result: dict[str, Any] = {}
    with postgres_dir("catalog-netns-") as scratch:
        cluster = packaged_cluster(scratch / "debian")
        try:
            wait_for_port(5432)
            result["refusal"] = postgres_refusal(LOCAL)
            started = time.monotonic()
            result["make_run"] = run_make_run(scratch / "run")
            result["make_test"] = run_make_test(scratch / "pytest")
            result["seconds"] = round(time.monotonic() - started, 1)
        finally:
            cluster.stop("immediate")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
