"""Circuit breakers, bounded retries and fallbacks around the services phivault depends on.

Why: a dependency that is down (an HSM, a KMS, Redis, a webhook) must cost a request nothing
once it is known to be down, and must be tried again by itself once it may be back. A
:class:`Breaker` counts consecutive failures of calls to one dependency; at the threshold it
*opens* and refuses calls at once (:class:`CircuitOpen`, a :class:`StoreUnavailable`, so the
API answers 503) until the reset timeout has passed; then one trial call is let through
(*half-open*): success closes it, failure opens it again. Every call also has a time limit
(:class:`CallTimedOut`), which counts as a failure.

The state machine is purgatory's (a maintained asyncio circuit breaker; see
``docs/decisions/resilience.md``); this module adds what phivault needs around it: the failure
types that count, per-call timeouts, one trial call at a time in half-open (purgatory lets
every concurrent call through), phivault's exception types, and Prometheus metrics
(:class:`Breakers` is a collector on the app's registry).

:func:`retrying` gives bounded retries (attempts, exponential back-off with full jitter, a
total deadline) for **idempotent** calls only: a retried write that had taken effect would be
applied twice. :class:`Fallback` runs a shared primary (Redis) through a breaker and a
per-process secondary when the primary is down, logging once on entering and once on leaving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Final, Literal, Protocol, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.messages.events import ContextChanged
from purgatory.domain.model import Context, OpenedState
from purgatory.service._async.circuitbreaker import AsyncCircuitBreaker
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from phivault.errors import StoreUnavailable

__all__ = [
    "DEFAULT_FAILURE_TYPES",
    "Breaker",
    "BreakerState",
    "Breakers",
    "CallTimedOut",
    "CircuitOpen",
    "EventLog",
    "Fallback",
    "call_with_retries",
    "retrying",
]

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half-open"]
StateListener = Callable[[str, BreakerState, BreakerState], None]

# What a dependency being down looks like once adapters have translated driver errors.
DEFAULT_FAILURE_TYPES: Final[tuple[type[BaseException], ...]] = (
    StoreUnavailable,
    OSError,
    TimeoutError,
)
_GAUGE: Final[dict[BreakerState, int]] = {"closed": 0, "half-open": 1, "open": 2}
_FROM_PURGATORY: Final[dict[str, BreakerState]] = {
    "closed": "closed",
    "opened": "open",
    "half-opened": "half-open",
}


class CircuitOpen(StoreUnavailable):
    """The breaker of a dependency is open: the call was refused without being made."""

    def __init__(self, breaker: str, retry_after_s: float) -> None:
        super().__init__(
            f"the circuit breaker {breaker!r} is open; the dependency is not called "
            f"for another {max(0.0, retry_after_s):.1f} s"
        )
        self.breaker = breaker
        self.retry_after_s = max(0.0, retry_after_s)


class CallTimedOut(StoreUnavailable):
    """A call through a breaker took longer than its time limit (counted as a failure)."""

    def __init__(self, breaker: str, timeout_s: float) -> None:
        super().__init__(f"a call through the circuit breaker {breaker!r} took over {timeout_s} s")
        self.breaker = breaker
        self.timeout_s = timeout_s


class Breaker:
    """A circuit breaker around one dependency (purgatory's state machine, in process).

    ``failure_types``: the exceptions that mean "the dependency is down" and count; any other
    exception means the dependency answered (say, a wrapped key that does not authenticate)
    and counts as a success. A caller's cancellation counts as neither. ``call_timeout_s``
    (None: no limit) bounds every call; an expired limit raises :class:`CallTimedOut` and
    counts. Use it from one event loop at a time (it holds no loop-bound objects, so tests
    may drive it from several loops in turn).
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout_s: float = 30.0,
        call_timeout_s: float | None = 5.0,
        failure_types: tuple[type[BaseException], ...] = DEFAULT_FAILURE_TYPES,
        on_change: StateListener | None = None,
    ) -> None:
        if not name:
            raise ValueError("a breaker needs a name")
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_timeout_s <= 0:
            raise ValueError("reset_timeout_s must be positive")
        if call_timeout_s is not None and call_timeout_s <= 0:
            raise ValueError("call_timeout_s must be positive (or None)")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = float(reset_timeout_s)
        self.call_timeout_s = call_timeout_s
        self.failure_types: tuple[type[BaseException], ...] = (*failure_types, CallTimedOut)
        self._listeners: list[StateListener] = [on_change] if on_change is not None else []
        self._factory = AsyncCircuitBreakerFactory(
            default_threshold=failure_threshold, default_ttl=self.reset_timeout_s
        )
        self._factory.add_listener(self._on_event)
        self._circuit: AsyncCircuitBreaker | None = None
        self._last_state: BreakerState = "closed"
        self._trial_in_flight = False
        self.failures = 0  # calls that failed (any state)
        self.trips = 0  # transitions to open
        self.rejected = 0  # calls refused while open

    # state ----------------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """``open`` while calls are refused; ``half-open`` once the next call is a trial."""
        context = self._context_or_none()
        if context is None:
            return "closed"
        state = _FROM_PURGATORY[context.state]
        if state == "open" and self._retry_after(context) <= 0:
            return "half-open"
        return state

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(name, old, new)`` on every state change."""
        self._listeners.append(listener)

    def _context_or_none(self) -> Context | None:
        return None if self._circuit is None else self._circuit.context

    def _retry_after(self, context: Context) -> float:
        opened_at = context.opened_at
        if opened_at is None:
            return 0.0
        # purgatory reads the wall clock (time.time) for the reset timeout; so do we.
        return opened_at + self.reset_timeout_s - time.time()

    def _on_event(self, name: str, kind: str, event: object) -> None:
        if kind != "state_changed" or not isinstance(event, ContextChanged):
            return
        new = _FROM_PURGATORY.get(event.state, "closed")
        old, self._last_state = self._last_state, new
        if new == "open":
            self.trips += 1
        if old != new:
            for listener in self._listeners:
                listener(self.name, old, new)

    async def _circuit_breaker(self) -> AsyncCircuitBreaker:
        if self._circuit is None:
            circuit = await self._factory.get_breaker(self.name)
            if self._circuit is None:
                self._circuit = circuit
        return self._circuit

    async def _flush(self, circuit: AsyncCircuitBreaker) -> None:
        # purgatory queues its events on the context; its bus updates the store and our hook.
        context = circuit.context
        while context.messages:
            await circuit.messagebus.handle(context.messages.pop(0), circuit.uow)

    # calls ------------------------------------------------------------------------------------

    async def _admit(self) -> tuple[AsyncCircuitBreaker, bool]:
        """Let a call through (returns whether it is the half-open trial) or refuse it."""
        circuit = await self._circuit_breaker()
        context = circuit.context
        if context.state != "closed" and self._trial_in_flight:
            self.rejected += 1
            raise CircuitOpen(self.name, self._retry_after(context))
        try:
            context.handle_new_request()
        except OpenedState as exc:
            # purgatory raises its state object itself, the same instance every time: drop
            # the traceback so it does not grow with each refusal.
            exc.__traceback__ = None
            self.rejected += 1
            raise CircuitOpen(self.name, self._retry_after(context)) from None
        trial = context.state == "half-opened"
        if trial:
            self._trial_in_flight = True
        await self._flush(circuit)
        return circuit, trial

    async def _settle(self, circuit: AsyncCircuitBreaker, exc: BaseException | None) -> None:
        if exc is not None and isinstance(exc, self.failure_types):
            self.failures += 1
            circuit.context.handle_exception(exc)
        else:
            circuit.context.handle_end_request()
        await self._flush(circuit)

    def guard(self) -> _Guarded:
        """``async with breaker.guard(): ...``: the block is one call (timed, counted)."""
        return _Guarded(self)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` through the breaker; raises :class:`CircuitOpen` without calling it
        while open, :class:`CallTimedOut` past the time limit, else whatever ``fn`` raises."""
        async with _Guarded(self):
            return await fn()

    def __repr__(self) -> str:
        return f"<Breaker {self.name} {self.state}>"


