"""Breakers, retries and fallbacks of phivault.resilience (purgatory underneath, real time)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from phivault.errors import StoreUnavailable
from phivault.resilience import (
    Breaker,
    Breakers,
    CallTimedOut,
    CircuitOpen,
    call_with_retries,
    retrying,
)

LONG = 3600.0  # a reset timeout no test reaches: "open" stays open


class Down(StoreUnavailable):
    pass


class Answered(ValueError):
    """The dependency answered with an error of the caller's making: not a failure."""


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


async def _ok() -> str:
    return "ok"


async def _down() -> str:
    raise Down("the dependency is down")


async def _answered() -> str:
    raise Answered("bad request")


OUTCOMES = st.lists(st.sampled_from(["ok", "down", "answered"]), max_size=40)


@settings(max_examples=200, deadline=None)
@given(threshold=st.integers(1, 6), outcomes=OUTCOMES)
def test_a_breaker_opens_exactly_after_threshold_consecutive_failures(
    threshold: int, outcomes: list[str]
) -> None:
    """For any sequence of outcomes: open exactly at the threshold-th consecutive failure,
    and once open, ``fn`` is never called again before the reset timeout."""

    async def scenario() -> None:
        breaker = Breaker("dep", failure_threshold=threshold, reset_timeout_s=LONG)
        consecutive, is_open, failures = 0, False, 0
        for outcome in outcomes:
            called = False

            async def fn(outcome: str = outcome) -> str:
                nonlocal called
                called = True
                return await {"ok": _ok, "down": _down, "answered": _answered}[outcome]()

            if is_open:
                with pytest.raises(CircuitOpen):
                    await breaker.call(fn)
                assert not called
                continue
            if outcome == "ok":
                assert await breaker.call(fn) == "ok"
                consecutive = 0
            elif outcome == "answered":
                with pytest.raises(Answered):
                    await breaker.call(fn)
                consecutive = 0  # the dependency answered: it is up
            else:
                with pytest.raises(Down):
                    await breaker.call(fn)
                consecutive += 1
                failures += 1
                is_open = consecutive >= threshold
            assert called
            assert breaker.state == ("open" if is_open else "closed")
        assert breaker.trips == (1 if is_open else 0)
        assert breaker.failures == failures

    asyncio.run(scenario())


TTL = 0.015
STEPS = st.lists(
    # Pauses of 0, 0.5, 1 ... 2.5 reset timeouts (evenly, rather than hypothesis's float
    # extremes, so that pauses inside and past the timeout both come up).
    st.one_of(
        st.sampled_from(["ok", "down", "answered"]),
        st.integers(0, 5).map(lambda k: k * TTL / 2),
    ),
    max_size=25,
)


@settings(max_examples=30, deadline=None)
@given(threshold=st.integers(1, 4), steps=STEPS)
def test_with_real_time_an_open_breaker_calls_nothing_before_the_reset_timeout(
    threshold: int, steps: list[str | float]
) -> None:
    """For any sequence of outcomes and pauses, on the real clock: while less than the reset
    timeout has surely passed since the breaker opened, ``fn`` is not called; once it surely
    has, the next call is let through as the trial, which closes or reopens it.

    "Surely" brackets each instant between clock readings taken before and after the call
    that opened the breaker and the call being judged, so the test holds on a slow machine.
    """

    async def scenario() -> None:
        breaker = Breaker("dep", failure_threshold=threshold, reset_timeout_s=TTL)
        consecutive = 0
        opened: tuple[float, float] | None = None  # (before, after) the call that opened it
        for step in steps:
            if isinstance(step, float):
                await asyncio.sleep(step)
                continue
            called = False

            async def fn(outcome: str = step) -> str:
                nonlocal called
                called = True
                return await {"ok": _ok, "down": _down, "answered": _answered}[outcome]()

            before = time.time()
            with contextlib.suppress(CircuitOpen, Down, Answered):
                await breaker.call(fn)
            after = time.time()
            if opened is not None:
                if after - opened[0] < TTL:
                    assert not called, "called while surely open"
                if before - opened[1] > TTL:
                    assert called, "refused although the reset timeout surely passed"
                if not called:
                    continue
                # The trial: a failure reopens at once, anything else closes.
                opened = (before, after) if step == "down" else None
                consecutive = 0
                continue
            assert called
            consecutive = consecutive + 1 if step == "down" else 0
            if consecutive >= threshold:
                opened = (before, after)
            assert (breaker.state == "closed") == (opened is None)

    asyncio.run(scenario())


