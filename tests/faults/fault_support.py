"""The fault tests' harness: private PostgreSQL clusters and NATS JetStream clusters on free
loopback ports, real processes we can SIGKILL, and the cleanup that always runs.

Nothing here touches the machine's shared services (PostgreSQL 5432, Redis 6379, NATS 4222):
every server a fault test kills is one this module started, in its own temporary directory, on
ports it picked, in its own process group (``start_new_session``), so that a kill takes the
whole server (postmaster and backends, or runuser and the server) and nothing else.

* :class:`Harness` owns everything one test starts (processes, temp dirs, log files) and
  :meth:`Harness.close` kills and removes all of it, whatever state the test left it in. The
  ``harness`` fixture (tests/faults/conftest.py) builds one per test and shows the tail of
  every log file when the test fails.
* :class:`PrivatePostgres`: a throwaway cluster (``initdb`` once per session, copied per
  instance), trust authentication on 127.0.0.1, run as the ``postgres`` OS user when we are
  root. ``fsync=off`` and ``full_page_writes=off``: a fault test kills *processes*, never the
  kernel, so whatever PostgreSQL has written (WAL included) survives in the page cache, and a
  restart after SIGKILL recovers exactly what an fsync'ed cluster would. What must stay on is
  ``synchronous_commit`` (the default): without it a commit is acknowledged before its WAL
  leaves shared memory, and a SIGKILL would lose acknowledged writes -- the very thing these
  tests check (and :class:`~phivault.ledger.postgres_store.PostgresLedgerStore` refuses it).
* :class:`NatsCluster`: ``nats-server`` processes with JetStream (file storage, each node its
  own store directory), client, cluster-route and monitoring ports on loopback; ``start``
  returns once JetStream has a meta leader that every running node agrees on.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import psycopg

import ports_support

__all__ = [
    "FaultTimeout",
    "Harness",
    "LogBook",
    "ManagedProcess",
    "NatsCluster",
    "PrivatePostgres",
    "await_until",
    "free_port",
    "kill_everything",
    "wait_until",
]

NATS_SERVER: Final = Path("/usr/sbin/nats-server")
_LOG_TAIL_LINES: Final = 60


class FaultTimeout(AssertionError):
    """A bounded wait in a fault test ran out (names what it waited for)."""


# --- small helpers ----------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port free right now and never handed out before in this process, nor
    by any other worker of the run (tests/ports_support.py): two servers of one test, or of
    two tests running at once, never get the same port between our probe and their bind."""
    return ports_support.free_port()


