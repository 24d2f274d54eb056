"""The records repository's storage threads: how its async methods reach the synchronous store.

Why a module of its own: this is a concurrency mechanism, not records logic. Storage calls
are synchronous (SQLAlchemy) and run on the process's own worker threads
(:func:`_storage_executor`, never at import), so that the event loop never waits on a
database and no transaction is held across an ``await``. :func:`_blocking` and
:func:`_reading` hand one call over; :class:`_ReadBatches` (SQLite point reads),
:class:`_PointReads` (PostgreSQL point reads, served as one batch) and :class:`_WriteBatches`
(write units, for the store's group commit; both are :class:`_TurnBatches`) hand over all
that one turn of the event loop asks for at once, because each hand-off costs thread and
loop wake-ups
(docs/decisions/read-path-cpu.md, records-storage.md, records-group-commit.md). Every call
runs in its caller's context (context variables); one that fails fails only its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from phivault._handoff import run_and_settle, settle_all
from phivault.records.store.ports import RecordStore, RecordUnitOfWork

__all__ = ["STORAGE_THREADS"]


_T = TypeVar("_T")


#: Worker threads for storage calls, as many as anyio's default thread limiter allowed.
STORAGE_THREADS: Final = 40


@functools.cache
def _storage_executor(pid: int) -> ThreadPoolExecutor:
    """The process's storage threads, made on first use (never at import); its threads
    start as they are needed and serve every event loop of the process. Keyed by process:
    a forked child gets its own (the parent's threads do not exist there)."""
    del pid
    return ThreadPoolExecutor(STORAGE_THREADS, thread_name_prefix="records")


async def _blocking(work: Callable[[], _T]) -> _T:
    """Run storage work on a worker thread: the event loop never waits on a database.

    A dedicated executor, not ``anyio.to_thread``: a bare hop costs less than half the CPU
    (33 against 78 us with 16 callers, measured side by side). The semantics are anyio's
    under asyncio cancellation: the caller's context variables go with the work, and a
    cancelled caller stops waiting while the work runs to its end in its thread
    (``_apply`` shields what must not be abandoned)."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    return await loop.run_in_executor(_storage_executor(os.getpid()), context.run, work)


async def _reading(work: Callable[[], _T]) -> _T:
    """:func:`_blocking` for reads, with a leaner hand-off: the worker thread settles the
    caller's asyncio future itself (one ``call_soon_threadsafe``), instead of the executor's
    future being chained to an asyncio one (``run_in_executor``), which cost a read about
    seventy Python calls on the event loop. The same threads, the caller's context
    variables go with the work, and a cancelled caller stops waiting: a read that has begun
    runs to its end and its result is dropped, one that has not is skipped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()
    context = contextvars.copy_context()
    _storage_executor(os.getpid()).submit(run_and_settle, loop, future, work, context)
    return await future


# A point read waiting for a storage thread: the work, its caller's future and context.
_BatchedRead = tuple[Callable[[], Any], "asyncio.Future[Any]", contextvars.Context]


class _ReadBatches:
    """The point reads that one turn of the event loop asks for, run by one storage thread
    one after another, their futures settled by one ``call_soon_threadsafe``.

    Each hand-off to a thread costs a wake-up of the thread, a wake-up of the event loop and
    the GIL passed both ways; concurrent reads arrive together (their previous steps end
    together, on one group commit of the ledger), so a batch of them pays that once. Only
    for SQLite, whose point reads take a few hundred microseconds under the GIL either way;
    PostgreSQL's are served together instead (:class:`_PointReads`). Every read runs in its
    caller's context; one that fails fails only its caller; a caller that left before its
    read began is skipped.

    While a loop's batch runs, the batches of later turns queue behind it and the same
    thread drains them (:meth:`_drain`): reads arriving spread out (an open loop) would
    otherwise each wake a thread of their own, and those threads would queue for the GIL
    beside the event loop (``docs/decisions/read-path-cpu.md``)."""

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[_BatchedRead]] = {}
        # Per loop with a draining thread: the reads handed over that it has not taken yet.
        # The loop adds to it and the thread takes from it, both under the lock.
        self._queued: dict[asyncio.AbstractEventLoop, list[_BatchedRead]] = {}
        self._lock = threading.Lock()

    def add(self, work: Callable[[], _T]) -> asyncio.Future[_T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._flush, loop)
        pending.append((work, future, contextvars.copy_context()))
        return future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._pending.pop(loop, [])
        if not batch:
            return
        with self._lock:
            queued = self._queued.get(loop)
            if queued is not None:  # a thread is draining this loop's reads: it takes these
                queued.extend(batch)
                return
            self._queued[loop] = []
        try:
            _storage_executor(os.getpid()).submit(self._drain, loop, batch)
        except BaseException:
            with self._lock:
                del self._queued[loop]
            raise

    def _drain(self, loop: asyncio.AbstractEventLoop, batch: list[_BatchedRead]) -> None:
        """On a storage thread: run ``batch``, then whatever queued meanwhile, until none."""
        try:
            while True:
                _run_batch(loop, batch)
                with self._lock:
                    batch = self._queued[loop]
                    if not batch:
                        del self._queued[loop]
                        return
                    self._queued[loop] = []
        except BaseException as exc:  # not a read's own failure (that goes to its caller):
            # the reads of this batch and those queued behind it fail with it
            with self._lock:
                left = self._queued.pop(loop, [])
            failed: list[tuple[asyncio.Future[Any], Any, BaseException | None]]
            failed = [(future, None, exc) for _, future, _ in (*batch, *left)]
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
                loop.call_soon_threadsafe(settle_all, failed)
            raise