async def test_after_the_reset_timeout_one_trial_closes_or_reopens_the_breaker() -> None:
    breaker = Breaker("dep", failure_threshold=2, reset_timeout_s=0.05)
    for _ in range(2):
        with pytest.raises(Down):
            await breaker.call(_down)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen) as refused:
        await breaker.call(_ok)
    assert 0 < refused.value.retry_after_s <= 0.05
    await asyncio.sleep(0.06)
    assert breaker.state == "half-open"
    with pytest.raises(Down):  # the trial fails: open again at once, no threshold
        await breaker.call(_down)
    assert (breaker.state, breaker.trips) == ("open", 2)
    await asyncio.sleep(0.06)
    assert await breaker.call(_ok) == "ok"
    assert breaker.state == "closed"
    with pytest.raises(Down):  # closed again: counting starts from zero
        await breaker.call(_down)
    assert breaker.state == "closed"


async def test_half_open_lets_one_trial_through_at_a_time() -> None:
    breaker = Breaker("dep", failure_threshold=1, reset_timeout_s=0.03)
    with pytest.raises(Down):
        await breaker.call(_down)
    await asyncio.sleep(0.04)
    release = asyncio.Event()
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "ok"

    trial = asyncio.create_task(breaker.call(slow))
    await asyncio.sleep(0)
    with pytest.raises(CircuitOpen):
        await breaker.call(slow)  # a second caller while the trial runs
    release.set()
    assert await trial == "ok"
    assert (calls, breaker.state, breaker.rejected) == (1, "closed", 1)


async def test_a_call_over_its_time_limit_fails_and_counts() -> None:
    breaker = Breaker("dep", failure_threshold=1, reset_timeout_s=LONG, call_timeout_s=0.02)

    async def hangs() -> str:
        await asyncio.sleep(5)
        return "late"

    started = time.monotonic()
    with pytest.raises(CallTimedOut):
        await breaker.call(hangs)
    assert time.monotonic() - started < 1
    assert (breaker.state, breaker.failures) == ("open", 1)


async def test_a_cancelled_caller_is_no_verdict_on_the_dependency() -> None:
    breaker = Breaker("dep", failure_threshold=1, reset_timeout_s=0.03)
    waiting = asyncio.Event()

    async def forever() -> str:
        waiting.set()
        await asyncio.Event().wait()
        return "never"

    task = asyncio.create_task(breaker.call(forever))
    await waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (breaker.state, breaker.failures) == ("closed", 0)
    # A cancelled half-open trial frees the slot for the next caller.
    with pytest.raises(Down):
        await breaker.call(_down)
    await asyncio.sleep(0.04)
    waiting.clear()
    task = asyncio.create_task(breaker.call(forever))
    await waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state == "half-open"
    assert await breaker.call(_ok) == "ok"
    assert breaker.state == "closed"


async def test_the_context_manager_form_is_one_call() -> None:
    breaker = Breaker("dep", failure_threshold=1, reset_timeout_s=LONG)
    async with breaker.guard():
        pass
    with pytest.raises(OSError):
        async with breaker.guard():
            raise ConnectionRefusedError("refused")
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen):
        async with breaker.guard():
            pytest.fail("the block runs while the breaker is open")