def wait_until(
    predicate: Callable[[], bool], timeout: float, *, what: str, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until it is true; :class:`FaultTimeout` naming ``what`` after
    ``timeout`` seconds. Exceptions from the predicate count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            if predicate():
                return
        except Exception as exc:  # not ready yet; shown if we time out
            last = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last is not None else ""
            raise FaultTimeout(f"timed out after {timeout:.1f} s waiting for {what}{detail}")
        time.sleep(interval)


async def await_until(
    predicate: Callable[[], Any], timeout: float, *, what: str, interval: float = 0.05
) -> None:
    """:func:`wait_until` for the event loop: ``predicate`` may be sync or return an awaitable."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
        except Exception as exc:  # not ready yet; shown if we time out
            last = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last is not None else ""
            raise FaultTimeout(f"timed out after {timeout:.1f} s waiting for {what}{detail}")
        await asyncio.sleep(interval)


@dataclass
class LogBook:
    """The log files of one test's processes, shown (their tails) when the test fails."""

    files: list[tuple[str, Path]] = field(default_factory=list)

    def add(self, name: str, path: Path) -> Path:
        self.files.append((name, path))
        return path

    def tails(self, lines: int = _LOG_TAIL_LINES) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for name, path in self.files:
            try:
                text = path.read_text(errors="replace")
            except OSError as exc:
                text = f"(unreadable: {exc})"
            out.append((name, "\n".join(text.splitlines()[-lines:])))
        return out


# --- processes --------------------------------------------------------------------------------

# Every process any harness started and has not reaped: the last-resort cleanup kills these.
_LIVE: set[ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


def _as_postgres_user(argv: Sequence[str]) -> list[str]:
    """Run as the ``postgres`` OS user when we are root (PostgreSQL refuses to run as root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return list(argv)


class ManagedProcess:
    """One server process in its own process group, its output appended to a log file.

    ``kill`` SIGKILLs the whole group (a wrapper such as runuser and the server under it, a
    postmaster and its backends), as a crash of that server would end them.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self.stopped_on_purpose = False

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.stopped_on_purpose = False
        with self.log.open("ab") as out:
            out.write(f"--- start {self.name}: {' '.join(self.argv)}\n".encode())
            out.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    @property
    def crashed(self) -> bool:
        """It exited and nobody here stopped it (a bad config, a port taken, a crash)."""
        return self.returncode is not None and not self.stopped_on_purpose

    def signal_group(self, sig: int) -> None:
        if self._popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, sig)

    def wait(self, timeout: float) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        code = self._popen.wait(timeout)
        self._forget()
        return code

    def kill(self) -> None:
        """SIGKILL the process group and everything it started, and wait until all of it is
        gone (no grace, as a crash). PostgreSQL backends make themselves session leaders, so
        the group alone would miss them: the group is stopped first (nothing forks while we
        look), then every descendant is found and killed. Waiting matters too: PostgreSQL
        refuses to start while the pid in its lock file exists, even as an unreaped zombie."""
        if self._popen is None:
            return
        self.stopped_on_purpose = True
        self.signal_group(signal.SIGSTOP)
        doomed = set(_group_members(self._popen.pid))
        for pid in list(doomed):
            doomed.update(_descendants(pid))
        self.signal_group(signal.SIGKILL)
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(10)
        wait_until(
            lambda: not any(_reaped_or_alive(pid) for pid in doomed),
            10,
            what=f"every process of {self.name} to be gone",
            interval=0.01,
        )
        self._forget()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Ask the group to stop with ``sig``; SIGKILL it if it has not stopped by ``timeout``."""
        if self._popen is None or self._popen.poll() is not None:
            self._forget()
            return
        self.stopped_on_purpose = True
        self.signal_group(sig)
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        # Whatever the leader left behind in its group goes too.
        self.signal_group(signal.SIGKILL)
        self._forget()

    def _forget(self) -> None:
        if self._popen is not None and self._popen.poll() is not None:
            with _LIVE_LOCK:
                _LIVE.discard(self)


def _proc_table() -> list[tuple[int, int, int]]:
    """(pid, ppid, pgid) of every process, zombies included, read from /proc."""
    table: list[tuple[int, int, int]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended while we looked
        # The command may hold spaces and parentheses: fields resume after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        table.append((int(entry.name), int(fields[1]), int(fields[2])))
    return table


def _group_members(pgid: int) -> list[int]:
    return [pid for pid, _ppid, group in _proc_table() if group == pgid]


def _descendants(root: int) -> set[int]:
    table = _proc_table()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        children = {pid for pid, ppid, _ in table if ppid in frontier and pid not in found}
        found |= children
        frontier = children
    return found


def _exists(pid: int) -> bool:
    """Whether ``pid`` exists at all (a zombie counts: its pid is still taken)."""
    return Path(f"/proc/{pid}").exists()


def _reaped_or_alive(pid: int) -> bool:
    """Reap ``pid`` if it is our (orphaned, adopted) child; whether it still exists."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return _exists(pid)


_PR_SET_CHILD_SUBREAPER: Final = 36


def adopt_orphans(on: bool) -> None:
    """Make this process the reaper of its descendants' orphans (Linux) while fault tests run.

    A killed postmaster's backends (and a killed runuser's server) are orphans; without this
    they go to init, which here reaps zombies about once a second, and PostgreSQL will not
    start again while the old postmaster's pid exists, even as a zombie. Adopted, we reap them
    at once (only the pids we killed: never anyone else's children)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def kill_everything() -> int:
    """SIGKILL every process group any harness started and has not reaped (last resort)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for process in live:
        process.kill()
    with _LIVE_LOCK:
        _LIVE.difference_update(live)
    return len(live)


# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's binaries (``/usr/lib/postgresql/<ver>/bin``)."""
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (p for p in root.iterdir() if (p / "bin" / "postgres").is_file()),
        key=lambda p: int(p.name) if p.name.isdigit() else 0,
    )
    if not versions:
        raise RuntimeError(f"no PostgreSQL server binaries under {root}")
    return versions[-1] / "bin"


def _chown_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres:postgres", str(path)], check=True)


