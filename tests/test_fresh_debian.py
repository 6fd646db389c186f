"""``make run`` and ``make test`` on a fresh Debian, whose PostgreSQL on 127.0.0.1:5432 asks for a
password we do not have: both fall back to a private cluster and say so in one line.

The packaged server is replayed in a network namespace of its own (tests/netns_fresh_debian.py),
so the machine's PostgreSQL is neither reached nor changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FALLBACK = "refused us (fe_sendauth: no password supplied): using a private PostgreSQL in "


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], check=False).returncode == 0


@pytest.fixture(scope="module")
def replay() -> dict[str, Any]:
    if not _can_unshare():
        pytest.skip("needs root and unshare -n (a network namespace of its own)")
    done = subprocess.run(
        ["unshare", "-n", "--", sys.executable, "-m", "tests.netns_fresh_debian"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.mark.slow
def test_the_packaged_server_refuses_us(replay: dict[str, Any]) -> None:
    assert replay["refusal"] == (
        "PostgreSQL at postgresql+psycopg://postgres@127.0.0.1:5432/postgres refused us "
        "(fe_sendauth: no password supplied)"
    )


@pytest.mark.slow
def test_make_run_falls_back_says_so_once_and_serves(replay: dict[str, Any]) -> None:
    run = replay["make_run"]
    said = [line for line in run["log"].splitlines() if FALLBACK in line]
    assert len(said) == 1, run["log"]
    assert said[0].startswith("devrun: PostgreSQL at postgresql+psycopg://postgres@127.0.0.1:5432/")
    assert "seeded 20 products" in run["log"]
    assert "PostgreSQL: postgresql+psycopg://postgres@127.0.0.1:5432/" not in run["banner"]
    assert (run["call_exit"], run["call_err"]) == (0, "")
    assert json.loads(run["call_out"])["id"] == "p0000001"
    assert run["exit"] == 0


@pytest.mark.slow
def test_make_test_falls_back_says_so_once_and_passes(replay: dict[str, Any]) -> None:
    test = replay["make_test"]
    assert test["exit"] == 0, test["out"]
    said = [line for line in test["out"].splitlines() if FALLBACK in line]
    assert len(said) == 1, test["out"]
    assert "2 passed" in test["out"]