class _Guarded:
    """One call through a breaker: admitted on entry, timed, and judged on exit."""

    __slots__ = ("_breaker", "_circuit", "_timeout", "_trial")

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker
        self._circuit: AsyncCircuitBreaker | None = None
        self._trial = False
        self._timeout = asyncio.timeout(breaker.call_timeout_s)

    async def __aenter__(self) -> None:
        self._circuit, self._trial = await self._breaker._admit()
        try:
            await self._timeout.__aenter__()
        except BaseException:
            if self._trial:  # never leave the half-open slot taken
                self._breaker._trial_in_flight = False
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        breaker, circuit = self._breaker, self._circuit
        if circuit is None:  # pragma: no cover  (entry raised: no exit)
            return
        try:
            try:
                await self._timeout.__aexit__(exc_type, exc, tb)
            except TimeoutError as expired:  # our limit cancelled the block
                failure = CallTimedOut(breaker.name, breaker.call_timeout_s or 0.0)
                await breaker._settle(circuit, failure)
                raise failure from expired
            if exc is None:
                await breaker._settle(circuit, None)
            elif not isinstance(exc, asyncio.CancelledError):
                await breaker._settle(circuit, exc)
            # A cancelled caller gave up: that says nothing about the dependency.
        finally:
            if self._trial:
                breaker._trial_in_flight = False


