"""The read path's hand-off to the storage threads (``records.storage_threads._reading``)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import pytest

from phivault.records.storage_threads import _reading

_WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


async def test_the_work_runs_on_a_storage_thread_in_the_callers_context() -> None:
    _WHO.set("caller-1")
    loop_thread = threading.get_ident()

    def work() -> tuple[str, int]:
        return _WHO.get(), threading.get_ident()

    who, thread = await _reading(work)
    assert who == "caller-1"
    assert thread != loop_thread


async def test_an_exception_of_the_work_reaches_the_caller() -> None:
    class Boom(Exception):
        pass

    def work() -> None:
        raise Boom("store down")

    with pytest.raises(Boom, match="store down"):
        await _reading(work)


async def test_a_cancelled_caller_stops_waiting_and_the_work_runs_to_its_end() -> None:
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def work() -> str:
        started.set()
        release.wait(10)
        finished.set()
        return "late"

    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    task = asyncio.create_task(_reading(work))
    await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await asyncio.to_thread(finished.wait, 10)
    assert finished.is_set()
    await asyncio.sleep(0.05)
    assert errors == []  # the late result is dropped without an error on the loop


async def test_many_concurrent_reads_each_get_their_own_result() -> None:
    results = await asyncio.gather(*(_reading(lambda n=n: n * n) for n in range(200)))
    assert results == [n * n for n in range(200)]


async def test_a_read_whose_caller_left_before_it_began_is_skipped() -> None:
    from phivault._handoff import run_and_settle

    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    future.cancel()
    ran: list[bool] = []
    run_and_settle(loop, future, lambda: str(ran.append(True)), contextvars.copy_context())
    assert ran == []


async def test_point_reads_of_one_turn_share_a_thread_and_keep_their_own_outcomes() -> None:
    from phivault.records.storage_threads import _ReadBatches

    batches = _ReadBatches()
    threads: list[int] = []

    def read(n: int) -> int:
        threads.append(threading.get_ident())
        if n == 3:
            raise KeyError("not there")
        return n * 10

    async def one(n: int) -> int:
        _WHO.set(f"caller-{n}")
        who = await batches.add(lambda: (read(n), _WHO.get()))
        assert who[1] == f"caller-{n}"  # each read ran in its own caller's context
        return who[0]

    results = await asyncio.gather(*(one(n) for n in range(6)), return_exceptions=True)
    assert [r if not isinstance(r, Exception) else "error" for r in results] == [
        0, 10, 20, "error", 40, 50,
    ]  # fmt: skip
    assert isinstance(results[3], KeyError)
    assert len(set(threads)) == 1  # one hand-off for the six


async def test_a_batched_read_whose_caller_left_is_skipped() -> None:
    from phivault.records.storage_threads import _ReadBatches

    batches = _ReadBatches()
    ran: list[int] = []
    kept = batches.add(lambda: ran.append(1))
    dropped = batches.add(lambda: ran.append(2))
    dropped.cancel()
    await kept
    assert ran == [1]


class _GroupingStore:
    """A store's write_units seam: records each batch it is given, runs every unit (with no
    unit of work: the units here ignore it), and returns each one's exception."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.threads: list[int] = []

    def write_units(self, works: list[Any], *, session: str | None = None) -> list[Any]:
        self.batches.append(len(works))
        self.threads.append(threading.get_ident())
        errors: list[Any] = []
        for work in works:
            try:
                work(None)
            except Exception as exc:
                errors.append(exc)
            else:
                errors.append(None)
        return errors


async def test_write_units_of_one_turn_go_to_the_store_together_each_with_its_outcome() -> None:
    from phivault.records.storage_threads import _WriteBatches

    store = _GroupingStore()
    batches = _WriteBatches(store)  # type: ignore[arg-type]
    seen: dict[int, str] = {}

    def unit(n: int) -> Any:
        def work(_uow: object) -> None:
            seen[n] = _WHO.get()  # each unit runs in its own caller's context
            if n == 2:
                raise KeyError("conflict")

        return work

    async def one(n: int) -> None:
        _WHO.set(f"caller-{n}")
        await batches.add(unit(n))

    results = await asyncio.gather(*(one(n) for n in range(5)), return_exceptions=True)
    assert [isinstance(r, KeyError) for r in results] == [False, False, True, False, False]
    assert seen == {n: f"caller-{n}" for n in range(5)}
    assert store.batches == [5]  # one hand-off, one call to the store, for the five
    assert store.threads[0] != threading.get_ident()


async def test_a_write_unit_whose_caller_left_before_its_batch_began_is_not_written() -> None:
    from phivault.records.storage_threads import _WriteBatches

    store = _GroupingStore()
    batches = _WriteBatches(store)  # type: ignore[arg-type]
    ran: list[int] = []
    kept = batches.add(lambda _uow: ran.append(1))
    dropped = batches.add(lambda _uow: ran.append(2))
    dropped.cancel()
    await kept
    assert ran == [1] and store.batches == [1]


