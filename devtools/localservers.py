"""Private Redis and PostgreSQL servers started from the local binaries.

Used by the test suite (each run gets servers nobody else touches, so it may stop, kill or restart
them) and by ``make run`` and ``make test`` when the configured server does not answer or refuses
us (:func:`usable_postgres`). Nothing here is used in production.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import psycopg
from sqlalchemy.engine import make_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


class RedisProcess:
    """A ``redis-server`` on a loopback port, persisting nothing, owned by this process."""

    def __init__(self, workdir: Path, port: int | None = None, *extra_args: str) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            [binary, *args, *self.extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            process_group=0,  # a terminal's Ctrl-C is for our process; it stops us in order
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        """Terminate and wait; the data set is gone (nothing is persisted)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()


# Appended to postgresql.conf by initdb(). The port line is read back to reuse a cluster's port.
_CONF_MARKER = "# --- private cluster settings ---"


def postgres_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` are: ``pg_config --bindir``, else the highest version."""
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, check=True, text=True
            )
            bindir = Path(out.stdout.strip())
            if (bindir / "initdb").exists():
                return bindir
    candidates = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if (d / "initdb").exists()]
    if not candidates:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    return max(candidates, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


class PostgresCluster:
    """A PostgreSQL cluster in ``workdir/data``, owned and started by this process.

    Invariants: it listens on 127.0.0.1 only (no Unix socket), trusts every local connection as
    the ``postgres`` superuser, and with ``fsync=False`` (the default, for tests) survives a
    process kill but not a machine crash. When running as root, every server binary runs as the
    ``postgres`` user and ``workdir`` is chowned to it, so ``workdir``'s parents must be
    searchable by that user. An initialised cluster is reused, with the port it last used when
    that port is free (or it is the one already running there).
    """

    def __init__(self, workdir: Path, port: int | None = None, *, fsync: bool = False) -> None:
        self.workdir = workdir.absolute()  # binaries run with it as their working directory
        self.datadir = self.workdir / "data"
        self.logfile = self.workdir / "postgres.log"
        self.fsync = fsync
        self.bindir = postgres_bindir()
        self.port = port or self._running_port() or self._recorded_port() or free_port()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def initialised(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def init(self) -> PostgresCluster:
        """Create the cluster unless ``workdir`` already holds one."""
        if self.initialised:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
            if self._run(["test", "-w", str(self.workdir)], check=False).returncode != 0:
                raise RuntimeError(
                    f"user postgres cannot write {self.workdir}: "
                    "its parent directories must be searchable by others (chmod o+x)"
                )
        # initdb works in a scratch directory renamed into place once complete, so an
        # interrupted initdb never leaves a half-made cluster that would look reusable.
        scratch = self.workdir / "data.initdb"
        shutil.rmtree(scratch, ignore_errors=True)
        self._run([
            str(self.bindir / "initdb"), "-D", str(scratch), "-U", "postgres",
            "--auth=trust", "--encoding=UTF8", "--locale=C", *([] if self.fsync else ["--no-sync"]),
        ])  # fmt: skip
        settings = [
            _CONF_MARKER,
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            "unix_socket_directories = ''",
            "max_connections = 200",
        ]
        if not self.fsync:
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        # Appending as root keeps the file's owner (postgres); only the content changes.
        with (scratch / "postgresql.conf").open("a") as f:
            f.write("\n" + "\n".join(settings) + "\n")
        scratch.rename(self.datadir)
        return self

    def start(self) -> PostgresCluster:
        """Initialise if needed and start; returns once the server accepts connections."""
        self.init()
        if self.is_running():
            return self
        self._run([
            str(self.bindir / "pg_ctl"), "start", "-D", str(self.datadir), "-l", str(self.logfile),
            "-w", "-t", "60", "-o", f"-p {self.port}",
        ])  # fmt: skip
        wait_for_port(self.port)
        return self

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop the server if it runs; ``immediate`` skips the shutdown checkpoint."""
        if self.initialised and self.is_running():
            self._run([str(self.bindir / "pg_ctl"), "stop", "-D", str(self.datadir), "-m", mode,
                       "-w", "-t", "60"])  # fmt: skip

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (a crash: the next start runs recovery)."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        # Backends are not in the postmaster's process group, so they are listed and killed
        # one by one; one forked in between exits by itself when it sees the postmaster die.
        victims = [pid, *children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(map(_alive, victims)) and time.monotonic() < deadline:
            time.sleep(0.02)
        # Until its new parent reaps it, a zombie postmaster passes the lock-file liveness check
        # of the next start, so the stale lock file goes now.
        (self.datadir / "postmaster.pid").unlink(missing_ok=True)

    def restart(self) -> PostgresCluster:
        self.stop()
        return self.start()

    def is_running(self) -> bool:
        return self._postmaster_pid() is not None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        return self._postmaster_pid()

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()

    def _postmaster_pid(self) -> int | None:
        """The live postmaster's pid, or None (also when ``postmaster.pid`` is stale)."""
        lines = self._pid_file_lines()
        if not lines or not lines[0].strip().isdigit():
            return None
        pid = int(lines[0])
        return pid if _alive(pid) else None

    def _running_port(self) -> int | None:
        lines = self._pid_file_lines()
        if self._postmaster_pid() is None or len(lines) < 4 or not lines[3].strip().isdigit():
            return None
        return int(lines[3])

    def _recorded_port(self) -> int | None:
        conf = self.datadir / "postgresql.conf"
        _, _, ours = (conf.read_text() if conf.exists() else "").partition(_CONF_MARKER)
        for line in ours.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "port" and value.strip().isdigit():
                port = int(value)
                return None if port_in_use(port) else port
        return None

    def _pid_file_lines(self) -> list[str]:
        try:
            return (self.datadir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return []

    def _run(self, cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run a server binary as its owner; output goes to a file, never a pipe (see below)."""
        if os.geteuid() == 0:
            # runuser, not subprocess's user=: switching ids in the child forces a full fork(),
            # which runs every pthread_atfork handler (gRPC's included) in a process whose other
            # threads are live and can crash the child before exec; a plain spawn avoids that.
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        # The postmaster pg_ctl leaves behind must not inherit a pipe we wait on.
        with tempfile.TemporaryFile() as out:
            done = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.workdir, check=False,
            )  # fmt: skip
            if check and done.returncode != 0:
                out.seek(0)
                log = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
                raise RuntimeError(
                    f"{' '.join(cmd)} failed ({done.returncode}):\n"
                    f"{out.read().decode(errors='replace')}{log}"
                )
        return done


def postgres_refusal(url: str, timeout_s: float = 2.0) -> str | None:
    """None when PostgreSQL at the SQLAlchemy ``url`` lets us into its ``postgres`` database;
    else why not, in one line naming the password-free URL."""
    u = make_url(url)
    host, port = u.host or "127.0.0.1", u.port or 5432
    conninfo = psycopg.conninfo.make_conninfo(
        host=host, port=port, user=u.username or "postgres", password=u.password or None,
        dbname="postgres", connect_timeout=max(1, round(timeout_s)),
    )  # fmt: skip
    try:
        psycopg.connect(conninfo, autocommit=True).close()
        return None
    except psycopg.OperationalError as exc:
        shown = u.render_as_string(hide_password=True)
        if not answers(host, port):
            return f"no PostgreSQL answers at {shown}"
        # libpq's message: 'connection to server at "...", port N failed: FATAL:  password ...'
        reason = " ".join(str(exc).split()).rpartition(" failed: ")[2]
        return f"PostgreSQL at {shown} refused us ({reason[:200]})"


@contextlib.contextmanager
def postgres_dir(prefix: str = "catalog-pg-") -> Iterator[Path]:
    """A new temporary directory the ``postgres`` user can reach (pytest's are 0700); removed
    afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if os.geteuid() == 0:
            path.chmod(0o755)  # the server runs as postgres and must reach its data directory
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def usable_postgres(
    url: str, workdir: Path | None = None, say: Callable[[str], None] = print
) -> Iterator[str]:
    """``url`` when its server lets us in; else, after one line to ``say``, the URL of the same
    database name on a private cluster started in ``workdir`` (a temporary directory when None,
    removed afterwards), which is stopped on exit. A fresh Debian's packaged cluster asks for a
    password the ``postgres`` role does not have: this is how ``make run`` and ``make test`` still
    work there without anyone editing ``pg_hba.conf``."""
    why = postgres_refusal(url)
    if why is None:
        yield url
        return
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(postgres_dir()) / "pg"
        say(f"{why}: using a private PostgreSQL in {workdir}")
        cluster = PostgresCluster(workdir)
        stack.callback(cluster.stop)
        cluster.start()
        private = make_url(cluster.url).set(database=make_url(url).database or "postgres")
        yield private.render_as_string(hide_password=False)


def answers(host: str, port: int) -> bool:
    """True when something accepts a TCP connection on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _stat(pid: int) -> list[str]:
    """Fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...); [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie."""
    return _stat(pid)[:1] not in ([], ["Z"])


def children(pid: int) -> list[int]:
    procs = (int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit())
    return [child for child in procs if _stat(child)[1:2] == [str(pid)]]


def port_in_use(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
