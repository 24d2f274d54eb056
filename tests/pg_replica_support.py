"""A real streaming replica of the machine's PostgreSQL, for routing and fault tests.

:class:`PgReplica` copies the primary (``PHIVAULT_TEST_POSTGRES``, default 127.0.0.1:5432)
with ``pg_basebackup -R`` over a physical replication slot into a temp directory and runs it
as a hot standby on a free loopback port, as the ``postgres`` OS user when we are root. It
can be stopped (fast), killed (SIGKILL, postmaster and backends), restarted, and its replay
paused and resumed (lag on demand). The slot keeps the WAL the replica still needs, so it
never falls behind for good; it is dropped at teardown.

Replication connections. The machine's ``pg_hba.conf`` admits ``all`` databases from
127.0.0.1 with trust, which does not cover physical replication. The harness does not add a
trust line: it makes a per-session LOGIN REPLICATION role with a random password, member of
the NOLOGIN group ``phivault_test_replicators``, and, if no rule admits it, appends (root,
local server) one rule for that group only, from 127.0.0.1 only, with scram-sha-256::

    host replication +phivault_test_replicators 127.0.0.1/32 scram-sha-256

Without the session's password nothing can use it, and the role is dropped at teardown; the
last session to finish (an exclusive ``flock`` on a lock file, which running sessions hold
shared) removes the rule again and reloads. If the rule cannot be added (not root, a remote
server), :class:`ReplicaHarnessError` says which line an administrator must add.

Leftovers of a session that was killed (its replica, temp dir, slot and role carry its pid)
are cleaned up by the next session that starts a replica.

Fixture: :func:`pg_replica` (session scope; import it into a test module). Every module that
imports it shares one replica per session. Each test still uses its own schema.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy.engine import URL

from ports_support import free_port
from postgres_support import ADMIN_CONNINFO, require_postgres

GROUP = "phivault_test_replicators"
HBA_RULE = f"host replication +{GROUP} 127.0.0.1/32 scram-sha-256"
_HBA_MARK = "# phivault test harness (tests/pg_replica_support.py); removed when its tests end"
# Sessions using the rule hold the first shared; edits of the file take the second.
_USERS_LOCK = Path(tempfile.gettempdir()) / "phivault-pgreplica-users.lock"
_EDIT_LOCK = Path(tempfile.gettempdir()) / "phivault-pgreplica-edit.lock"
_DIR_PREFIX = "phivault-pgreplica-"
_NAME_RE = re.compile(r"^phivault_(?:repl|slot)_(\d+)_[0-9a-f]+$")


class ReplicaHarnessError(RuntimeError):
    """The replica could not be set up or did not come up in time (the message says why)."""


def _wait(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (psycopg.Error, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise ReplicaHarnessError(
        f"timed out after {timeout} s waiting for {what}"
        + (f" (last error: {last})" if last else "")
    )


def _free_port() -> int:
    return free_port()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its new parent to reap it does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (postmaster children make themselves group leaders, so a
    process-group kill would miss them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces or parentheses
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


class PgReplica:
    """A hot standby of the primary at ``admin_conninfo`` (a superuser's libpq string).

    ``start()`` makes it the first time (base backup, about a second for a small cluster)
    and starts it; ``stop()``, ``kill()`` and ``restart()`` act on the same data directory
    and port; ``close()`` removes everything. ``host``/``port`` are where it listens,
    ``conninfo`` a superuser connection to it (database of the primary's string), ``url`` the
    same as a SQLAlchemy URL (what ``SqlRecordStore(replica_urls=[...])`` takes; the store
    adds its schema), ``name`` its ``served_by`` name.
    """

    host = "127.0.0.1"

    def __init__(self, admin_conninfo: str = ADMIN_CONNINFO) -> None:
        self.admin_conninfo = admin_conninfo
        params = conninfo_to_dict(admin_conninfo)
        self.dbname = str(params.get("dbname") or "postgres")
        self.superuser = str(params.get("user") or "postgres")
        self.port = _free_port()
        tag = f"{os.getpid()}_{secrets.token_hex(4)}"
        self.role = f"phivault_repl_{tag}"
        self.slot = f"phivault_slot_{tag}"
        self._password = secrets.token_urlsafe(24)
        self.base: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._lock_fd: int | None = None
        self._added_rule = False
        self._made = False
        self._closed = False

    # addresses ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"replica:{self.host}:{self.port}"

    @property
    def conninfo(self) -> str:
        return make_conninfo(
            host=self.host, port=self.port, dbname=self.dbname, user=self.superuser,
            connect_timeout=2,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return URL.create(
            "postgresql+psycopg", username=self.superuser, host=self.host, port=self.port,
            database=self.dbname,
        ).render_as_string(hide_password=False)  # fmt: skip

    @property
    def data(self) -> Path:
        if self.base is None:
            raise ReplicaHarnessError("the replica has not been made yet")
        return self.base / "data"

    @property
    def log_path(self) -> Path | None:
        return None if self.base is None else self.base / "replica.log"

    def log_tail(self, lines: int = 30) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # life cycle ---------------------------------------------------------------------------

    # 90 s: after a SIGKILL, a replica on a loaded machine (load average 10) was still short
    # of a consistent recovery state after 30 s. A bound for a hung start, not a timing.
    def start(self, timeout: float = 90.0) -> None:
        """Make the replica (first call) and start it; returns once it streams from the
        primary and has replayed everything the primary had written when it started."""
        if self._closed:
            raise ReplicaHarnessError("this replica was closed")
        if self.running:
            return
        if not self._made:
            self._make()
        self._launch()
        _wait(self._streaming, timeout, f"the replica on port {self.port} to stream")
        self.wait_replayed(timeout=timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown (SIGINT to the postmaster); SIGKILL whatever is left after
        ``timeout``."""
        process = self._process
        if process is None or process.poll() is not None:
            self._reap()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        self._reap()

    def kill(self) -> None:
        """SIGKILL the postmaster and every process it started at once (a crash)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            doomed = [process.pid, *_children(process.pid)]
            for pid in doomed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait(10)
            _wait(lambda: not any(_alive(p) for p in doomed), 10, "the killed replica to exit")
        self._reap()

    def restart(self, timeout: float = 90.0) -> None:
        self.stop()
        self.start(timeout)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def close(self) -> None:
        """Stop the replica and remove its directory, slot, role and (if this is the last
        session using it) the replication rule. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for step in (self.kill, self._drop_slot, self._drop_role, self._remove_rule):
            try:
                step()
            except Exception as exc:  # every step runs; report them all
                errors.append(f"{step.__name__}: {exc}")
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if errors:
            raise ReplicaHarnessError("replica teardown: " + "; ".join(errors))

    # replay -------------------------------------------------------------------------------

    def pause_replay(self) -> None:
        """Stop applying WAL (it is still received): the replica falls behind from now on."""
        with self._connect() as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
        _wait(
            lambda: self._scalar("SELECT pg_get_wal_replay_pause_state()") == "paused",
            10, "replay to pause",
        )  # fmt: skip

    def resume_replay(self) -> None:
        with self._connect() as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    def replay_paused(self) -> bool:
        return bool(self._scalar("SELECT pg_get_wal_replay_pause_state()") != "not paused")

    def primary_lsn(self) -> int:
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        return _lsn(row[0])

    def replay_lsn(self) -> int:
        return _lsn(str(self._scalar("SELECT pg_last_wal_replay_lsn()::text")))

    def wait_replayed(self, lsn: int | None = None, timeout: float = 60.0) -> None:
        """Wait until the replica has replayed ``lsn`` (default: the primary's position now).

        The bound is generous because a clean-clone CI run on the loaded 2-core machine once
        took over 10 s to replay; a replica that is truly stuck still fails the test."""
        target = self.primary_lsn() if lsn is None else lsn
        _wait(lambda: self.replay_lsn() >= target, timeout, "the replica to catch up")

    # internals ----------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.conninfo, autocommit=True)

    def _scalar(self, query: str) -> Any:
        with self._connect() as conn:
            row = conn.execute(query).fetchone()
        return None if row is None else row[0]

    def _streaming(self) -> bool:
        if self._process is None or self._process.poll() is not None:
            raise ReplicaHarnessError(
                f"the replica exited while starting; its log ends:\n{self.log_tail()}"
            )
        return bool(self._scalar("SELECT status FROM pg_stat_wal_receiver") == "streaming")

    @staticmethod
    def _as_postgres() -> dict[str, Any]:
        """Popen arguments that run a server binary as ``postgres`` when we are root."""
        if os.geteuid() != 0:
            return {}
        entry = pwd.getpwnam("postgres")
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _bin(self) -> Path:
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            row = conn.execute("SHOW server_version_num").fetchone()
        assert row is not None
        major = int(row[0]) // 10000
        path = Path(os.environ.get("PHIVAULT_TEST_PG_BINDIR", f"/usr/lib/postgresql/{major}/bin"))
        if not (path / "pg_basebackup").is_file():
            raise ReplicaHarnessError(
                f"no PostgreSQL {major} binaries in {path} (set PHIVAULT_TEST_PG_BINDIR)"
            )
        return path

    def _make(self) -> None:
        reap_leftovers(self.admin_conninfo)
        bindir = self._bin()
        self._lock_fd = os.open(_USERS_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)  # held while this session uses the rule
        self._make_role()
        self._admit_replication()
        self.base = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-"))
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        primary = conninfo_to_dict(self.admin_conninfo)
        source = make_conninfo(
            host=primary.get("host") or "127.0.0.1", port=primary.get("port") or 5432,
            user=self.role, password=self._password, application_name=self.slot,
        )  # fmt: skip
        backup = [
            str(bindir / "pg_basebackup"), "-d", source, "-D", str(self.data),
            "-X", "stream", "-c", "fast", "-R", "-C", "-S", self.slot, "--no-sync",
        ]  # fmt: skip
        for attempt in range(3):  # the shared server may drop the stream (a restart)
            done = subprocess.run(
                backup, check=False, capture_output=True, timeout=120, **self._as_postgres()
            )
            if done.returncode == 0:
                break
            self._drop_slot()  # made by the failed attempt, if it got that far
            if attempt == 2:
                raise ReplicaHarnessError(
                    "pg_basebackup failed: " + done.stderr.decode(errors="replace").strip()
                )
            require_postgres_back(self.admin_conninfo)
        self._made = True
        self._bindir = bindir
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            limits: dict[str, str] = dict(
                conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                    (list(_AT_LEAST_PRIMARY),),
                ).fetchall()
            )
        self._limits = limits
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )
        (self.data / "pg_ident.conf").write_text("")
        (self.data / "postgresql.conf").write_text("# settings are on the command line\n")
        if os.geteuid() == 0:
            for name in ("pg_hba.conf", "pg_ident.conf", "postgresql.conf"):
                shutil.chown(self.data / name, "postgres", "postgres")

    def _launch(self) -> None:
        assert self.base is not None
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.base),
            "hot_standby": "on",
            "hot_standby_feedback": "on",  # no query cancelled by a recovery conflict
            "fsync": "off",  # a test replica: a crash loses nothing the primary lacks
            "shared_buffers": "32MB",
            "wal_receiver_status_interval": "1s",
            "wal_retrieve_retry_interval": "200ms",
            "logging_collector": "off",
            "log_min_messages": "warning",
            **self._limits,  # a hot standby needs these at least as high as the primary's
        }
        argv = [str(self._bindir / "postgres"), "-D", str(self.data)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        log_path = self.log_path
        assert log_path is not None
        with log_path.open("ab") as log:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, **self._as_postgres(),
            )  # fmt: skip

    def _reap(self) -> None:
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5)

    def _make_role(self) -> None:
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            with contextlib.suppress(
                psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation
            ):
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(GROUP)))
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN REPLICATION PASSWORD {} IN ROLE {}").format(
                    sql.Identifier(self.role), sql.Literal(self._password), sql.Identifier(GROUP)
                )
            )

    def _replication_admitted(self) -> bool:
        primary = conninfo_to_dict(self.admin_conninfo)
        try:
            with psycopg.connect(
                host=primary.get("host") or "127.0.0.1", port=primary.get("port") or 5432,
                user=self.role, password=self._password, replication="true",
                connect_timeout=3, autocommit=True,
            ):  # fmt: skip
                return True
        except psycopg.OperationalError as exc:
            if "pg_hba.conf" in str(exc):
                return False
            raise

    def _admit_replication(self) -> None:
        if self._replication_admitted():
            return
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            row = conn.execute("SHOW hba_file").fetchone()
        hba = Path(str(row[0])) if row else None
        if hba is None or not hba.is_file() or not os.access(hba, os.W_OK):
            raise ReplicaHarnessError(
                "the primary refuses replication connections from 127.0.0.1, and its "
                f"pg_hba.conf ({hba}) is not writable here; add this line and reload:\n"
                f"    {HBA_RULE}"
            )
        with _edit_lock():
            text = hba.read_text()
            if HBA_RULE not in text.splitlines():
                with hba.open("a") as out:
                    out.write(("" if text.endswith("\n") else "\n") + f"{_HBA_MARK}\n{HBA_RULE}\n")
                self._added_rule = True
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        _wait(self._replication_admitted, 10, "the primary to admit replication", 0.05)

    def _drop_slot(self) -> None:
        def dropped() -> bool:
            with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
                ).fetchone()
                if row is None:
                    return True
                if row[0]:  # the walsender notices the replica is gone
                    return False
                conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
                return True

        _wait(dropped, 15, f"replication slot {self.slot} to be released", 0.1)

    def _drop_role(self) -> None:
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(self.role)))

    def _remove_rule(self) -> None:
        """Remove the replication rule and the group if no other session holds the lock."""
        if self._lock_fd is None:
            return
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            row = conn.execute("SHOW hba_file").fetchone()
        hba = Path(str(row[0])) if row else None
        if hba is None or not hba.is_file() or not os.access(hba, os.W_OK):
            return
        try:  # upgrade our shared hold: fails at once while another session runs
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        with _edit_lock():
            lines = hba.read_text().splitlines(keepends=True)
            kept = [line for line in lines if line.rstrip("\n") not in (_HBA_MARK, HBA_RULE)]
            if kept != lines:
                hba.write_text("".join(kept))
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            if kept != lines:
                conn.execute("SELECT pg_reload_conf()")
            with contextlib.suppress(psycopg.Error):  # no session uses the group any more
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(GROUP)))