def _world_traversable_tmpdir(prefix: str) -> Path:
    """A temp dir the ``postgres`` OS user can enter (pytest's own are root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


class _TemplateCluster:
    """One ``initdb`` per session (about 1.5 s); every instance copies it (tens of ms)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._base: Path | None = None

    def data(self) -> Path:
        with self._lock:
            if self._base is None or not (self._base / "data" / "PG_VERSION").exists():
                self._base = self._initdb()
                # Removed at the session's end by the conftest; this covers scripts and runs
                # that end some other way.
                atexit.register(self.remove)
            return self._base / "data"

    @staticmethod
    def _initdb() -> Path:
        base = _world_traversable_tmpdir("pv-fault-pgtemplate-")
        data = base / "data"
        data.mkdir(mode=0o700)
        _chown_postgres(data)
        initdb = [
            str(postgres_bin() / "initdb"),
            "-D", str(data),
            "-A", "trust",
            "-U", "postgres",
            "-E", "UTF8",
            "--no-sync",
            "--no-instructions",
        ]  # fmt: skip
        subprocess.run(_as_postgres_user(initdb), check=True, capture_output=True, timeout=60)
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 127.0.0.1/32 trust\n")
            hba.write("host replication all 127.0.0.1/32 trust\n")
        return base

    def remove(self) -> None:
        with self._lock:
            if self._base is not None:
                shutil.rmtree(self._base, ignore_errors=True)
                self._base = None


_TEMPLATE = _TemplateCluster()