async def test_state_changes_reach_listeners() -> None:
    changes: list[tuple[str, str, str]] = []
    breaker = Breaker(
        "dep",
        failure_threshold=1,
        reset_timeout_s=0.02,
        on_change=lambda n, o, s: changes.append((n, o, s)),
    )
    with pytest.raises(Down):
        await breaker.call(_down)
    await asyncio.sleep(0.03)
    await breaker.call(_ok)
    assert changes == [
        ("dep", "closed", "open"),
        ("dep", "open", "half-open"),
        ("dep", "half-open", "closed"),
    ]


def test_breaker_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="threshold"):
        Breaker("x", failure_threshold=0)
    with pytest.raises(ValueError, match="reset"):
        Breaker("x", reset_timeout_s=0)
    with pytest.raises(ValueError, match="call_timeout"):
        Breaker("x", call_timeout_s=0)


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    value = registry.get_sample_value(name, labels)
    return None if value is None else float(value)


async def test_breakers_export_state_and_counts_as_prometheus_metrics() -> None:
    registry = CollectorRegistry(auto_describe=True)
    breakers = Breakers(registry)
    kms = breakers.breaker("kms", failure_threshold=2, reset_timeout_s=0.03)
    assert breakers.breaker("kms") is kms
    assert _sample(registry, "phivault_breaker_state", breaker="kms") == 0
    for _ in range(2):
        with pytest.raises(Down):
            await kms.call(_down)
    with pytest.raises(CircuitOpen):
        await kms.call(_ok)
    assert _sample(registry, "phivault_breaker_state", breaker="kms") == 2
    assert _sample(registry, "phivault_breaker_trips_total", breaker="kms") == 1
    assert _sample(registry, "phivault_breaker_failures_total", breaker="kms") == 2
    assert _sample(registry, "phivault_breaker_rejected_total", breaker="kms") == 1
    await asyncio.sleep(0.04)
    assert _sample(registry, "phivault_breaker_state", breaker="kms") == 1
    text = generate_latest(registry).decode()
    assert 'phivault_breaker_state{breaker="kms"} 1.0' in text
    with pytest.raises(ValueError, match="already"):
        breakers.add(Breaker("kms"))


async def test_a_fallback_logs_once_on_entering_and_once_on_leaving() -> None:
    registry = CollectorRegistry()
    log = Recorder()
    breakers = Breakers(registry)
    breaker = Breaker("redis", failure_threshold=2, reset_timeout_s=0.05, call_timeout_s=0.5)
    fallback = breakers.fallback("shared-state", breaker, log=log)
    primary_calls = 0
    healthy = False

    async def primary() -> str:
        nonlocal primary_calls
        primary_calls += 1
        if not healthy:
            raise ConnectionRefusedError("refused")
        return "shared"

    async def secondary() -> str:
        return "local"

    results = [await fallback.run(primary, secondary) for _ in range(50)]
    assert results == ["local"] * 50
    assert primary_calls == 2  # then the open breaker keeps it from being called at all
    assert fallback.active and fallback.entered == 1
    assert _sample(registry, "phivault_fallback_active", fallback="shared-state") == 1
    assert [e for e, _ in log.events] == ["fallback.entered"]
    healthy = True
    await asyncio.sleep(0.06)
    assert await fallback.run(primary, secondary) == "shared"
    assert await fallback.run(primary, secondary) == "shared"
    assert [e for e, _ in log.events] == ["fallback.entered", "fallback.left"]
    assert _sample(registry, "phivault_fallback_active", fallback="shared-state") == 0
    assert _sample(registry, "phivault_fallback_entered_total", fallback="shared-state") == 1


async def test_a_fallback_lets_errors_that_are_not_outages_through() -> None:
    fallback = Breakers().fallback("x", Breaker("x"), log=Recorder())

    async def local() -> str:
        return "local"

    with pytest.raises(Answered):
        await fallback.run(_answered, local)
    assert not fallback.active


