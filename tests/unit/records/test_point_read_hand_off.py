"""The hand-off of PostgreSQL point reads (``_PointReads``): the reads of one turn go to a
storage thread as one batch, at most ``in_flight`` batches of a loop at once, those that come
meanwhile together after; each caller gets its own outcome. The serving function here is the
seam the repository fills (``_serve_reads``); the database side is tested on the real store
(tests/integration/records/test_records_point_read_batches.py)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import pytest

from phivault.records.storage_threads import ReadOutcome, _PointReads

_WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


class _Serving:
    """Serves each request n as n * 10 (KeyError for 3), in its caller's context; may hold
    every batch until released."""

    def __init__(self, *, hold: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, reads: list[tuple[Any, contextvars.Context]]) -> list[ReadOutcome]:
        self.batches.append([n for n, _ in reads])
        self.release.wait(10)
        return [context.run(self._one, n) for n, context in reads]

    @staticmethod
    def _one(n: int) -> ReadOutcome:
        if n == 3:
            return None, KeyError("not there")
        return (n * 10, _WHO.get()), None


async def _one(reads: _PointReads, n: int) -> int:
    _WHO.set(f"caller-{n}")
    value, who = await reads.add(n)
    assert who == f"caller-{n}"  # served in its own caller's context
    assert isinstance(value, int)
    return value


async def test_reads_of_one_turn_are_one_batch_and_keep_their_own_outcomes() -> None:
    serving = _Serving()
    reads = _PointReads(serving)
    results = await asyncio.gather(*(_one(reads, n) for n in range(6)), return_exceptions=True)
    assert results[:3] == [0, 10, 20] and results[4:] == [40, 50]
    assert isinstance(results[3], KeyError)
    assert serving.batches == [[0, 1, 2, 3, 4, 5]]


async def test_reads_that_come_while_batches_are_in_flight_go_together_after() -> None:
    serving = _Serving(hold=True)
    reads = _PointReads(serving, in_flight=1, most=3)
    first = [asyncio.ensure_future(_one(reads, n)) for n in (0, 1, 2, 4)]
    await asyncio.sleep(0.05)  # the first batch (three) is on its thread, held there
    later = [asyncio.ensure_future(_one(reads, n)) for n in (5, 6)]
    await asyncio.sleep(0.05)
    assert serving.batches == [[0, 1, 2]]  # one in flight: the rest waits on the loop
    serving.release.set()
    assert await asyncio.gather(*first, *later) == [0, 10, 20, 40, 50, 60]
    assert serving.batches == [[0, 1, 2], [4, 5, 6]]


async def test_a_caller_that_left_before_its_batch_began_is_skipped() -> None:
    serving = _Serving()
    reads = _PointReads(serving)
    kept = asyncio.ensure_future(_one(reads, 1))
    dropped = reads.add(2)
    dropped.cancel()
    assert await kept == 10
    assert serving.batches == [[1]]


async def test_a_failure_of_the_serving_fails_its_batch_and_later_reads_go_on() -> None:
    calls: list[int] = []

    def serve(batch: list[tuple[Any, contextvars.Context]]) -> list[ReadOutcome]:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("the store broke")
        return [(n, None) for n, _ in batch]

    reads = _PointReads(serve, in_flight=1)
    broken = await asyncio.gather(reads.add(1), reads.add(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in broken)
    assert await asyncio.gather(reads.add(3), reads.add(4)) == [3, 4]


async def test_a_serving_that_answers_the_wrong_number_fails_the_batch() -> None:
    reads = _PointReads(lambda batch: [])
    with pytest.raises(ValueError, match="zip"):
        await reads.add(1)
