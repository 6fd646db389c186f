"""A private Redis Cluster of real ``redis-server`` nodes on loopback ports, for tests and
benchmarks.

Nodes run with ``--cluster-enabled yes`` and persist nothing; ``redis-cli --cluster create``
assigns the slots (``replicas`` replicas per primary), and :meth:`RedisCluster.start` returns
only once every node reports ``cluster_state:ok`` and agrees on the slot map. Single nodes can be
killed (failover tests), paused and restarted; slots can be moved with ``redis-cli --cluster
reshard`` while clients run. Nothing here is used in production.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import redis

from devtools.localservers import RedisProcess, free_port, port_in_use

# Redis Cluster's bus listens on the client port + 10000.
_BUS_OFFSET = 10_000
#: ``INFO commandstats`` names that are no data access: the INFO that reads them, and what a
#: client sends to learn the slot map or set up and keep its connections.
NOT_DATA = frozenset(
    {"info", "ping", "hello", "client", "cluster", "command", "select", "readonly"}
)


class RedisCluster:
    """``primaries`` primaries with ``replicas`` replicas each, owned by this process."""

    def __init__(
        self,
        workdir: Path,
        *,
        primaries: int = 3,
        replicas: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        self.workdir = workdir
        # Failover is what the tests exercise: a replica must not wait out the data-age check
        # meant for production clusters (replica validity factor 0).
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
                "--cluster-replica-validity-factor", "0")  # fmt: skip
        self.nodes = [
            RedisProcess(workdir / f"node{i}", _cluster_port(), *args, *extra_args)
            for i in range(primaries * (1 + replicas))
        ]
        self.replicas = replicas

    @property
    def url(self) -> str:
        """A URL of one node: cluster clients discover the others from it."""
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self, timeout: float = 60.0) -> RedisCluster:
        for node in self.nodes:
            node.start()
        nodes = (f"127.0.0.1:{p}" for p in self.ports)
        self.cli("--cluster", "create", *nodes, "--cluster-replicas", str(self.replicas),
                 "--cluster-yes")  # fmt: skip
        self.wait_ok(timeout)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cli(self, *args: str, port: int | None = None) -> str:
        """Run ``redis-cli`` against ``port`` (default: the first node); its stdout."""
        binary = shutil.which("redis-cli")
        if binary is None:
            raise RuntimeError("redis-cli is not installed (apt-get install redis-tools)")
        done = subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", str(port or self.nodes[0].port), *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed: {done.stderr or done.stdout}")
        return done.stdout

    def alive(self) -> list[RedisProcess]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node says ``cluster_state:ok`` with all 16384 slots assigned, and
        sees every slot owned by a live primary (after a kill: until the failover is done)."""
        deadline = time.monotonic() + timeout
        live = {n.port for n in self.alive()}
        while True:
            views = {port: (self.cluster_info(port), self.slot_owners(port)) for port in live}
            if all(
                info.get("cluster_state") == "ok"
                and info.get("cluster_slots_assigned") == "16384"
                and owners
                and owners <= live
                for info, owners in views.values()
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ok after {timeout}s: {views}")
            time.sleep(0.1)

    def slot_owners(self, port: int) -> set[int]:
        """Ports of the primaries that own slots, as the node on ``port`` sees them (a primary
        it flags as failed counts as no owner: port 0)."""
        owners: set[int] = set()
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            for line in self.cli("CLUSTER", "NODES", port=port).splitlines():
                fields = line.split()
                if len(fields) > 8 and "master" in fields[2]:  # has slot ranges
                    failed = "fail" in fields[2].split(",")
                    owners.add(0 if failed else int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return owners

    def cluster_info(self, port: int) -> dict[str, str]:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            out = self.cli("CLUSTER", "INFO", port=port)
            return dict(line.strip().split(":", 1) for line in out.splitlines() if ":" in line)
        return {}

    def primaries(self) -> list[int]:
        """Ports of the live nodes that are primaries now (after a failover, promoted replicas)."""
        ports = []
        for node in self.alive():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                if "role:master" in self.cli("INFO", "replication", port=node.port):
                    ports.append(node.port)
        return ports

    def commandstats(self) -> Counter[str]:
        """Calls per command (``INFO commandstats``, ``get``, ``mget``, ``evalsha``, ...) summed
        over every live node: what the cluster as a whole has been asked so far."""
        return self._info_sums("commandstats", "cmdstat_", "calls")

    def errorstats(self) -> Counter[str]:
        """Error replies per error code (``INFO errorstats``: ``MOVED``, ``ASK``, ...) summed over
        every live node."""
        return self._info_sums("errorstats", "errorstat_", "count")

    def _info_sums(self, section: str, prefix: str, field: str) -> Counter[str]:
        sums: Counter[str] = Counter()
        for node in self.alive():
            with redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=30) as client:
                stats = client.info(section)
            for name, fields in stats.items():
                sums[name.removeprefix(prefix)] += int(fields[field])
        return sums

    def node(self, port: int) -> RedisProcess:
        return next(n for n in self.nodes if n.port == port)

    # -- failover -------------------------------------------------------------------------------

    def node_id(self, port: int) -> str:
        return self.cli("CLUSTER", "MYID", port=port).strip()

    def owner(self, slot: int) -> int:
        """Port of the live primary that serves ``slot`` now (as a live node sees it)."""
        for port in self.primaries():
            for line in self.cli("CLUSTER", "NODES", port=port).splitlines():
                fields = line.split()
                if "myself" in fields[2] and _serves(fields[8:], slot):
                    return port
        raise RuntimeError(f"no live primary serves slot {slot}")

    def kill(self, port: int) -> None:
        """SIGKILL the node: no shutdown, no last replication of what it has."""
        node = self.node(port)
        if node.proc is not None:
            node.proc.kill()
            node.proc.wait()
            node.proc = None

    def fail_over(self, port: int, timeout: float = 60.0) -> int:
        """Kill the primary on ``port``, wait for a replica to take over its slots (the
        cluster is ok again); the port of the promoted replica."""
        slots = self.slots_of(port)
        self.kill(port)
        self.wait_ok(timeout)
        return self.owner(slots[0])

    def restart(self, port: int, timeout: float = 60.0) -> None:
        """Start a killed node again, with its cluster config: a failed-over primary comes
        back as a replica of the node that replaced it. Returns once it is a replica in sync."""
        self.node(port).start()
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                info = self.cli("INFO", "replication", port=port)
                if "role:slave" in info and "master_link_status:up" in info:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {port} did not sync as a replica within {timeout}s")
            time.sleep(0.1)

    # -- resharding -----------------------------------------------------------------------------

    def slots_of(self, port: int) -> list[int]:
        """The slots the primary on ``port`` serves, in ascending order."""
        for line in self.cli("CLUSTER", "NODES", port=port).splitlines():
            fields = line.split()
            if "myself" in fields[2]:
                return sorted(s for r in fields[8:] if "[" not in r for s in _expand(r))
        return []

    def reshard(self, source: int, target: int, slots: int, timeout: float = 60.0) -> None:
        """``redis-cli --cluster reshard`` of ``slots`` slots (the source's lowest) from the
        primary on ``source`` to the one on ``target``, keys and all, while clients run; then
        until every node agrees on the new map."""
        self.cli(
            "--cluster", "reshard", f"127.0.0.1:{source}",
            "--cluster-from", self.node_id(source), "--cluster-to", self.node_id(target),
            "--cluster-slots", str(slots), "--cluster-yes",
        )  # fmt: skip
        self.wait_agreed(timeout)

    def reshard_slot(self, slot: int, target: int, timeout: float = 60.0) -> None:
        """Move ``slot`` (with every slot its owner serves below it: redis-cli moves a source's
        lowest slots) to the primary on ``target``."""
        source = self.owner(slot)
        if source != target:
            self.reshard(source, target, self.slots_of(source).index(slot) + 1, timeout)

    def wait_agreed(self, timeout: float = 60.0) -> None:
        """Until ``redis-cli --cluster check`` finds no open slot and every node agrees."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                out = self.cli("--cluster", "check", f"127.0.0.1:{self.primaries()[0]}")
                if "All nodes agree" in out and "[WARNING]" not in out and "[ERR]" not in out:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster nodes did not agree within {timeout}s")
            time.sleep(0.1)


def _expand(slot_range: str) -> range:
    low, _, high = slot_range.partition("-")
    return range(int(low), int(high or low) + 1)


def _serves(ranges: list[str], slot: int) -> bool:
    return any(slot in _expand(r) for r in ranges if "[" not in r)


def _cluster_port() -> int:
    """A free port whose bus port (+10000) is a valid port and free too."""
    for _ in range(1000):
        port = free_port()
        if port + _BUS_OFFSET <= 65535 and not port_in_use(port + _BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")
