"""Read-your-writes across API workers: each session's newest write position, in Redis.

Why (docs/decisions/replica-routing.md, "Read-your-writes across workers"): a caller whose
write was served by one worker may have the next read served by another. The replica router
(:mod:`phivault.records.store.routing`) keeps what its own worker wrote in memory; this store
keeps it where every worker of the deployment sees it. Per session (a hash in Redis):

* ``lsn``: the newest WAL position the session's writes committed at or before (the largest,
  compared as zero-padded decimal strings so that no precision is lost in Lua);
* ``pins``: writes begun and not yet settled. A write pins its session *before* it commits
  (:meth:`RedisWritePositions.begin`), so that if its settlement is lost (Redis unreachable
  after the commit, the worker killed) the session stays on the primary until the key
  expires instead of reading a replica that lacks the write;
* ``unknown``: when (Redis clock, ms) a write whose position could not be read committed.

One more hash, the floor, holds the same for writes every session must see (migrations,
re-sealed elements). Every key expires ``retain_s`` after its last write (default 60 s), far
longer than any replica admitted by the lag bounds can still lack a write (see the decision).
A marker key without expiry (the epoch) tells a Redis that lost its data (restarted without
persistence, failed over): the first read that misses it puts a write of unknown position on
the floor, so every session reads the primary until the replicas must have what was lost.
Redis must not evict these keys (``maxmemory-policy noeviction``, as for the replay cache).

Failures: a read that cannot fetch the positions raises :class:`WritePositionsUnavailable`
(the router then uses the primary) and, for ``cooldown_s``, the next reads raise it without
trying Redis, so a Redis that is down costs reads nothing but the primary. A write that
cannot pin its session is refused before it commits (nothing is lost; the caller retries).
A settlement that fails leaves the pin, which is safe (the session reads the primary until the
key expires).

Keys are ``<prefix>:rw:s:<sha256 of the session key>`` and ``<prefix>:rw:floor``: opaque, and
namespaced per deployment by the prefix (``api.redis_key_prefix``); the session key itself
names the tenant.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from redis import Redis
from redis.exceptions import RedisError

from phivault.errors import ConfigurationError, StoreUnavailable

__all__ = [
    "EVERYONE",
    "PositionNeed",
    "RedisWritePositions",
    "WritePositions",
    "WritePositionsUnavailable",
]

#: The session name of writes every session must see (the floor).
EVERYONE: Final = "\0everyone"
#: How a Redis round trip may take before the shared state counts as unreachable.
DEFAULT_TIMEOUT_S: Final = 0.25


class WritePositionsUnavailable(StoreUnavailable):
    """The shared write positions cannot be read or written (reads use the primary)."""


@dataclass(frozen=True, slots=True)
class PositionNeed:
    """What a replica must have replayed before serving a session (its writes and the
    floor's): ``lsn`` (0: nothing), ``in_flight`` (a write begun and not settled: only the
    primary will do), ``unknown_age_s`` (the age of the newest write whose position is
    unknown, on the shared clock; None: there is none)."""

    lsn: int = 0
    in_flight: bool = False
    unknown_age_s: float | None = None


class WritePositions(Protocol):
    """Write positions shared by the workers of a deployment (thread-safe).

    ``begin`` pins a session before its write commits (raises if it cannot: the write must
    not commit); ``settle`` releases that pin (``pinned``) and records the outcome:
    ``committed`` True with ``lsn`` (None: committed at an unknown position), None when it is
    not known whether the commit happened (treated as an unknown position), False when
    nothing was written. ``need`` returns what a replica must have for ``session``, the
    floor (:data:`EVERYONE`) included. ``retain_s`` is how long a key outlives its last
    write."""

    retain_s: float

    def begin(self, session: str) -> None: ...

    def settle(
        self, session: str, *, pinned: bool, committed: bool | None, lsn: int | None
    ) -> None: ...

    def need(self, session: str) -> PositionNeed: ...

    def close(self) -> None: ...


# KEYS[1] the hash; ARGV[1] retain (ms). A key never has its lifetime shortened.
_BEGIN: Final = """
redis.call('HINCRBY', KEYS[1], 'pins', 1)
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 1
"""

# KEYS[1] the hash; ARGV: retain (ms), pinned ('1'/'0'), outcome ('lsn'/'unknown'/'none'),
# the LSN as a 20-digit decimal string (so string order is numeric order).
_SETTLE: Final = """
if ARGV[2] == '1' then
  local left = redis.call('HINCRBY', KEYS[1], 'pins', -1)
  if left <= 0 then redis.call('HDEL', KEYS[1], 'pins') end
end
if ARGV[3] == 'lsn' then
  local old = redis.call('HGET', KEYS[1], 'lsn')
  if (not old) or old < ARGV[4] then redis.call('HSET', KEYS[1], 'lsn', ARGV[4]) end
elseif ARGV[3] == 'unknown' then
  local now = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'unknown',
    string.format('%d', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)))