class EventLog(Protocol):
    """The two levels a :class:`Fallback` logs at (a structlog logger fits)."""

    def warning(self, event: str, **fields: Any) -> Any: ...

    def info(self, event: str, **fields: Any) -> Any: ...


class _StdlibLog:
    def __init__(self) -> None:
        self._log = logging.getLogger("phivault.resilience")

    def warning(self, event: str, **fields: Any) -> None:
        self._log.warning("%s %s", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log.info("%s %s", event, fields)


class Fallback:
    """A shared primary behind a breaker, with a per-process secondary while it is down.

    Only for state whose loss is tolerable (per-worker rate limits): never for anything that
    must fail closed. While the breaker is open the primary costs nothing per call; once its
    reset timeout passes, one call probes it, and the first success leaves fallback mode.
    Entering and leaving each log one line; ``active`` and ``entered`` feed the metrics.
    """

    def __init__(self, name: str, breaker: Breaker, *, log: EventLog | None = None) -> None:
        self.name = name
        self.breaker = breaker
        self._log: EventLog = log if log is not None else _StdlibLog()
        self.active = False
        self.entered = 0  # times fallback mode was entered

    async def run(
        self, primary: Callable[[], Awaitable[T]], secondary: Callable[[], Awaitable[T]]
    ) -> T:
        try:
            result = await self.breaker.call(primary)
        except self.breaker.failure_types as exc:  # CircuitOpen is a StoreUnavailable too
            self._enter(exc)
            return await secondary()
        if self.active:
            self.active = False
            self._log.info("fallback.left", fallback=self.name, breaker=self.breaker.name)
        return result

    def _enter(self, exc: BaseException) -> None:
        if self.active:
            return
        self.active = True
        self.entered += 1
        self._log.warning(
            "fallback.entered",
            fallback=self.name,
            breaker=self.breaker.name,
            cause=type(exc).__name__,
        )


class Breakers(Collector):
    """The breakers (and fallbacks) of one process, exported as Prometheus metrics.

    ``phivault_breaker_state{breaker}`` is 0 closed, 1 half-open, 2 open;
    ``phivault_breaker_failures_total``, ``phivault_breaker_trips_total`` and
    ``phivault_breaker_rejected_total`` count failed calls, openings and refused calls;
    ``phivault_fallback_active{fallback}`` and ``phivault_fallback_entered_total`` follow the
    fallbacks. Values are read at scrape time, so nothing is updated per call.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        on_change: StateListener | None = None,
    ) -> None:
        self._breakers: dict[str, Breaker] = {}
        self._fallbacks: dict[str, Fallback] = {}
        self._on_change = on_change
        if registry is not None:
            registry.register(self)

    def breaker(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout_s: float = 30.0,
        call_timeout_s: float | None = 5.0,
        failure_types: tuple[type[BaseException], ...] = DEFAULT_FAILURE_TYPES,
    ) -> Breaker:
        """The breaker called ``name``, created with these settings the first time."""
        existing = self._breakers.get(name)
        if existing is not None:
            return existing
        return self.add(
            Breaker(
                name,
                failure_threshold=failure_threshold,
                reset_timeout_s=reset_timeout_s,
                call_timeout_s=call_timeout_s,
                failure_types=failure_types,
            )
        )

    def add(self, breaker: Breaker) -> Breaker:
        """Export a breaker built elsewhere (names are unique)."""
        if self._breakers.get(breaker.name, breaker) is not breaker:
            raise ValueError(f"another breaker is already called {breaker.name!r}")
        self._breakers[breaker.name] = breaker
        if self._on_change is not None:
            breaker.add_listener(self._on_change)
        return breaker

    def fallback(self, name: str, breaker: Breaker, *, log: EventLog | None = None) -> Fallback:
        """A :class:`Fallback` exported with the breakers (its breaker is exported too)."""
        if name in self._fallbacks:
            raise ValueError(f"another fallback is already called {name!r}")
        self.add(breaker)
        fallback = Fallback(name, breaker, log=log)
        self._fallbacks[name] = fallback
        return fallback

    def get(self, name: str) -> Breaker:
        return self._breakers[name]

    def __iter__(self) -> Iterator[Breaker]:
        return iter(tuple(self._breakers.values()))

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families(with_samples=True)

    def _families(self, *, with_samples: bool = False) -> list[Metric]:
        state = GaugeMetricFamily(
            "phivault_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            labels=["breaker"],
        )
        failures = CounterMetricFamily(
            "phivault_breaker_failures", "Calls that failed, by breaker.", labels=["breaker"]
        )
        trips = CounterMetricFamily(
            "phivault_breaker_trips", "Times a breaker opened.", labels=["breaker"]
        )
        rejected = CounterMetricFamily(
            "phivault_breaker_rejected",
            "Calls refused without being made while a breaker was open.",
            labels=["breaker"],
        )
        active = GaugeMetricFamily(
            "phivault_fallback_active",
            "1 while a shared dependency is replaced by its per-process fallback.",
            labels=["fallback"],
        )
        entered = CounterMetricFamily(
            "phivault_fallback_entered",
            "Times a fallback mode was entered.",
            labels=["fallback"],
        )
        if with_samples:
            for breaker in self:
                state.add_metric([breaker.name], _GAUGE[breaker.state])
                failures.add_metric([breaker.name], breaker.failures)
                trips.add_metric([breaker.name], breaker.trips)
                rejected.add_metric([breaker.name], breaker.rejected)
            for fallback in tuple(self._fallbacks.values()):
                active.add_metric([fallback.name], 1 if fallback.active else 0)
                entered.add_metric([fallback.name], fallback.entered)
        return [state, failures, trips, rejected, active, entered]


def retrying(
    *,
    attempts: int = 3,
    initial_backoff_s: float = 0.05,
    max_backoff_s: float = 1.0,
    deadline_s: float = 5.0,
    retry_on: tuple[type[BaseException], ...] = DEFAULT_FAILURE_TYPES,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> AsyncRetrying:
    """Bounded retries for an **idempotent** call: ``async for attempt in retrying(): with
    attempt: ...``.

    Never wrap a non-idempotent operation (an append, a create without an idempotency key, a
    webhook the receiver does not deduplicate): a timed-out attempt may have taken effect.
    At most ``attempts`` tries; waits are exponential with full jitter (random between 0 and
    ``initial_backoff_s * 2**n``, capped at ``max_backoff_s``) so that many workers do not
    retry in step; no retry starts if its wait would end past ``deadline_s`` after the first
    try. :class:`CircuitOpen` is never retried (the breaker already knows the answer). The
    last error is re-raised as it was.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")

    def should_retry(exc: BaseException) -> bool:
        return isinstance(exc, retry_on) and not isinstance(exc, CircuitOpen)

    options: dict[str, Any] = {}
    if sleep is not None:
        options["sleep"] = sleep
    return AsyncRetrying(
        stop=stop_after_attempt(attempts) | stop_before_delay(deadline_s),
        wait=wait_random_exponential(multiplier=initial_backoff_s, max=max_backoff_s),
        retry=retry_if_exception(should_retry),
        reraise=True,
        **options,
    )


async def call_with_retries(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int = 3,
    initial_backoff_s: float = 0.05,
    max_backoff_s: float = 1.0,
    deadline_s: float = 5.0,
    retry_on: tuple[type[BaseException], ...] = DEFAULT_FAILURE_TYPES,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> T:
    """``await fn()`` with :func:`retrying`'s bounds (idempotent calls only; see there)."""
    retry = retrying(
        attempts=attempts,
        initial_backoff_s=initial_backoff_s,
        max_backoff_s=max_backoff_s,
        deadline_s=deadline_s,
        retry_on=retry_on,
        sleep=sleep,
    )

    async def attempt() -> T:
        # A coroutine function, so tenacity awaits it (a lambda returning a coroutine is
        # taken for a plain function by tenacity, and its coroutine never runs).
        return await fn()

    result: T = await retry(attempt)
    return result
