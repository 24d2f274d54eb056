"""``phivault`` commands for the CLI tests: each one a real process, forked from a server that
imported phivault once.

A CLI test runs a command as a user does: a process of its own, with its arguments,
environment, working directory, standard input, output and error, and exit code.
``python -m phivault.cli.main`` spends about a second of CPU importing (Typer, pydantic,
cryptography, the command's own modules) before it does anything; the CLI tests start a
couple of hundred commands, about a fifth of the whole suite's CPU. :func:`run_phivault`
instead asks a fork server (this file run as a script, one per test process) for a child:
the child takes the caller's argv, environment, working directory and standard streams and
runs ``phivault.cli.main`` as ``python -m`` would (``runpy``, as ``__main__``); its exit code
comes back as a ``subprocess.CompletedProcess``, like ``subprocess.run``.

What differs from a fresh interpreter: the modules are already imported (phivault reads no
environment or file at import time: STYLE.md), and the environment is applied after that.
The ``phivault`` console script and a cold start are what the e2e tests run (``phivault
serve``, ``init``, ``token``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import locale
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["run_phivault"]

_SERVER_SCRIPT = Path(__file__).resolve()
_MAX_MESSAGE = 1 << 20


class _Client:
    """The fork server of this process, started on first use and stopped at exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    def socket_path(self) -> str:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._start()
            assert self._dir is not None
            return os.path.join(self._dir, "s")

    def _start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="pv-cli-")
        path = os.path.join(self._dir, "s")
        with open(os.path.join(self._dir, "server.log"), "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, str(_SERVER_SCRIPT), path, str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 120
        while not os.path.exists(path):
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = Path(self._dir, "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the phivault fork server did not start:\n{log}")
            time.sleep(0.02)
        atexit.register(self.stop)

    def stop(self) -> None:
        with self._lock:
            process, self._process = self._process, None
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)


_CLIENT = _Client()


def _decode(data: bytes) -> str:
    # as subprocess.run(text=True): the locale's encoding, universal newlines
    text = data.decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def run_phivault(
    args: list[str],
    *,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``phivault ARGS`` as ``subprocess.run([python, -m, phivault.cli.main, *ARGS],
    capture_output=True, text=True, check=False)`` would run it."""
    argv = ["-m", "phivault.cli.main", *args]
    request = {
        "args": list(args),
        "env": dict(os.environ if env is None else env),
        "cwd": str(cwd) if cwd is not None else os.getcwd(),
    }
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryFile() as given,
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn,
    ):
        if stdin is not None:
            given.write(stdin.encode(locale.getpreferredencoding(False)))
            given.seek(0)
        with open(os.devnull, "rb") as devnull:
            source = given if stdin is not None else devnull
            conn.connect(_CLIENT.socket_path())
            socket.send_fds(
                conn, [json.dumps(request).encode()], [source.fileno(), out.fileno(), err.fileno()]
            )
        returncode = _wait(conn, argv, timeout)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            [sys.executable, *argv], returncode, _decode(out.read()), _decode(err.read())
        )


def _wait(conn: socket.socket, argv: list[str], timeout: float) -> int:
    conn.settimeout(timeout)
    pid: int | None = None
    try:
        while True:
            message = conn.recv(_MAX_MESSAGE)
            if not message:  # the child died without saying how: a signal
                return -signal.SIGKILL
            data: dict[str, Any] = json.loads(message)
            if "pid" in data:
                pid = int(data["pid"])
            else:
                return int(data["exit"])
    except TimeoutError:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise subprocess.TimeoutExpired([sys.executable, *argv], timeout) from None


# --- the server (this file run as a script) ---------------------------------------------------


def _preload() -> None:
    """Import every phivault module a command may import lazily (about 2.5 s of CPU, once)."""
    import importlib
    import pkgutil

    import phivault

    for module in pkgutil.walk_packages(phivault.__path__, "phivault."):
        if ".migrations" in module.name or module.name.endswith("__main__"):
            continue  # Alembic runs its migration scripts itself
        importlib.import_module(module.name)


def _child(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become the command, run it, report its exit code, exit."""
    import runpy
    import traceback

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["phivault", *request["args"]]
    sys.path[0] = os.getcwd()  # as python -m has it
    conn.send(json.dumps({"pid": os.getpid()}).encode())
    code: int = 0
    sys.modules.pop("phivault.cli.main", None)  # python -m runs it as __main__ only
    try:
        runpy.run_module("phivault.cli.main", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:  # as the interpreter does with sys.exit("message")
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    # what the interpreter does on its way out: join threads, run atexit handlers
    shutdown = getattr(threading, "_shutdown", None)
    with contextlib.suppress(Exception):
        if shutdown is not None:
            shutdown()
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(OSError):
        conn.send(json.dumps({"exit": code}).encode())
    os._exit(code)


def _reap() -> None:
    """Wait for the children that have exited (their CPU time counts as ours)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass


def _serve(path: str, parent: int) -> None:
    _preload()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path + ".tmp")
        listener.listen(16)
        os.rename(path + ".tmp", path)  # the client waits for this name: we listen
        listener.settimeout(1.0)
        while os.getppid() == parent:  # the test process is gone: so are we
            _reap()
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            message, fds, _flags, _addr = socket.recv_fds(conn, _MAX_MESSAGE, 3)
            request = json.loads(message)
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                listener.close()
                _child(conn, request, fds)
            for fd in fds:
                os.close(fd)
            conn.close()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