end
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 1
"""

# KEYS[1] the session's hash, KEYS[2] the floor's, KEYS[3] the epoch marker; ARGV[1] retain
# (ms). Both hashes and the shared clock. A missing marker (a Redis that lost its data: a
# restart without persistence, a fail-over) means the positions written before may be gone:
# the floor then records a write of unknown position now, which keeps every session on the
# primary until any replica the bounds admit has all that was committed before.
_NEED: Final = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if redis.call('SET', KEYS[3], '1', 'NX') then
  redis.call('HSET', KEYS[2], 'unknown', string.format('%d', now_ms))
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[1]) then
    redis.call('PEXPIRE', KEYS[2], ARGV[1])
  end
end
local s = redis.call('HMGET', KEYS[1], 'lsn', 'pins', 'unknown')
local f = redis.call('HMGET', KEYS[2], 'lsn', 'pins', 'unknown')
return {s[1], s[2], s[3], f[1], f[2], f[3], now[1], now[2]}
"""


class RedisWritePositions:
    """:class:`WritePositions` in Redis, through a synchronous client (the router runs in
    the store's worker threads). Build it with :meth:`from_url` (short timeouts, no retries)
    or pass a client. ``cooldown_s``: after a failure, reads skip Redis for that long."""

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        retain_s: float = 60.0,
        cooldown_s: float = 1.0,
        owns_client: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if retain_s <= 0 or cooldown_s < 0:
            raise ConfigurationError("write positions: retain_s must be positive")
        if not prefix:
            raise ConfigurationError("write positions need a key prefix (per deployment)")
        self.retain_s = retain_s
        self._retain_ms = str(max(1, int(retain_s * 1000)))
        self._client = client
        self._owns = owns_client
        self._prefix = prefix
        self._floor_key = f"{prefix}:rw:floor"
        self._epoch_key = f"{prefix}:rw:epoch"  # no expiry: gone only if Redis lost its data
        self._begin = client.register_script(_BEGIN)
        self._settle = client.register_script(_SETTLE)
        self._need = client.register_script(_NEED)
        self._cooldown = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._down_until = 0.0
        self.failures = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retain_s: float = 60.0,
        cooldown_s: float = 1.0,
    ) -> RedisWritePositions:
        """A client of its own (connecting lazily, on first use) with ``timeout_s`` for
        connecting and for each reply, and no silent retries."""
        client = Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=None,
        )
        return cls(
            client, prefix=prefix, retain_s=retain_s, cooldown_s=cooldown_s, owns_client=True
        )

    def key(self, session: str) -> str:
        """The Redis key of ``session``: opaque (a hash), under the deployment's prefix."""
        if session == EVERYONE:
            return self._floor_key
        digest = hashlib.sha256(session.encode()).hexdigest()[:32]
        return f"{self._prefix}:rw:s:{digest}"

    def begin(self, session: str) -> None:
        self._run(self._begin, [self.key(session)], [self._retain_ms])

    def settle(
        self, session: str, *, pinned: bool, committed: bool | None, lsn: int | None
    ) -> None:
        if committed is False:
            if not pinned:
                return
            outcome, position = "none", ""
        elif committed and lsn is not None:
            outcome, position = "lsn", f"{max(0, lsn):020d}"
        else:
            outcome, position = "unknown", ""
        args = [self._retain_ms, "1" if pinned else "0", outcome, position]
        self._run(self._settle, [self.key(session)], args)

    def need(self, session: str) -> PositionNeed:
        with self._lock:
            if self._clock() < self._down_until:
                raise WritePositionsUnavailable("write positions: shared state down (cooling)")
        keys = [self.key(session), self._floor_key, self._epoch_key]
        reply = self._run(self._need, keys, [self._retain_ms])
        try:
            s_lsn, s_pins, s_unknown, f_lsn, f_pins, f_unknown, secs, micros = reply
            now_ms = int(secs) * 1000 + int(micros) // 1000
            unknown = [int(v) for v in (s_unknown, f_unknown) if v is not None]
            return PositionNeed(
                lsn=max(int(s_lsn or 0), int(f_lsn or 0)),
                in_flight=int(s_pins or 0) > 0 or int(f_pins or 0) > 0,
                unknown_age_s=(now_ms - max(unknown)) / 1000 if unknown else None,
            )
        except (TypeError, ValueError) as exc:  # not what the script returns: fail safe
            raise WritePositionsUnavailable("write positions: unexpected reply") from exc

    def _run(self, script: Any, keys: list[str], args: list[str]) -> Any:
        try:
            reply = script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            with self._lock:
                self.failures += 1
                self._down_until = self._clock() + self._cooldown
            raise WritePositionsUnavailable(
                f"write positions: shared state unavailable ({type(exc).__name__})"
            ) from exc
        with self._lock:
            self._down_until = 0.0
        return reply

    def close(self) -> None:
        if self._owns:
            self._client.close()