#: What serves a batch of point reads on a storage thread: each request with its caller's
#: context in, each one's outcome (a result, or the exception for that caller alone) out, in
#: the same order.
ReadOutcome = tuple[Any, BaseException | None]
ServeReads = Callable[[list[tuple[Any, contextvars.Context]]], list[ReadOutcome]]
#: The same for any batch of :class:`_TurnBatches`.
ServeBatch = ServeReads


class _TurnBatches:
    """Work that the turns of an event loop hand over, sent to storage threads in batches:
    what one turn asks for goes together, at most ``in_flight`` batches of a loop are on
    threads at once, and what comes meanwhile waits on the loop and goes together when one
    is back (so under load a batch grows instead of more of them queueing for threads and
    pooled connections); a batch holds at most ``most`` items (None: no limit). On its thread
    ``serve`` gets each live item with its caller's context and answers each one's outcome
    (a result, or the exception for that caller alone), in order; the futures of a batch are
    settled by one ``call_soon_threadsafe``.

    A caller that left before its batch began is skipped (``serve`` never sees it); a failure
    of ``serve`` itself fails every item of its batch."""

    def __init__(self, serve: ServeBatch, *, in_flight: int, most: int | None) -> None:
        if in_flight < 1 or (most is not None and most < 1):
            raise ValueError("a batch needs room for one item, and one batch in flight")
        self._serve = serve
        self._in_flight = in_flight
        self._most = most
        self._pending: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
        self._flushing: set[asyncio.AbstractEventLoop] = set()  # a flush is scheduled
        self._running: dict[asyncio.AbstractEventLoop, int] = {}  # batches on threads

    def add(self, request: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.setdefault(loop, []).append((request, future, contextvars.copy_context()))
        if loop not in self._flushing and self._running.get(loop, 0) < self._in_flight:
            self._flushing.add(loop)
            loop.call_soon(self._flush, loop)
        return future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop: send what waits, in batches of at most ``most``, while fewer than
        ``in_flight`` are on threads (the rest goes when one comes back: :meth:`_served`)."""
        self._flushing.discard(loop)
        pending = self._pending.get(loop)
        while pending and self._running.get(loop, 0) < self._in_flight:
            cut = len(pending) if self._most is None else self._most
            batch, pending[:] = pending[:cut], pending[cut:]
            self._running[loop] = self._running.get(loop, 0) + 1
            try:
                _storage_executor(os.getpid()).submit(self._run, loop, batch)
            except BaseException as exc:  # (the executor is shut down): these fail
                self._done(loop)
                settle_all([(future, None, exc) for _, future, _ in batch])
        if not pending:
            self._pending.pop(loop, None)

    def _done(self, loop: asyncio.AbstractEventLoop) -> None:
        left = self._running[loop] - 1
        if left:
            self._running[loop] = left
        else:
            del self._running[loop]

    def _served(
        self,
        loop: asyncio.AbstractEventLoop,
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]],
    ) -> None:
        """On the loop: settle a batch's futures, then send what came meanwhile."""
        self._done(loop)
        settle_all(outcomes)
        self._flush(loop)

    def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        """On a storage thread: serve the batch's live items, then settle their futures."""
        live = [item for item in batch if not item[1].cancelled()]
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]
        try:
            served = (
                self._serve([(request, context) for request, _, context in live]) if live else []
            )
            outcomes = [
                (future, result, error)
                for (_, future, _), (result, error) in zip(live, served, strict=True)
            ]
        except BaseException as exc:  # not an item's own failure: every one of them fails
            outcomes = [(future, None, exc) for _, future, _ in live]
        # Always handed back, whatever happened above: until it is, this batch counts as in
        # flight, and the loop's later items would wait for ever once enough of them did.
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(self._served, loop, outcomes)


