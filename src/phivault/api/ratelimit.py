"""Rate limits per client address and per principal, shared between workers when scaled.

The limit stage runs *before* authentication, so that a flood of forged tokens costs one
counter increment each, not a signature check. At that point the principal is not proven
yet, so the per-principal limit is keyed by a fingerprint (SHA-256) of the presented
credential rather than by an unverified ``sub`` claim: keying on a claim anyone can write
would let an attacker exhaust a victim's quota with forged tokens naming the victim. Counters
live in the ``limits`` library's storage: memory (embedded) or Redis (scaled).

If Redis is unreachable, limiting falls back to this worker's own in-memory counters (a
rate limit is a brake on abuse, not a security boundary: N workers then allow up to N times
the limit, which beats refusing every request). Redis is reached through a circuit breaker,
so once it is known to be down it costs a request nothing; every few seconds one request
probes it, and the first success returns to the shared counters. Entering and leaving
fallback each log one line and show in ``phivault_fallback_active{fallback=...}`` (see
``docs/decisions/resilience.md``).

In this worker's memory (the embedded shape) the same algorithm runs as plain synchronous
code (:class:`_MemoryCounters`): the library's asynchronous memory storage cost about a tenth
of an embedded read's Python calls for two dictionary updates.

In Redis both counters of a request are taken in one round trip (one Lua script, the same
sliding-window algorithm and keys as the ``limits`` library, which still computes the
``Retry-After`` of a refusal and answers the readiness probe). For a credential this worker
has already authenticated, the front door takes the counters in the session touch's round
trip instead (:meth:`RateLimiter.session_gate`): still before the touch and before anything
is recorded, but after the (cached, signature-free) token check; see
``docs/decisions/api-rate-limit-keys.md``.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.util import get_package_data
from redis.asyncio import Redis
from redis.exceptions import RedisError

from phivault.errors import ConfigurationError, StoreUnavailable
from phivault.identity.sessions import SessionGate
from phivault.resilience import Breaker, Breakers, EventLog, Fallback

__all__ = [
    "FALLBACK_NAME",
    "Limited",
    "RateLimitUnavailable",
    "RateLimiter",
    "credential_fingerprint",
]

FALLBACK_NAME = "shared-state.ratelimit"


class RateLimitUnavailable(StoreUnavailable):
    """The rate limit counters cannot be reached (a fallback, if any, takes over)."""


@dataclass(frozen=True, slots=True)
class Limited:
    """A refusal: which limit, and how many seconds until a retry can succeed."""

    limit: str
    retry_after_s: int


def credential_fingerprint(authorization: str) -> str:
    return hashlib.sha256(authorization.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class _Counters:
    """Two sliding-window counters (O(1) state per key) in one storage."""

    def __init__(self, storage: Storage, address: RateLimitItem, principal: RateLimitItem) -> None:
        self.storage = storage
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self._address = address
        self._principal = principal

    async def check(self, address: str, credential: str | None) -> Limited | None:
        try:
            if not await self._limiter.hit(self._address, "address", address):
                return Limited(
                    "address", await self._retry_after(self._address, "address", address)
                )
            if credential is not None and not await self._limiter.hit(
                self._principal, "principal", credential
            ):
                return Limited(
                    "principal", await self._retry_after(self._principal, "principal", credential)
                )
        except (StorageError, OSError) as exc:
            raise RateLimitUnavailable("the rate limit store is unavailable") from exc
        return None

    async def _retry_after(self, item: RateLimitItem, *ids: str) -> int:
        stats = await self._limiter.get_window_stats(item, *ids)
        return max(1, math.ceil(stats.reset_time - time.time()))


class _MemoryCounters:
    """The two counters in this process's memory: the ``limits`` library's sliding window
    counter, computed as its memory storage and limiter compute it, without the storage's
    coroutines, per-key asyncio locks and expiry task.

    Per key, the count of the current fixed window (``expiry`` seconds, numbered from the
    epoch) and of the one before it; a hit is refused when the previous count, weighted by
    the share of the previous window still inside the sliding one, plus the current count,
    would pass the limit (``MemoryStorage.acquire_sliding_window_entry``). ``Retry-After`` is
    ``SlidingWindowCounterRateLimiter.get_window_stats``'s reset time. A test drives both
    with the same clock and compares every answer.
    """

    def __init__(
        self,
        address: RateLimitItem,
        principal: RateLimitItem,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._address = address
        self._principal = principal
        self._clock = clock
        # key -> [window number, its count, the previous window's count]
        self._windows: dict[str, list[int]] = {}
        self._lock = threading.Lock()  # one event loop in practice; threads stay correct
        self._pruned_window: dict[int, int] = {}

    async def check(self, address: str, credential: str | None) -> Limited | None:
        now = self._clock()
        with self._lock:
            item = self._address
            if not self._hit(item, "address/" + address, now):
                return Limited("address", self._retry_after(item, "address/" + address, now))
            if credential is not None:
                item = self._principal
                if not self._hit(item, "principal/" + credential, now):
                    return Limited(
                        "principal", self._retry_after(item, "principal/" + credential, now)
                    )
        return None

    async def ping(self) -> bool:
        return True

    def _counts(self, key: str, expiry: int, now: float) -> tuple[int, int, int]:
        """(window number, current count, previous count) of ``key`` at ``now``."""
        window = int(now / expiry)
        state = self._windows.get(key)
        if state is None:
            return window, 0, 0
        if state[0] == window:
            return window, state[1], state[2]
        if state[0] == window - 1:
            return window, 0, state[1]
        return window, 0, 0

    def _hit(self, item: RateLimitItem, ident: str, now: float) -> bool:
        expiry = item.get_expiry()
        key = f"{expiry}/{ident}"
        window, current, previous = self._counts(key, expiry, now)
        limit = item.amount
        weighted = previous * _previous_ttl(previous, expiry, now) / expiry + current
        if math.floor(weighted) + 1 > limit:
            return False
        self._windows[key] = [window, current + 1, previous]
        self._prune(expiry, window)
        return True

    def _retry_after(self, item: RateLimitItem, ident: str, now: float) -> int:
        expiry = item.get_expiry()
        _, current, previous = self._counts(f"{expiry}/{ident}", expiry, now)
        previous_reset_in = current_reset_in = math.inf
        if previous:
            previous_reset_in = _previous_ttl(previous, expiry, now) % (expiry / previous)
        if current:
            current_reset_in = ((1 - ((now / expiry) % 1)) * expiry + expiry) % expiry
        reset_in = min(previous_reset_in, current_reset_in)
        return 1 if reset_in == math.inf else max(1, math.ceil(reset_in))

    def _prune(self, expiry: int, window: int) -> None:
        """Drop the keys no window can count any more, once per window and expiry (as the
        library's storage expires its keys): the keys are the callers' to choose."""
        if self._pruned_window.get(expiry) == window:
            return
        self._pruned_window[expiry] = window
        prefix = f"{expiry}/"
        stale = [
            key
            for key, state in self._windows.items()
            if state[0] < window - 1 and key.startswith(prefix)
        ]
        for key in stale:
            del self._windows[key]


def _previous_ttl(previous: int, expiry: int, now: float) -> float:
    """How much of the previous window is still inside the sliding one, in seconds."""
    if not previous:
        return 0.0
    return (1 - (((now - expiry) / expiry) % 1)) * expiry


@cache  # read from the installed package once, on first use (not at import)
def _gate_function() -> str:
    """A Lua function ``gate(KEYS, ARGV)`` that takes the address counter and then the
    principal counter, stopping at the first refusal: it returns 0 when both allow, else 1 or
    2 (the refusing one). Run alone (:func:`_acquire_both_script`) or as the
    :class:`~phivault.identity.sessions.SessionGate` of a session touch.

    Each counter is taken by the ``limits`` library's own sliding-window acquire script, read
    from the installed package and wrapped as a Lua function, so the algorithm and the keys
    stay exactly the library's (its limiter still computes ``Retry-After`` from the same
    windows, and workers of an earlier version count in the same counters); only the loop
    over the two counters is ours. All four keys go to one script, so they must live on one
    server: a single Redis (or one behind Sentinel, as docs/deploy has it), not Redis Cluster.
    """
    library = get_package_data("resources/redis/lua_scripts/acquire_sliding_window.lua")
    acquire = library.decode() if isinstance(library, bytes) else str(library)
    return (
        f"local function acquire(KEYS, ARGV)\n{acquire}\nend\n"
        "local function gate(KEYS, ARGV)\n"
        "  for i = 1, #KEYS / 2 do\n"
        "    local keys = {KEYS[2 * i - 1], KEYS[2 * i]}\n"
        "    local args = {ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]}\n"
        "    if not acquire(keys, args) then return i end\n"
        "  end\n"
        "  return 0\n"
        "end\n"
    )


def _acquire_both_script() -> str:
    """The gate alone: one script call for both counters of a request."""
    return _gate_function() + "return gate(KEYS, ARGV)\n"


class _SharedCounters(_Counters):
    """The two counters in Redis, both taken by one script call per request.

    The keys are the library's (``<prefix>:{<item key>}`` and ``.../-1``), so its limiter
    reads the same windows for ``Retry-After``, and workers of an earlier version count in
    the same counters during a rolling upgrade.
    """

    def __init__(
        self,
        storage: Storage,
        client: Redis,
        prefix: str,
        address: RateLimitItem,
        principal: RateLimitItem,
    ) -> None:
        super().__init__(storage, address, principal)
        self._script = client.register_script(_acquire_both_script())
        self._prefix = prefix

    def _window(self, item: RateLimitItem, *ids: str) -> tuple[str, str]:
        current = f"{self._prefix}:{{{item.key_for(*ids)}}}"
        return f"{current}/-1", current

    def keys_and_args(self, address: str, credential: str | None) -> tuple[list[str], list[int]]:
        """The gate's ``KEYS`` and ``ARGV`` for one request's counters."""
        keys = [*self._window(self._address, "address", address)]
        args: list[int] = [self._address.amount, self._address.get_expiry(), 1]
        if credential is not None:
            keys += self._window(self._principal, "principal", credential)
            args += [self._principal.amount, self._principal.get_expiry(), 1]
        return keys, args

    async def check(self, address: str, credential: str | None) -> Limited | None:
        keys, args = self.keys_and_args(address, credential)
        try:
            refused = int(await self._script(keys=keys, args=args))
            if refused in (1, 2):
                return await self.refusal(refused, address, credential)
        except (RedisError, StorageError, OSError) as exc:
            raise RateLimitUnavailable("the rate limit store is unavailable") from exc
        return None

    async def refusal(self, code: int, address: str, credential: str | None) -> Limited:
        """The :class:`Limited` for the gate's refusal ``code`` (1: address, 2: principal),
        with the library's ``Retry-After`` (a second round trip, only for a refusal)."""
        if code == 2 and credential is not None:
            return Limited(
                "principal", await self._retry_after(self._principal, "principal", credential)
            )
        return Limited("address", await self._retry_after(self._address, "address", address))