def remove_template() -> None:
    """Remove the session's template cluster (the session fixture calls this at the end)."""
    _TEMPLATE.remove()


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on a free loopback port, ours to stop, kill and restart.

    ``conninfo`` is the superuser's libpq string (database ``postgres``); ``url`` the same as a
    SQLAlchemy URL. Its data survives ``stop``/``kill``/``restart`` (same directory, same port).
    """

    def __init__(
        self,
        base: Path,
        logs: LogBook,
        *,
        name: str = "postgres",
        extra_settings: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.extra_settings = dict(extra_settings or {})
        self.primary: PrivatePostgres | None = None  # set on a replica
        self._nudged = 0.0
        self.base = base
        self.data = base / "data"
        self.sockets = base / "sockets"
        self.port = free_port()
        self.log = logs.add(name, base / f"{name}.log")
        self._process: ManagedProcess | None = None
        self.sockets.mkdir(exist_ok=True)
        _chown_postgres(self.sockets)
        if not self.data.exists():
            subprocess.run(
                ["cp", "-a", str(_TEMPLATE.data()), str(self.data)], check=True, timeout=60
            )

    @property
    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres connect_timeout=3"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def settings(self) -> list[str]:
        return [
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"port={self.port}",
            "-c", f"unix_socket_directories={self.sockets}",
            "-c", "fsync=off",  # process kills only: see the module's docstring
            "-c", "full_page_writes=off",
            "-c", "synchronous_commit=on",  # acknowledged commits survive SIGKILL
            "-c", "shared_buffers=32MB",
            "-c", "max_connections=60",
            "-c", "wal_level=replica",
            "-c", "max_wal_senders=4",
            "-c", "hot_standby=on",
            "-c", "wal_keep_size=64MB",  # a replica killed for a while can still catch up
            "-c", "logging_collector=off",
            *(arg for k, v in self.extra_settings.items() for arg in ("-c", f"{k}={v}")),
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> None:
        """Start the postmaster and wait until it accepts connections (crash recovery
        included, after a kill)."""
        if self._process is not None and self._process.running:
            raise RuntimeError(f"{self.name} is already running")
        argv = _as_postgres_user([str(postgres_bin() / "postgres"), "-D", str(self.data)])
        self._process = ManagedProcess(self.name, [*argv, *self.settings()], self.log)
        self._process.start()
        wait_until(self._ready, timeout, what=f"{self.name} to accept connections")

    def _ready(self) -> bool:
        try:
            return self.accepts_connections()
        except psycopg.OperationalError:
            if self.primary is not None:
                self.primary.nudge_standbys()
            raise

    def nudge_standbys(self) -> None:
        """A hot standby opens for reads only once it has replayed a snapshot of running
        transactions, which an idle primary logs every 15 s; a checkpoint logs one now."""
        now = time.monotonic()
        if now - self._nudged < 0.3:
            return
        self._nudged = now
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.conninfo, autocommit=True, connect_timeout=1) as conn,
        ):
            conn.execute("CHECKPOINT")

    def accepts_connections(self) -> bool:
        if self._process is None or not self._process.running:
            raise RuntimeError(f"{self.name} is not running (see its log)")
        with psycopg.connect(self.conninfo, connect_timeout=1) as conn:
            conn.execute("SELECT 1")
        return True

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    def postmaster_pid(self) -> int:
        """The postmaster's pid (the first line of postmaster.pid)."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Shut down as ``pg_ctl stop -m MODE`` would (smart, fast or immediate)."""
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        if self._process is None or not self._process.running:
            return
        self._process.stopped_on_purpose = True
        with contextlib.suppress(OSError, ValueError):
            os.kill(self.postmaster_pid(), sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout)
        self._process.kill()  # whatever did not stop in time; and wait until all are gone

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend at once (a crash of the server)."""
        if self._process is not None:
            self._process.kill()

    def restart(self, mode: str = "fast", timeout: float = 30.0) -> None:
        self.stop(mode)
        self.start(timeout)

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()

    @property
    def served_by_name(self) -> str:
        """How the records store names this node when it serves a read as a replica."""
        return f"replica:127.0.0.1:{self.port}"

    def make_replica(self, base: Path, logs: LogBook, *, name: str = "replica") -> PrivatePostgres:
        """A hot standby of this (running) cluster: ``pg_basebackup -R`` into ``base``, not
        started. It streams from this cluster and reconnects by itself when either returns."""
        data = base / "data"
        data.mkdir(mode=0o700)
        _chown_postgres(data)
        backup = [
            str(postgres_bin() / "pg_basebackup"),
            "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
            "-D", str(data), "-X", "stream", "-c", "fast", "-R", "--no-sync",
        ]  # fmt: skip
        done = subprocess.run(
            _as_postgres_user(backup), check=False, capture_output=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(
                "pg_basebackup failed: " + done.stderr.decode(errors="replace").strip()
            )
        replica = PrivatePostgres(
            base,
            logs,
            name=name,
            extra_settings={
                "wal_receiver_status_interval": "1s",
                "wal_retrieve_retry_interval": "200ms",
                "hot_standby_feedback": "on",
            },
        )
        replica.primary = self
        return replica

    def wait_replayed_by(self, replica: PrivatePostgres, timeout: float = 20.0) -> None:
        """Wait until ``replica`` has replayed everything this primary has written now."""
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        target = row[0]

        def replayed() -> bool:
            with psycopg.connect(replica.conninfo, autocommit=True) as conn:
                got = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
                ).fetchone()
            return bool(got and got[0])

        wait_until(replayed, timeout, what=f"{replica.name} to replay the primary's WAL")


# --- NATS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NatsNode:
    index: int
    name: str
    client_port: int
    cluster_port: int
    monitor_port: int
    store: Path
    config: Path


class NatsCluster:
    """``size`` nats-server processes with JetStream on loopback; one node is no cluster.

    Each node keeps its name, ports and store directory across ``kill``/``restart``, as a node
    of a real cluster does when its process comes back.
    """

    def __init__(
        self, base: Path, logs: LogBook, *, size: int = 3, cluster_name: str = "pvfault"
    ) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.base = base
        self.cluster_name = cluster_name
        self.nodes: list[_NatsNode] = []
        self._processes: list[ManagedProcess] = []
        for i in range(size):
            node = _NatsNode(
                i, f"n{i}", free_port(), free_port(), free_port(), base / f"n{i}-js",
                base / f"n{i}.conf",
            )  # fmt: skip
            self.nodes.append(node)
        for node in self.nodes:
            node.store.mkdir(parents=True, exist_ok=True)
            node.config.write_text(self._config(node))
            log = logs.add(f"nats-{node.name}", base / f"{node.name}.log")
            self._processes.append(
                ManagedProcess(f"nats-{node.name}", [str(NATS_SERVER), "-c", str(node.config)], log)
            )

    def _config(self, node: _NatsNode) -> str:
        lines = [
            f"server_name: {node.name}",
            f"listen: 127.0.0.1:{node.client_port}",
            f"http: 127.0.0.1:{node.monitor_port}",
            "jetstream {",
            f'  store_dir: "{node.store}"',
            "  max_memory_store: 64MB",
            "  max_file_store: 1GB",
            "}",
        ]
        if len(self.nodes) > 1:
            routes = ", ".join(
                f"nats-route://127.0.0.1:{other.cluster_port}"
                for other in self.nodes
                if other is not node
            )
            lines += [
                "cluster {",
                f"  name: {self.cluster_name}",
                f"  listen: 127.0.0.1:{node.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    @property
    def size(self) -> int:
        return len(self.nodes)

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{node.client_port}" for node in self.nodes]

    def running(self, i: int) -> bool:
        return self._processes[i].running

    def start(self, timeout: float = 30.0) -> None:
        for process in self._processes:
            if not process.running:
                process.start()
        self.wait_for_leader(timeout)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (no lame-duck mode, no goodbye to its peers)."""
        self._processes[i].kill()

    def kill_all(self) -> None:
        for process in self._processes:
            process.kill()

    def restart(self, i: int, timeout: float = 30.0, *, wait_healthy: bool = True) -> None:
        """Bring node ``i`` back (same name, ports and store); wait until the cluster has a
        meta leader again and (unless told not to) this node is healthy: caught up with
        every stream it holds a replica of, which takes seconds."""
        self._processes[i].kill()
        self._processes[i].start()
        self.wait_for_leader(timeout)
        if wait_healthy:
            wait_until(
                lambda: self._healthy(self.nodes[i]),
                timeout,
                what=f"NATS node n{i} to be healthy",
            )

    def restart_all(self, timeout: float = 30.0) -> None:
        for process in self._processes:
            process.kill()
        self.start(timeout)

    def _jsz(self, node: _NatsNode) -> dict[str, Any]:
        response = httpx.get(f"http://127.0.0.1:{node.monitor_port}/jsz", timeout=1.0)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def _healthy(self, node: _NatsNode) -> bool:
        response = httpx.get(f"http://127.0.0.1:{node.monitor_port}/healthz", timeout=1.0)
        return response.status_code == 200

    def meta_leader(self) -> str | None:
        """The JetStream meta leader every running node names, or None if they do not agree
        (or some running node does not answer yet)."""
        leaders: set[str] = set()
        for node, process in zip(self.nodes, self._processes, strict=True):
            if not process.running:
                continue
            data = self._jsz(node)
            if self.size == 1:
                # A single server has no meta group: JetStream enabled means it is ready.
                return node.name if data.get("config") else None
            leader = (data.get("meta_cluster") or {}).get("leader")
            if not leader:
                return None
            leaders.add(str(leader))
        if len(leaders) != 1:
            return None
        (leader,) = leaders
        # Survivors keep naming a killed leader until they elect another one.
        alive = {n.name for n, p in zip(self.nodes, self._processes, strict=True) if p.running}
        return leader if leader in alive else None

    def wait_for_leader(self, timeout: float = 30.0) -> str:
        def ready() -> bool:
            for i, process in enumerate(self._processes):
                if process.crashed:  # shown in its log
                    raise RuntimeError(f"NATS node n{i} exited with {process.returncode}")
            return self.meta_leader() is not None

        wait_until(ready, timeout, what="a JetStream meta leader")
        leader = self.meta_leader()
        assert leader is not None
        return leader

    def close(self) -> None:
        for process in self._processes:
            process.kill()