_AT_LEAST_PRIMARY = (
    "max_connections",
    "max_worker_processes",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
)


@contextlib.contextmanager
def _edit_lock() -> Iterator[None]:
    fd = os.open(_EDIT_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def reap_leftovers(admin_conninfo: str = ADMIN_CONNINFO) -> None:
    """Remove what killed sessions left: their replicas (postmaster and children), temp
    directories, replication slots and roles (all named after the session's pid)."""
    for base in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*"):
        owner = base.name[len(_DIR_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or _alive(int(owner)):
            continue
        pid_file = base / "data" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError):
            postmaster = int(pid_file.read_text().split("\n", 1)[0])
            cmdline = Path(f"/proc/{postmaster}/cmdline").read_bytes()
            if str(base).encode() in cmdline:
                for pid in (postmaster, *_children(postmaster)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
        shutil.rmtree(base, ignore_errors=True)
    with psycopg.connect(admin_conninfo, autocommit=True) as conn:
        for (slot,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE NOT active"
        ).fetchall():
            found = _NAME_RE.match(slot)
            if found and not _alive(int(found.group(1))):
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        for (role,) in conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'phivault\\_repl\\_%'"
        ).fetchall():
            found = _NAME_RE.match(role)
            if found and not _alive(int(found.group(1))):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def require_postgres_back(admin_conninfo: str, timeout: float = 30.0) -> None:
    """Wait until the primary accepts connections again (another test may restart it)."""

    def up() -> bool:
        with psycopg.connect(admin_conninfo, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True

    _wait(up, timeout, "the primary PostgreSQL to accept connections", 0.2)


class _Shared:
    """One replica per test session, however many modules import the fixture."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replica: PgReplica | None = None
        self._users = 0

    def acquire(self, admin: str) -> PgReplica:
        with self._lock:
            if self._replica is None:
                replica = PgReplica(admin)
                try:
                    replica.start()
                except BaseException:
                    with contextlib.suppress(ReplicaHarnessError):
                        replica.close()
                    raise
                self._replica = replica
                atexit.register(self.close)
            self._users += 1
            return self._replica

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
        self.close()

    def close(self) -> None:
        with self._lock:
            replica, self._replica, self._users = self._replica, None, 0
        if replica is not None:
            replica.close()


_SHARED = _Shared()


@pytest.fixture(scope="session")
def pg_replica() -> Iterator[PgReplica]:
    """The session's streaming replica of the test PostgreSQL, running and caught up.

    A test that stops, kills or pauses it must leave it running and replaying (the fixture
    :func:`replica` below restores that after each test)."""
    admin = require_postgres()
    try:
        replica = _SHARED.acquire(admin)
    except ReplicaHarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield replica
    finally:
        _SHARED.release()


@pytest.fixture
def replica(pg_replica: PgReplica) -> Iterator[PgReplica]:
    """:func:`pg_replica` for one test, put back running and replaying afterwards."""
    yield pg_replica
    if not pg_replica.running:
        pg_replica.start()
    elif pg_replica.replay_paused():
        pg_replica.resume_replay()