class RateLimiter:
    """Limits per address and per credential; shared in Redis with a per-worker fallback."""

    def __init__(
        self,
        storage: Storage | None,
        *,
        per_address: str,
        per_principal: str,
        fallback: Fallback | None = None,
        shared: tuple[Redis, str] | None = None,
    ) -> None:
        try:
            address: RateLimitItem = parse(per_address)
            principal: RateLimitItem = parse(per_principal)
        except ValueError as exc:
            raise ConfigurationError("a rate limit setting is not a valid limit") from exc
        # ``shared``: the Redis client and key prefix of ``storage``, for the one-trip script.
        self._counters: _Counters | _MemoryCounters
        if storage is None:
            self._counters = _MemoryCounters(address, principal)
        elif shared is None:
            self._counters = _Counters(storage, address, principal)
        else:
            self._counters = _SharedCounters(storage, shared[0], shared[1], address, principal)
        self._fallback = fallback
        # Only used while the fallback is active; memory storage needs no connection.
        self._local = _Counters(MemoryStorage(), address, principal) if fallback else None

    @classmethod
    def in_memory(cls, *, per_address: str, per_principal: str) -> RateLimiter:
        """Counters in this process's memory (``storage=None``: :class:`_MemoryCounters`)."""
        return cls(None, per_address=per_address, per_principal=per_principal)

    @classmethod
    def redis(
        cls,
        url: str,
        *,
        prefix: str,
        per_address: str,
        per_principal: str,
        breakers: Breakers | None = None,
        log: EventLog | None = None,
        timeout_s: float = 0.5,
        probe_every_s: float = 5.0,
    ) -> RateLimiter:
        """Counters in Redis; while Redis is unreachable, in this worker's memory.

        ``timeout_s`` bounds each Redis round trip; ``probe_every_s`` is how often an open
        breaker lets one request try Redis again.
        """
        key_prefix = f"{prefix}:limits"
        storage = RedisStorage(
            "async+" + url if not url.startswith("async+") else url,
            wrap_exceptions=True,
            implementation="redispy",
            key_prefix=key_prefix,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
        )
        client = Redis.from_url(  # connects lazily, on first use
            url.removeprefix("async+"),
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=None,  # a failure goes to the breaker and the fallback, not to a retry
        )
        breaker = Breaker(
            "redis.ratelimit",
            failure_threshold=3,
            reset_timeout_s=probe_every_s,
            call_timeout_s=2 * timeout_s,
        )
        registry = breakers if breakers is not None else Breakers()
        fallback = registry.fallback(FALLBACK_NAME, breaker, log=log)
        return cls(
            storage,
            per_address=per_address,
            per_principal=per_principal,
            fallback=fallback,
            shared=(client, key_prefix),
        )

    def session_gate(self, *, address: str, credential: str | None) -> SessionGate | None:
        """This request's counters as a gate for the shared session store's touch, so that
        the counters and the touch take one Redis round trip; ``None`` when the counters are
        not in Redis or this worker is falling back to its own (then :meth:`check` counts).
        A refusal comes back as :class:`~phivault.identity.sessions.GateRefused`, to be
        turned into a :class:`Limited` by :meth:`refusal`."""
        counters = self._counters
        if not isinstance(counters, _SharedCounters) or self.falling_back:
            return None
        keys, args = counters.keys_and_args(address, credential)
        return SessionGate(_gate_function(), tuple(keys), tuple(args))

    async def refusal(self, code: int, *, address: str, credential: str | None) -> Limited:
        """The :class:`Limited` of a :meth:`session_gate` refusal. If Redis cannot say when
        the window frees up, the whole window is the answer (never a zero wait)."""
        counters = self._counters
        if isinstance(counters, _SharedCounters):
            try:
                return await counters.refusal(code, address, credential)
            except (RedisError, StorageError, OSError):
                pass
        item, limit = (
            (counters._principal, "principal")
            if code == 2 and credential is not None
            else (counters._address, "address")
        )
        return Limited(limit, max(1, item.get_expiry()))

    @property
    def falling_back(self) -> bool:
        """True while the shared counters are replaced by this worker's own."""
        return self._fallback is not None and self._fallback.active

    async def check(self, *, address: str, credential: str | None) -> Limited | None:
        """Count one request; return a :class:`Limited` if it must be refused.

        Raises :class:`RateLimitUnavailable` only without a fallback (memory never does).
        """
        shared = self._counters
        if self._fallback is None or self._local is None:
            return await shared.check(address, credential)
        local = self._local
        return await self._fallback.run(
            lambda: shared.check(address, credential), lambda: local.check(address, credential)
        )

    async def ping(self) -> bool:
        """Whether the (shared) counter storage answers."""
        counters = self._counters
        if isinstance(counters, _MemoryCounters):
            return await counters.ping()
        try:
            return bool(await counters.storage.check())
        except (StorageError, OSError):
            return False
