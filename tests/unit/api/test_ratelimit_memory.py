"""The in-memory rate limit counters answer as the ``limits`` library's memory storage does
(the same sliding window counter): the library, driven by the same clock, is the oracle."""

from __future__ import annotations

import random
import time

import pytest
from limits import parse
from limits.aio.storage import MemoryStorage

from phivault.api.ratelimit import Limited, RateLimiter, _Counters, _MemoryCounters


class FakeClock:
    def __init__(self, start: float) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_memory_counters_answer_as_the_library(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    clock = FakeClock(1_800_000_000.0 + rng.random() * 60)
    monkeypatch.setattr(time, "time", clock)  # the library reads time.time()
    address, principal = parse("7/minute"), parse("4/10 seconds")
    ours = _MemoryCounters(address, principal, clock=clock)
    library = _Counters(MemoryStorage(), address, principal)
    answers: list[Limited | None] = []
    for _ in range(1500):
        clock.t += rng.choice([0.0, 0.01, 0.5, 1.0, 2.5, 7.0, 13.0, 61.0, 150.0])
        who = rng.choice(["10.0.0.1", "10.0.0.2", "::1"])
        credential = rng.choice([None, "a" * 32, "b" * 32])
        expected = await library.check(who, credential)
        got = await ours.check(who, credential)
        assert got == expected, (clock.t, who, credential)
        answers.append(got)
    # The run exercised both limits and the allowed path.
    assert {a.limit for a in answers if a is not None} == {"address", "principal"}
    assert any(a is None for a in answers)


async def test_memory_counters_forget_old_windows() -> None:
    clock = FakeClock(1_800_000_000.0)
    ours = _MemoryCounters(parse("2/minute"), parse("2/minute"), clock=clock)
    for n in range(100):
        assert await ours.check(f"10.0.{n}.1", None) is None
    clock.t += 180  # two windows later nothing of them can count
    assert await ours.check("10.0.0.1", None) is None
    assert len(ours._windows) == 1


async def test_in_memory_limiter_refuses_with_retry_after() -> None:
    limiter = RateLimiter.in_memory(per_address="100/minute", per_principal="2/minute")
    assert await limiter.ping()
    assert await limiter.check(address="10.0.0.1", credential="c" * 32) is None
    assert await limiter.check(address="10.0.0.1", credential="c" * 32) is None
    refused = await limiter.check(address="10.0.0.1", credential="c" * 32)
    assert refused is not None and refused.limit == "principal"
    assert 1 <= refused.retry_after_s <= 60
    # Another credential from the same address has its own counter.
    assert await limiter.check(address="10.0.0.1", credential="d" * 32) is None
