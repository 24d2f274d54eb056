"""Which database node serves a read: the primary or a streaming replica.

Why (docs/decisions/replica-routing.md): replicas take PHI and display reads off the primary,
but a replica is always a little behind, and some reads cannot be. The router decides per
unit of work, by what it reads (:class:`~phivault.records.store.ports.ReadClass`):

* writes, authorization state and ``FRESH`` reads: the primary, always;
* PHI reads: a replica whose lag is under ``max_lag_s`` (default 100 ms), else the primary;
* aggregate and display reads: a replica under the looser ``display_max_lag_s``;
* read-your-writes: after a caller's write, that caller's reads stay on the primary until a
  replica has replayed the write's WAL position (its LSN). Each worker keeps what it wrote in
  memory; with several workers, a :class:`~phivault.records.store.write_positions.WritePositions`
  (Redis) shares it, and a read that would go to a replica asks it first (unreachable: the
  primary serves).

A replica that cannot be reached never fails a request: it is skipped (its
:class:`ReplicaHealth` says when to try it again) and the primary answers. The health state is
a small cool-down (:class:`CooldownHealth`) or a circuit breaker of
:mod:`phivault.resilience` (:class:`BreakerHealth`, whose state is then a Prometheus metric).

Lag is measured on the replica (:func:`postgres_probe`) and kept for ``sample_ttl_s``
(default 50 ms) so that routing costs no query per request; a kept sample is trusted only as
far as ``lag + age <= bound``, since a replica whose replay stopped falls behind by the age
of the sample at most.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from phivault.errors import ConfigurationError, StoreUnavailable
from phivault.records.store.ports import ReadClass
from phivault.records.store.write_positions import (
    EVERYONE,
    WritePositions,
    WritePositionsUnavailable,
)

if TYPE_CHECKING:
    from phivault.resilience import Breaker

__all__ = [
    "PRIMARY",
    "BreakerHealth",
    "CooldownHealth",
    "LagSample",
    "Replica",
    "ReplicaHealth",
    "ReplicaRouter",
    "ReplicaStatus",
    "ReplicaUnreachable",
    "caller_session",
    "current_session",
    "postgres_probe",
    "replica_name",
]

#: The name of the primary node in ``served_by``.
PRIMARY: Final = "primary"
#: The read-your-writes key of callers that name none: they share it.
_ANONYMOUS: Final = ""
_SESSION: ContextVar[str | None] = ContextVar("phivault_records_session", default=None)


def replica_name(host: str, port: int) -> str:
    """``replica:<host>:<port>``: how a replica is named in ``served_by`` and audit events."""
    return f"replica:{host}:{port}"


@contextmanager
def caller_session(key: str) -> Iterator[None]:
    """Key read-your-writes by ``key`` (a caller's subject or session id) for the units of
    work opened inside the block, in this context (asyncio tasks and the worker threads
    started from them inherit it)."""
    token = _SESSION.set(key)
    try:
        yield
    finally:
        _SESSION.reset(token)


def current_session(explicit: str | None = None) -> str:
    """The read-your-writes key: ``explicit``, else :func:`caller_session`'s, else the one
    key shared by every caller that names none."""
    if explicit is not None:
        return explicit
    found = _SESSION.get()
    return _ANONYMOUS if found is None else found


class ReplicaUnreachable(StoreUnavailable):
    """A replica did not answer (the router falls back to the primary; a breaker counts it)."""


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """What a probe found. ``lag_s`` None: the replica cannot vouch for its lag (no WAL
    receiver streaming from the primary, or promoted); ``math.inf``: behind by an unknown
    amount. ``replay_lsn`` and ``receive_lsn`` are the last replayed and received WAL
    positions as byte offsets."""

    lag_s: float | None
    replay_lsn: int | None
    receive_lsn: int | None = None


@dataclass(frozen=True, slots=True)
class LagSample:
    """A probe's result and when (router clock) the probe started. ``lag_s`` is the probe's,
    or less if the replica has since replayed all it had received at the previous sample."""

    lag_s: float | None
    replay_lsn: int | None
    receive_lsn: int | None
    taken_at: float


class ReplicaHealth(Protocol):
    """Whether to try a replica at all: the seam for a circuit breaker. ``allow`` is asked
    before each use; ``failed`` is told of every failure to connect, probe or read,
    ``succeeded`` of every successful probe. Implementations must be thread-safe."""

    def allow(self) -> bool: ...

    def succeeded(self) -> None: ...

    def failed(self) -> None: ...


class CooldownHealth:
    """Skip a replica for ``retry_after_s`` after a failure, then let the next use try it
    again (a failed try starts another cool-down): requests never wait on a replica that is
    known to be down, and reads return to it within ``retry_after_s`` of its recovery."""

    def __init__(
        self, *, retry_after_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if retry_after_s <= 0:
            raise ConfigurationError("a replica's retry interval must be positive")
        self._retry_after = retry_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._down_until: float | None = None
        self.failures = 0

    @property
    def up(self) -> bool:
        return self._down_until is None

    def allow(self) -> bool:
        with self._lock:
            return self._down_until is None or self._clock() >= self._down_until

    def succeeded(self) -> None:
        with self._lock:
            self._down_until = None

    def failed(self) -> None:
        with self._lock:
            self.failures += 1
            self._down_until = self._clock() + self._retry_after


class BreakerHealth:
    """:class:`ReplicaHealth` over a :class:`phivault.resilience.Breaker`.

    The breaker is asyncio code and the store runs in worker threads, so its calls are made
    on one event loop of its own, in a daemon thread started on first use (each report is a
    few microseconds of in-memory work). ``allow`` is the breaker's state: not open (a
    half-open breaker lets reads try the replica again). Build the breaker for a fallback,
    not a refusal: ``failure_threshold=1`` and a short ``reset_timeout_s`` (the primary
    answers meanwhile, so there is nothing to protect by waiting for more failures), and
    ``call_timeout_s=None`` (nothing is timed through it).
    """

    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker

    def allow(self) -> bool:
        return self.breaker.state != "open"

    def succeeded(self) -> None:
        _BreakerLoop.run(self._report(None))

    def failed(self) -> None:
        _BreakerLoop.run(self._report(ReplicaUnreachable("records replica unreachable")))

    async def _report(self, failure: ReplicaUnreachable | None) -> None:
        # One "call" through the breaker whose outcome is the one observed in the store.
        # (Imported here: the embedded shape never loads the breakers' dependencies.)
        from phivault.resilience import CircuitOpen

        try:
            async with self.breaker.guard():
                if failure is not None:
                    raise failure
        except (CircuitOpen, ReplicaUnreachable):
            pass


class _BreakerLoop:
    """The event loop the store's worker threads report to breakers on (one per process)."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def run(cls, work: Coroutine[Any, Any, None]) -> None:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="phivault-replica-breakers", daemon=True
                )
                thread.start()
                cls._loop = loop
            loop = cls._loop
        asyncio.run_coroutine_threadsafe(work, loop).result(timeout=5)