# --- the per-test owner of everything ---------------------------------------------------------


class Harness:
    """Everything one fault test starts; :meth:`close` removes all of it, always."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.logs = LogBook()
        adopt_orphans(True)
        self._dirs: list[Path] = []
        self._closers: list[Callable[[], None]] = []

    def tmpdir(self, prefix: str = "pv-fault-") -> Path:
        path = _world_traversable_tmpdir(prefix)
        self._dirs.append(path)
        return path

    def postgres(self, name: str = "postgres", *, start: bool = True) -> PrivatePostgres:
        pg = PrivatePostgres(self.tmpdir(f"pv-fault-{name}-"), self.logs, name=name)
        self._closers.append(pg.close)
        if start:
            pg.start()
        return pg

    def replica_of(
        self, primary: PrivatePostgres, name: str = "replica", *, start: bool = True
    ) -> PrivatePostgres:
        """A streaming hot standby of ``primary`` (started and caught up unless told not)."""
        replica = primary.make_replica(self.tmpdir(f"pv-fault-{name}-"), self.logs, name=name)
        self._closers.append(replica.close)
        if start:
            replica.start()
            primary.wait_replayed_by(replica)
        return replica

    def nats(self, size: int = 3, *, start: bool = True) -> NatsCluster:
        cluster = NatsCluster(self.tmpdir("pv-fault-nats-"), self.logs, size=size)
        self._closers.append(cluster.close)
        if start:
            cluster.start()
        return cluster

    def process(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        start: bool = True,
    ) -> ManagedProcess:
        """Any other process (a sequencer, a server), logged and killed at the end."""
        log = self.logs.add(name, self.tmpdir(f"pv-fault-{name}-") / f"{name}.log")
        process = ManagedProcess(name, argv, log, env=env)
        self._closers.append(process.kill)
        if start:
            process.start()
        return process

    def on_close(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def close(self) -> list[str]:
        """Kill every process, remove every directory; return what could not be cleaned."""
        problems: list[str] = []
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception as exc:  # keep cleaning; the fixture reports these
                problems.append(f"{closer!r}: {exc!r}")
        self._closers.clear()
        for path in reversed(self._dirs):
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                problems.append(f"could not remove {path}")
        self._dirs.clear()
        adopt_orphans(False)
        return problems


@contextlib.contextmanager
def harness_for(name: str) -> Iterator[Harness]:
    """A harness outside pytest fixtures (scripts, debugging)."""
    harness = Harness(name)
    try:
        yield harness
    finally:
        harness.close()