async def test_retries_are_bounded_by_attempts_and_reraise_the_last_error() -> None:
    calls = 0
    waits: list[float] = []

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        raise Down(f"attempt {calls}")

    async def record(seconds: float) -> None:
        waits.append(seconds)

    with pytest.raises(Down, match="attempt 4"):
        await call_with_retries(
            flaky, attempts=4, initial_backoff_s=0.1, max_backoff_s=0.3, sleep=record
        )
    assert calls == 4 and len(waits) == 3
    # Full jitter: each wait is somewhere in [0, min(cap, initial * 2**n)].
    for n, wait in enumerate(waits):
        assert 0 <= wait <= min(0.3, 0.1 * 2 ** (n + 1))


@settings(max_examples=100, deadline=None)
@given(
    attempts=st.integers(1, 8),
    initial=st.floats(0.001, 2.0),
    cap=st.floats(0.001, 5.0),
    fail_first=st.integers(0, 10),
)
def test_retries_never_exceed_their_bounds(
    attempts: int, initial: float, cap: float, fail_first: int
) -> None:
    """For any bounds: at most ``attempts`` calls, every wait in [0, cap], and the call
    succeeds exactly when it stops failing within the attempts."""

    async def scenario() -> None:
        calls = 0
        waits: list[float] = []

        async def fn() -> str:
            nonlocal calls
            calls += 1
            if calls <= fail_first:
                raise Down("down")
            return "ok"

        async def record(seconds: float) -> None:
            waits.append(seconds)

        try:
            result = await call_with_retries(
                fn,
                attempts=attempts,
                initial_backoff_s=initial,
                max_backoff_s=cap,
                deadline_s=3600,
                sleep=record,
            )
        except Down:
            assert fail_first >= attempts and calls == attempts
        else:
            assert result == "ok" and fail_first < attempts and calls == fail_first + 1
        assert len(waits) == calls - 1
        assert all(0 <= wait <= cap for wait in waits)

    asyncio.run(scenario())


async def test_retries_stop_at_the_deadline() -> None:
    calls = 0

    async def down() -> str:
        nonlocal calls
        calls += 1
        raise Down("down")

    started = time.monotonic()
    with pytest.raises(Down):
        await call_with_retries(
            down, attempts=1000, initial_backoff_s=0.02, max_backoff_s=0.02, deadline_s=0.2
        )
    assert time.monotonic() - started < 0.5
    assert 2 <= calls < 1000


async def test_what_is_not_retried() -> None:
    calls = 0

    async def refused() -> str:
        nonlocal calls
        calls += 1
        raise CircuitOpen("dep", 10)

    with pytest.raises(CircuitOpen):
        await call_with_retries(refused, attempts=5, sleep=lambda _: asyncio.sleep(0))
    with pytest.raises(Answered):
        await call_with_retries(_answered, attempts=5, sleep=lambda _: asyncio.sleep(0))
    assert calls == 1
    with pytest.raises(ValueError, match="attempts"):
        retrying(attempts=0)


async def test_retries_of_a_lambda_through_a_breaker() -> None:
    # Regression: tenacity took a lambda returning a coroutine for a plain function and
    # never ran the coroutine (a webhook alert counted as delivered without a request).
    breaker = Breaker("dep", failure_threshold=10, reset_timeout_s=LONG)
    answers = iter([_down, _ok])
    calls = 0

    async def next_answer() -> str:
        nonlocal calls
        calls += 1
        return await next(answers)()

    result = await call_with_retries(
        lambda: breaker.call(next_answer), attempts=3, sleep=lambda _: asyncio.sleep(0)
    )
    assert (result, calls, breaker.failures) == ("ok", 2, 1)


async def test_retrying_as_an_iterator_and_through_a_breaker() -> None:
    breaker = Breaker("dep", failure_threshold=10, reset_timeout_s=LONG)
    answers = iter([_down, _down, _ok])
    async for attempt in retrying(attempts=3, initial_backoff_s=0.001, max_backoff_s=0.001):
        with attempt:
            result = await breaker.call(next(answers))
    assert result == "ok"
    assert (breaker.failures, breaker.state) == (2, "closed")