class Replica:
    """One replica as the router sees it: a name, a lag probe and a health state."""

    def __init__(
        self, name: str, probe: Callable[[], ReplicaStatus], health: ReplicaHealth
    ) -> None:
        self.name = name
        self.health = health
        self._probe = probe
        self._lock = threading.Lock()
        self.sample: LagSample | None = None

    def __repr__(self) -> str:
        return f"<Replica {self.name}>"


#: Allowance for the clocks of primary and replica (the lag is measured across them) when a
#: write's position is unknown and only time can tell that a replica has it.
CLOCK_MARGIN_S: Final = 0.5


@dataclass(slots=True)
class _Pending:
    """A session's newest write not known to be on every replica yet. ``unknown_at``: when
    (router clock) its newest write of unknown position committed (-inf: none), so the
    session stays on the primary for a while after it (:meth:`ReplicaRouter.pin_for`)."""

    lsn: int | None
    unknown_at: float


class ReplicaRouter:
    """Chooses the node of each read-only unit of work (thread-safe; one per store).

    ``choose`` returns the replica to read from, or None for the primary. ``note_write``
    records a committed write's LSN under its session (read-your-writes);
    ``note_write_everyone`` one that every session must see (schema migrations).
    ``unknown_pin_s`` keeps a session on the primary after a write whose LSN could not be
    read (at least as long as the read's lag bound plus :data:`CLOCK_MARGIN_S`). A read waits
    at most ``probe_wait_s`` for another thread's probe of a replica; past that the replica
    counts as failed (it may hang) and the primary serves. At most ``max_sessions`` sessions
    are tracked; beyond that the oldest are folded into one floor that every session must
    see (safe, only less precise).

    ``shared``: the write positions of every worker (several workers; Redis). A write then
    pins its session there before it commits (:meth:`begin_write`, which raises
    :class:`WritePositionsUnavailable` if it cannot: the write must not commit) and settles
    it after (:meth:`end_write`); a read that would go to a replica first fetches the
    session's position there, and if that fails, the primary serves. Without ``shared``
    (one worker, or tests) only this worker's writes are known.
    """

    def __init__(
        self,
        replicas: Sequence[Replica],
        *,
        max_lag_s: float = 0.1,
        display_max_lag_s: float = 5.0,
        sample_ttl_s: float = 0.05,
        unknown_pin_s: float = 1.0,
        max_sessions: int = 100_000,
        probe_wait_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        shared: WritePositions | None = None,
    ) -> None:
        if max_lag_s <= 0 or display_max_lag_s <= 0:
            raise ConfigurationError("a replica lag bound must be positive")
        if sample_ttl_s < 0:
            raise ConfigurationError("the lag sample's lifetime must not be negative")
        names = [r.name for r in replicas]
        if len(set(names)) != len(names):
            raise ConfigurationError("two replicas have the same host and port")
        self.replicas = tuple(replicas)
        self.max_lag_s = max_lag_s
        self.display_max_lag_s = max(display_max_lag_s, max_lag_s)
        # A sample older than the bound could never admit a read: keep it half as long.
        self._ttl = min(sample_ttl_s, max_lag_s / 2)
        self._unknown_pin = unknown_pin_s
        self._probe_wait = probe_wait_s
        self._max_sessions = max_sessions
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._floor = 0  # an LSN every session must find replayed
        self._floor_unknown_at = -math.inf  # a write of unknown position every session sees
        self._turn = 0
        self.shared = shared
        if shared is not None and shared.retain_s < self.pin_for(self.display_max_lag_s) + 1:
            # A shared entry must outlive any window in which an admitted replica lacks it.
            raise ConfigurationError(
                "shared write positions must be kept longer than the display lag bound"
            )
        self.shared_failures = 0  # settlements that could not be shared (their pin stays)

    def pin_for(self, bound: float) -> float:
        """How long after a write of unknown position its session stays on the primary, for
        reads with lag bound ``bound``: a replica within the bound at least that long after
        the commit has it (clocks within :data:`CLOCK_MARGIN_S`)."""
        return max(self._unknown_pin, bound + CLOCK_MARGIN_S)

    # routing ------------------------------------------------------------------------------

    def choose(self, reads: ReadClass, session: str | None = None) -> Replica | None:
        """The replica to serve a read-only unit reading ``reads`` for ``session`` (see
        :func:`current_session`), or None: the primary. The shared write positions are asked
        only once a replica would otherwise serve."""
        if reads in (ReadClass.AUTHORIZATION, ReadClass.FRESH) or not self.replicas:
            return None
        bound = self.max_lag_s if reads is ReadClass.PHI else self.display_max_lag_s
        pin = self.pin_for(bound)
        key = current_session(session)
        now = self._clock()
        with self._lock:
            pending = self._pending.get(key)
            need, unknown_at = self._floor, self._floor_unknown_at
            if pending is not None:
                if pending.lsn is None and now >= pending.unknown_at + self._longest_pin():
                    del self._pending[key]  # an unknown position's pin has run out
                    pending = None
                else:
                    unknown_at = max(unknown_at, pending.unknown_at)
                    need = max(need, pending.lsn or 0)
            start = self._turn
            self._turn = (self._turn + 1) % len(self.replicas)
        if now < unknown_at + pin:
            return None
        shared_checked = self.shared is None
        count = len(self.replicas)
        for step in range(count):
            replica = self.replicas[(start + step) % count]
            sample = self._sample(replica)
            if sample is None or sample.lag_s is None:
                continue
            if sample.lag_s + (self._clock() - sample.taken_at) > bound:
                continue
            if need and (sample.replay_lsn is None or sample.replay_lsn < need):
                continue
            if not shared_checked:
                # Only now, when a replica would serve: every worker's writes of this session.
                shared_checked = True
                found = self._shared_need(key, pin)
                if found is None:
                    return None
                if found > need:
                    need = found
                    if sample.replay_lsn is None or sample.replay_lsn < need:
                        continue
            if pending is not None and pending.lsn is not None:
                self._forget_if_everywhere(key, pending)
            return replica
        return None

    def _shared_need(self, key: str, pin: float) -> int | None:
        """The LSN the shared positions require for ``key`` (0: none), or None: only the
        primary will do (a write in flight or of unknown position, or the shared state
        unreachable: never read what may be stale)."""
        shared = self.shared
        if shared is None:
            return 0
        try:
            found = shared.need(key)
        except WritePositionsUnavailable:
            return None
        if found.in_flight:
            return None
        if found.unknown_age_s is not None and found.unknown_age_s < pin:
            return None
        return found.lsn

    def _longest_pin(self) -> float:
        return self.pin_for(self.display_max_lag_s)

    def replica_failed(self, replica: Replica) -> None:
        """A connection to or a read on ``replica`` failed: skip it until its health allows."""
        replica.sample = None
        replica.health.failed()

    def sample(self, replica: Replica) -> LagSample | None:
        """The replica's lag sample, probed again if older than the sample TTL (None: the
        replica is skipped for now, or did not answer)."""
        return self._sample(replica)

    def _sample(self, replica: Replica) -> LagSample | None:
        if not replica.health.allow():
            return None
        kept = replica.sample
        if kept is not None and self._clock() - kept.taken_at < self._ttl:
            return kept
        # One probe at a time; the others wait for its result, but not for long: a replica
        # that hangs (stopped, or a host that drops packets) must not hold up every read.
        if not replica._lock.acquire(timeout=self._probe_wait):
            self.replica_failed(replica)
            return None
        try:
            kept = replica.sample
            if kept is not None and self._clock() - kept.taken_at < self._ttl:
                return kept
            started = self._clock()
            try:
                status = replica._probe()
            except ReplicaUnreachable:
                self.replica_failed(replica)
                return None
            replica.health.succeeded()
            lag = status.lag_s
            # WAL that is received but not replayed yet makes the replica look as far behind
            # as its last replayed commit is old, which on a quiet primary can be long ago.
            # If it has replayed everything the previous sample had received, it is no
            # further behind than that sample is old.
            if (
                lag is not None
                and kept is not None
                and kept.receive_lsn is not None
                and status.replay_lsn is not None
                and status.replay_lsn >= kept.receive_lsn
            ):
                lag = min(lag, started - kept.taken_at)
            replica.sample = LagSample(lag, status.replay_lsn, status.receive_lsn, started)
            return replica.sample
        finally:
            replica._lock.release()

    # read-your-writes ---------------------------------------------------------------------

    def begin_write(self, session: str | None) -> None:
        """A write unit under ``session`` begins: with shared positions, pin the session there
        (every worker's reads of it go to the primary until :meth:`end_write`). Raises
        :class:`WritePositionsUnavailable` if that fails: the write must not commit."""
        if self.shared is not None:
            self.shared.begin(current_session(session))

    def end_write(
        self,
        session: str | None,
        *,
        committed: bool | None,
        lsn: int | None = None,
        pinned: bool = True,
    ) -> None:
        """A write unit under ``session`` ended: ``committed`` True at or before WAL position
        ``lsn`` (None: unknown), None if it may have committed (its commit failed midway:
        treated as an unknown position), False if nothing was written. Releases the
        :meth:`begin_write` pin (``pinned``). A settlement the shared positions do not take
        leaves the pin there (safe: the session reads the primary until it expires)."""
        key = current_session(session)
        if committed is not False:
            self._note_local(key, lsn if committed else None)
        shared = self.shared
        if shared is not None and (pinned or committed is not False):
            try:
                shared.settle(key, pinned=pinned, committed=committed, lsn=lsn)
            except WritePositionsUnavailable:
                with self._lock:
                    self.shared_failures += 1

    def note_write(self, session: str | None, lsn: int | None) -> None:
        """A write under ``session`` (see :func:`current_session`) committed at or before WAL
        position ``lsn`` (None: unknown, keep the session on the primary for a while)."""
        self.end_write(session, committed=True, lsn=lsn, pinned=False)

    def begin_write_everyone(self) -> None:
        """A write every session must see begins (a migration, a re-seal): with shared
        positions, pin every session to the primary until :meth:`end_write_everyone`."""
        if self.shared is not None:
            self.shared.begin(EVERYONE)

    def end_write_everyone(
        self, *, committed: bool | None, lsn: int | None = None, pinned: bool = True
    ) -> None:
        """The floor's :meth:`end_write`."""
        if committed is not False:
            with self._lock:
                if committed and lsn is not None:
                    self._floor = max(self._floor, lsn)
                else:
                    self._floor_unknown_at = max(self._floor_unknown_at, self._clock())
        shared = self.shared
        if shared is not None and (pinned or committed is not False):
            try:
                shared.settle(EVERYONE, pinned=pinned, committed=committed, lsn=lsn)
            except WritePositionsUnavailable:
                with self._lock:
                    self.shared_failures += 1

    def note_write_everyone(self, lsn: int | None) -> None:
        """A write every session must see before reading from a replica (a migration)."""
        self.end_write_everyone(committed=True, lsn=lsn, pinned=False)

    def _note_local(self, key: str, lsn: int | None) -> None:
        with self._lock:
            old = self._pending.pop(key, None)
            if lsn is None:
                entry = _Pending(old.lsn if old else None, self._clock())
            else:
                entry = _Pending(
                    max(lsn, old.lsn or 0) if old else lsn, old.unknown_at if old else -math.inf
                )
            self._pending[key] = entry
            if len(self._pending) > self._max_sessions:
                self._fold_oldest()

    def _forget_if_everywhere(self, key: str, pending: _Pending) -> None:
        """Drop a session's entry once every replica has replayed its write."""
        lsn = pending.lsn
        if lsn is None or self._clock() < pending.unknown_at + self._longest_pin():
            return
        for replica in self.replicas:
            kept = replica.sample
            if kept is None or kept.replay_lsn is None or kept.replay_lsn < lsn:
                return
        with self._lock:
            if self._pending.get(key) is pending:
                del self._pending[key]

    def _fold_oldest(self) -> None:
        # Called with the lock held: the oldest half become the floor every session sees.
        for _ in range(max(1, len(self._pending) // 2)):
            _, entry = self._pending.popitem(last=False)
            if entry.lsn is not None:
                self._floor = max(self._floor, entry.lsn)
            self._floor_unknown_at = max(self._floor_unknown_at, entry.unknown_at)

    @property
    def tracked_sessions(self) -> int:
        return len(self._pending)


# The replica's own view of its lag. The WAL it has received but not replayed is what
# separates it from the primary; when it has replayed all it received, the lag is 0 however
# long ago the last transaction was (an idle primary sends nothing), provided a WAL receiver
# is streaming from the primary (without one, "all received" says nothing).
_PROBE: Final = text(
    """
    SELECT pg_is_in_recovery() AS standby,
           pg_last_wal_receive_lsn() - '0/0'::pg_lsn AS received,
           pg_last_wal_replay_lsn() - '0/0'::pg_lsn AS replayed,
           EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())
               AS since_replay,
           EXISTS (
               SELECT 1 FROM pg_stat_wal_receiver
               WHERE pid IS NOT NULL AND coalesce(status, 'streaming') = 'streaming'
           ) AS streaming
    """
)


def postgres_probe(engine: Engine, *, timeout_ms: int = 1000) -> Callable[[], ReplicaStatus]:
    """A probe measuring a PostgreSQL streaming replica's lag on the replica itself.

    Not a replica (promoted), no WAL receiver streaming, or nothing replayed yet: lag
    unknown (the router uses the primary). Errors raise :class:`ReplicaUnreachable` (the
    driver's class name only)."""

    def probe() -> ReplicaStatus:
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
                row = conn.execute(_PROBE).one()
                conn.rollback()
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None)
            kind = type(orig if orig is not None else exc).__name__
            raise ReplicaUnreachable(f"replica lag probe failed ({kind})") from exc
        replayed = None if row.replayed is None else int(row.replayed)
        received = None if row.received is None else int(row.received)
        if not row.standby or not row.streaming or received is None or replayed is None:
            return ReplicaStatus(None, replayed if row.standby else None, received)
        if replayed >= received:
            return ReplicaStatus(0.0, replayed, received)
        if row.since_replay is None:  # nothing replayed since it started
            return ReplicaStatus(math.inf, replayed, received)
        return ReplicaStatus(max(0.0, float(row.since_replay)), replayed, received)

    return probe