#: An item waiting for its batch: the request, its caller's future and context.
_Request = tuple[Any, "asyncio.Future[Any]", contextvars.Context]


class _PointReads(_TurnBatches):
    """PostgreSQL point reads: those that one turn of the event loop asks for go to a storage
    thread together, where ``serve`` runs them as one batch (the repository: one unit of work
    and one statement for them all).

    Each read alone cost a thread hand-off, a pool checkout and a statement, and the backend
    spent more CPU on one prepared point read than on eight in one statement
    (docs/decisions/records-storage.md, "Point reads of one turn"). Several batches in flight,
    not one as SQLite: each waits on the network. Every read is served in its caller's
    context where it runs alone (``serve`` gets the contexts); one that fails fails only its
    caller."""

    def __init__(self, serve: ServeReads, *, in_flight: int = 2, most: int = 64) -> None:
        super().__init__(serve, in_flight=in_flight, most=most)


class _WriteBatches(_TurnBatches):
    """The write units of an event loop, handed to storage threads in batches
    (:meth:`RecordStore.write_units`). Concurrent creates reach their commit together (their
    intents were recorded by one group commit of the ledger), and SQLite writes them as one
    group anyway: one thread waiting for the group, instead of one per write, each woken apart.

    While a batch is on its thread, the units that come meanwhile wait on the loop and go
    together as the next batch when it is done: they would wait for its group at the store
    anyway, and each batch costs a thread hand-off, so at a paced rate (one create a turn of
    the loop) a hand-off serves a whole group instead of each create (records-group-commit.md).

    Every unit runs in its caller's context; one that fails fails only its caller; a
    caller that left before its batch began is skipped (nothing of it is written).

    ``in_flight``: batches of a loop on threads at once (SQLite: 1, its writers take turns
    anyway; PostgreSQL writes batches side by side, and a batch's round trips one after
    another would otherwise bound a worker's writes by one connection's latency)."""

    def __init__(self, store: RecordStore, *, in_flight: int = 1) -> None:
        self._store = store
        super().__init__(self._write, in_flight=in_flight, most=None)

    def add(self, unit: Callable[[RecordUnitOfWork], None]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = super().add(unit)
        return future

    def _write(self, items: list[tuple[Any, contextvars.Context]]) -> list[ReadOutcome]:
        """On a storage thread: the batch's units as one call to the store."""
        works = [functools.partial(_in_context, context, unit) for unit, context in items]
        return [(None, error) for error in self._store.write_units(works)]


def _in_context(
    context: contextvars.Context, unit: Callable[[RecordUnitOfWork], None], uow: RecordUnitOfWork
) -> None:
    context.run(unit, uow)


def _run_batch(loop: asyncio.AbstractEventLoop, batch: list[_BatchedRead]) -> None:
    """On a storage thread: each read of ``batch`` in its caller's context, then settle."""
    outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
    for work, future, context in batch:
        if future.cancelled():
            continue
        try:
            outcomes.append((future, context.run(work), None))
        except BaseException as exc:  # handed to its caller only
            outcomes.append((future, None, exc))
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
        loop.call_soon_threadsafe(settle_all, outcomes)