async def test_write_units_that_come_while_a_batch_is_written_go_together_after_it() -> None:
    from phivault.records.storage_threads import _WriteBatches

    release = threading.Event()

    class _SlowStore(_GroupingStore):
        def write_units(self, works: list[Any], *, session: str | None = None) -> list[Any]:
            if not self.batches:
                release.wait(10)  # the first batch is still on its thread
            return super().write_units(works, session=session)

    store = _SlowStore()
    batches = _WriteBatches(store)  # type: ignore[arg-type]
    ran: list[int] = []

    def failing(_uow: object) -> None:
        raise KeyError("conflict")

    first = batches.add(lambda _uow: ran.append(0))
    await asyncio.sleep(0.05)  # the first batch is on its thread, waiting
    later = [batches.add(lambda _uow, n=n: ran.append(n)) for n in (1, 2)]
    await asyncio.sleep(0)
    later.append(batches.add(failing))
    await asyncio.sleep(0.05)
    assert store.batches == []  # nothing more went to a thread meanwhile
    release.set()
    await first
    await asyncio.gather(*later[:2])
    with pytest.raises(KeyError):
        await later[2]
    assert ran == [0, 1, 2]
    assert store.batches == [1, 3]  # one hand-off for the three that came meanwhile


async def test_with_two_batches_in_flight_the_second_goes_at_once_and_the_third_waits() -> None:
    """PostgreSQL's grouped creates: ``in_flight`` batches of a loop on threads side by side;
    what comes while all are busy waits and goes as one batch when one of them ends."""
    from phivault.records.storage_threads import _WriteBatches

    release = threading.Event()

    class _HeldStore(_GroupingStore):
        def write_units(self, works: list[Any], *, session: str | None = None) -> list[Any]:
            outcomes = super().write_units(works, session=session)
            if len(self.batches) <= 2:
                release.wait(10)  # the first two batches stay on their threads
            return outcomes

    store = _HeldStore()
    batches = _WriteBatches(store, in_flight=2)  # type: ignore[arg-type]
    first = batches.add(lambda _uow: None)
    await asyncio.sleep(0.05)
    second = batches.add(lambda _uow: None)
    await asyncio.sleep(0.05)
    assert store.batches == [1, 1]  # side by side
    later = [batches.add(lambda _uow: None) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert store.batches == [1, 1]  # both slots taken: these wait on the loop
    release.set()
    await asyncio.gather(first, second, *later)
    assert store.batches == [1, 1, 3]


async def test_a_batch_that_breaks_the_store_fails_its_units_and_later_writes_go_on() -> None:
    """A store that answers a batch wrongly (here: too few outcomes) fails that batch's
    callers; the loop's later writes are not left waiting behind it."""
    from phivault.records.storage_threads import _WriteBatches

    class _BrokenOnceStore(_GroupingStore):
        def write_units(self, works: list[Any], *, session: str | None = None) -> list[Any]:
            outcomes = super().write_units(works, session=session)
            return outcomes[:-1] if len(self.batches) == 1 else outcomes

    store = _BrokenOnceStore()
    batches = _WriteBatches(store)  # type: ignore[arg-type]
    broken = [batches.add(lambda _uow: None) for _ in range(2)]
    for future in broken:
        with pytest.raises(ValueError):
            await future
    await asyncio.wait_for(batches.add(lambda _uow: None), 5)
    assert store.batches == [2, 1]


async def test_reads_of_later_turns_queue_behind_a_running_batch_and_its_thread_takes_them() -> (
    None
):
    from phivault.records.storage_threads import _ReadBatches

    batches = _ReadBatches()
    release = threading.Event()
    threads: list[int] = []

    def read(n: int) -> int:
        threads.append(threading.get_ident())
        if n == 0:
            release.wait(5)  # the first batch is still running while the others arrive
        return n

    first = batches.add(lambda: read(0))
    later = []
    for n in range(1, 4):
        await asyncio.sleep(0.01)  # a later turn of the loop: a batch of its own
        later.append(batches.add(lambda n=n: read(n)))
    await asyncio.sleep(0.01)  # the last one flushed into the queue too, before the release
    release.set()
    assert await first == 0
    assert await asyncio.gather(*later) == [1, 2, 3]
    assert len(set(threads)) == 1  # one thread drained the queued batches
    assert await batches.add(lambda: read(4)) == 4  # and a read after the drain is served


async def test_queued_reads_fail_with_their_drainer_instead_of_waiting_forever(
    monkeypatch: Any,
) -> None:
    from phivault.records import storage_threads

    batches = storage_threads._ReadBatches()
    running = threading.Event()
    release = threading.Event()
    real_run_batch = storage_threads._run_batch

    def failing_run_batch(loop: Any, batch: Any) -> None:
        running.set()
        release.wait(5)
        raise MemoryError("the drainer itself failed")

    monkeypatch.setattr(storage_threads, "_run_batch", failing_run_batch)
    first = batches.add(lambda: 1)
    await asyncio.to_thread(running.wait, 5)
    queued = batches.add(lambda: 2)
    await asyncio.sleep(0.01)  # flushed into the running drainer's queue
    release.set()
    for waiting in (first, queued):
        with pytest.raises(MemoryError):
            await asyncio.wait_for(waiting, 5)
    monkeypatch.setattr(storage_threads, "_run_batch", real_run_batch)
    assert await batches.add(lambda: 3) == 3  # the next read starts a new drainer
