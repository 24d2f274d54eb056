"""Several worker processes behind one listening socket (``phivault serve --workers N``).

Why our own supervisor rather than uvicorn's: uvicorn's workers import the app by name, but
a phivault worker is a whole composed service (audit sink, key ring, records store, policy)
opened by :func:`~phivault.api.serve.open_service` before it serves and closed after. So
the parent binds the socket once, starts N spawned processes that each open the service and
serve on that socket (the kernel spreads connections between them), restarts a worker that
dies, and stops them all on SIGINT or SIGTERM.

Workers share nothing in memory: rate limits, the DPoP replay cache and sessions live in
Redis, audit events go to the JetStream stream, records and keys to PostgreSQL. That is why
``--workers`` above 1 needs the scaled shape (``ShapeSettings.scaled``). A worker that dies
mid-transaction leaves its transaction rolled back by the database and its audit intent open;
the intent reconciler of the surviving workers settles it.
"""

from __future__ import annotations

import multiprocessing
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Final

import structlog

from phivault.errors import ConfigurationError

if TYPE_CHECKING:
    from phivault.api.serve import ServeOptions
    from phivault.settings import Settings

__all__ = ["WorkersFailed", "run_workers"]

_log = structlog.get_logger("phivault.workers")

# A worker that dies this soon after it started, this many times in a row, is not going to
# come up (bad settings, a service down at start): stop rather than restart forever.
_EARLY_DEATH_S: Final = 10.0
_EARLY_DEATHS_TO_GIVE_UP: Final = 3
_STOP_GRACE_S: Final = 20.0
_POLL_S: Final = 0.25


class WorkersFailed(ConfigurationError):
    """The workers keep dying at start: the server cannot run as configured."""


@dataclass(slots=True)
class _Worker:
    number: int
    process: BaseProcess
    started: float
    early_deaths: int = 0


@dataclass(slots=True)
class _Supervisor:
    settings: Settings
    data_dir: Path
    options: ServeOptions
    listener: socket.socket
    metrics_dir: Path
    workers: dict[int, _Worker] = field(default_factory=dict)
    stopping: bool = False

    def start(self, number: int, early_deaths: int = 0) -> None:
        context = multiprocessing.get_context("spawn")
        process = context.Process(
            target=_worker_main,
            args=(self.settings, self.data_dir, self.options, self.listener),
            kwargs={"number": number, "metrics_dir": self.metrics_dir},
            name=f"phivault-worker-{number}",
            daemon=False,
        )
        process.start()
        self.workers[number] = _Worker(number, process, time.monotonic(), early_deaths)
        _log.info("worker started", worker=number, pid=process.pid)

    def watch(self) -> None:
        """Restart workers that died, until asked to stop."""
        while not self.stopping:
            for number, worker in list(self.workers.items()):
                if worker.process.is_alive():
                    continue
                lived = time.monotonic() - worker.started
                deaths = worker.early_deaths + 1 if lived < _EARLY_DEATH_S else 0
                _log.warning(
                    "worker died", worker=number, exit_code=worker.process.exitcode, lived_s=lived
                )
                if deaths >= _EARLY_DEATHS_TO_GIVE_UP:
                    raise WorkersFailed(
                        f"worker {number} died {deaths} times within {_EARLY_DEATH_S:.0f} s "
                        "of starting; see its log above"
                    )
                self.start(number, deaths)
            time.sleep(_POLL_S)

    def stop(self) -> None:
        self.stopping = True
        for worker in self.workers.values():
            if worker.process.is_alive():
                worker.process.terminate()  # SIGTERM: uvicorn finishes requests in flight
        deadline = time.monotonic() + _STOP_GRACE_S
        for worker in self.workers.values():
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()


def run_workers(
    settings: Settings,
    data_dir: Path,
    options: ServeOptions,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve with ``options.workers`` processes until SIGINT or SIGTERM."""
    listener = socket.create_server((options.host, options.port), backlog=2048)
    listener.set_inheritable(True)
    # Where the workers exchange their metrics (so /metrics answers for all of them):
    # private to this server's user, and gone when the server stops.
    metrics_dir = Path(tempfile.mkdtemp(prefix="phivault-metrics-"))
    supervisor = _Supervisor(settings, data_dir, options, listener, metrics_dir)

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        supervisor.stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for number in range(options.workers):
            supervisor.start(number)
        if on_ready is not None:
            scheme = "https" if options.tls_cert is not None else "http"
            on_ready(f"{scheme}://{options.host}:{listener.getsockname()[1]}")
        supervisor.watch()
    finally:
        supervisor.stop()
        listener.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _worker_main(
    settings: Settings,
    data_dir: Path,
    options: ServeOptions,
    listener: socket.socket,
    *,
    number: int,
    metrics_dir: Path,
) -> None:
    """One worker: open the service on its own and serve on the shared socket."""
    from phivault.api.serve import serve_on_socket
    from phivault.datadir import DataDir

    serve_on_socket(
        settings, DataDir.open(data_dir), options, listener, worker=number, metrics_dir=metrics_dir
    )
