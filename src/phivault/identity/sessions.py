"""Sessions: how long a sign-in lasts, how long it may sit idle, and how strong it must be.

A JWT is stateless, but the rules around it are not: PCI DSS 8.2.8 asks that an idle session
end after 15 minutes, and HIPAA's automatic logoff asks the same of PHI systems. A session is
identified by the identity provider's ``sid`` claim, or else by subject and ``auth_time`` (one
sign-in), or else by the token itself; the :class:`SessionStore` remembers when each session
was last seen. Once a session idles out it stays ended, even if its token is still unexpired.

The policy is pure (:meth:`SessionPolicy.check` takes ``now``); the stores do the I/O.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from phivault.errors import ConfigurationError, StoreUnavailable
from phivault.identity.errors import IdentityUnavailable, InsufficientAuthentication, SessionExpired
from phivault.identity.principal import Principal, Role
from phivault.resilience import Breaker

__all__ = [
    "GateRefused",
    "MemorySessionStore",
    "RedisSessionStore",
    "SessionGate",
    "SessionPolicy",
    "SessionState",
    "SessionStore",
    "require_step_up",
    "session_key",
]


class SessionState(Enum):
    NEW = "new"
    ACTIVE = "active"
    ENDED = "ended"


@dataclass(slots=True)
class SessionGate:
    """A check that a shared session store runs atomically *before* a touch, in the same
    round trip (the front door's rate limit counters: ``docs/decisions/api-rate-limit-keys.md``).

    ``lua`` defines ``local function gate(KEYS, ARGV)``, returning 0 to let the touch happen
    or a positive code to refuse it; ``keys`` and ``args`` are its ``KEYS`` and ``ARGV``. The
    store sets ``passed`` once the gate let the touch through (whatever the touch found).
    """

    lua: str
    keys: tuple[str, ...]
    args: tuple[str | int | float, ...]
    passed: bool = False


class GateRefused(Exception):  # a refusal by the gate, not an error of the store
    """A :class:`SessionGate` refused: nothing was touched. ``code`` is the gate's."""

    def __init__(self, code: int) -> None:
        super().__init__(f"refused by the session gate ({code})")
        self.code = code


class SessionStore(Protocol):
    """Remembers when each session was last seen."""

    async def touch(
        self,
        key: str,
        *,
        now: float,
        idle_s: float,
        keep_s: float,
        gate: SessionGate | None = None,
    ) -> SessionState:
        """Mark ``key`` seen at ``now``: NEW the first time, ENDED if it was idle over
        ``idle_s`` (or ended before), ACTIVE otherwise. Entries are kept ``keep_s`` seconds.

        With a ``gate``, the gate runs first, atomically with the touch: if it refuses,
        :class:`GateRefused` is raised and nothing is touched. A store that cannot run gates
        raises :class:`~phivault.errors.ConfigurationError` rather than skip one."""
        ...


class MemorySessionStore:
    """Sessions for one process (the embedded shape)."""

    def __init__(self, *, max_entries: int = 100_000) -> None:
        self._seen: dict[str, tuple[float, bool, float]] = {}  # last seen, ended, forget at
        self._max_entries = max_entries

    async def touch(
        self,
        key: str,
        *,
        now: float,
        idle_s: float,
        keep_s: float,
        gate: SessionGate | None = None,
    ) -> SessionState:
        if gate is not None:
            raise ConfigurationError("the in-memory session store runs no gates")
        entry = self._seen.get(key)
        if entry is not None and entry[2] <= now:
            entry = None
        if entry is not None:
            last_seen, ended, _ = entry
            if ended or now - last_seen > idle_s:
                self._seen[key] = (last_seen, True, now + keep_s)
                return SessionState.ENDED
        if len(self._seen) >= self._max_entries:
            self._seen = {k: v for k, v in self._seen.items() if v[2] > now}
            if len(self._seen) >= self._max_entries:
                raise IdentityUnavailable("the session store is full")
        self._seen[key] = (now, False, now + keep_s)
        return SessionState.NEW if entry is None else SessionState.ACTIVE


# KEYS: the session; ARGV: now, idle_s, keep (ms).
_TOUCH_FUNCTION = """
local function touch(KEYS, ARGV)
  local old = redis.call('GET', KEYS[1])
  local keep = tonumber(ARGV[3])
  if old == 'ended' then return 'ended' end
  if old and (tonumber(ARGV[1]) - tonumber(old)) > tonumber(ARGV[2]) then
    redis.call('SET', KEYS[1], 'ended', 'PX', keep)
    return 'ended'
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', keep)
  if old then return 'active' end
  return 'new'
end
"""
_TOUCH = _TOUCH_FUNCTION + "return touch(KEYS, ARGV)\n"
# KEYS: the session, then the gate's; ARGV: the touch's three, then the gate's.
_GATED_TOUCH = """
local gate_keys, gate_args = {}, {}
for i = 2, #KEYS do gate_keys[i - 1] = KEYS[i] end
for i = 4, #ARGV do gate_args[i - 3] = ARGV[i] end
local refused = gate(gate_keys, gate_args)
if refused ~= 0 then return refused end
return touch({KEYS[1]}, {ARGV[1], ARGV[2], ARGV[3]})
"""


class RedisSessionStore:
    """Sessions shared by every worker; one Lua script makes each touch atomic.

    Fails closed: Redis errors, an open ``breaker`` and timeouts all raise
    :class:`IdentityUnavailable` (503); the breaker spares requests the connection attempts
    while Redis is known to be down. A touch is never retried (it is not idempotent: a retry
    after a lost reply would see its own update).
    """

    def __init__(self, client: Redis, *, prefix: str, breaker: Breaker | None = None) -> None:
        self._client = client
        self._prefix = prefix
        self._script = client.register_script(_TOUCH)
        self._gated: dict[str, AsyncScript] = {}  # by the gate's Lua
        self._breaker = breaker
        self._direct = _PipelinedConnections(
            client, batch_timeout_s=None if breaker is None else breaker.call_timeout_s
        )

    async def touch(
        self,
        key: str,
        *,
        now: float,
        idle_s: float,
        keep_s: float,
        gate: SessionGate | None = None,
    ) -> SessionState:
        keys: list[str] = [f"{self._prefix}:session:{key}"]
        args: list[str | int | float] = [repr(now), repr(idle_s), str(max(1, int(keep_s * 1000)))]
        script = self._script
        if gate is not None:
            script = self._gated.get(gate.lua) or self._register(gate.lua)
            keys += gate.keys
            args += gate.args

        async def run() -> object:
            try:
                return await self._direct.evalsha(script, keys, args)
            except (RedisError, OSError) as exc:
                raise IdentityUnavailable("the session store is unavailable") from exc

        if self._breaker is None:
            result = await run()
        else:
            try:
                result = await self._breaker.call(run)
            except IdentityUnavailable:
                raise
            except StoreUnavailable as exc:  # open breaker or timed out
                raise IdentityUnavailable("the session store is unavailable") from exc
        if isinstance(result, int):  # only a gate answers with a number
            raise GateRefused(result)
        if gate is not None:
            gate.passed = True
        text = result.decode() if isinstance(result, bytes) else str(result)
        return SessionState(text)

    def _register(self, gate_lua: str) -> AsyncScript:
        if len(self._gated) >= 8:  # gates are a few fixed scripts; never one per request
            raise ConfigurationError("too many distinct session gates")
        script = self._client.register_script(gate_lua + _TOUCH_FUNCTION + _GATED_TOUCH)
        self._gated[gate_lua] = script
        return script


_Arg = str | int | float | bytes | memoryview


@dataclass(slots=True)
class _Pending:
    """A command waiting for a batch; ``script`` is the one an EVALSHA runs."""

    command: tuple[_Arg, ...]
    script: AsyncScript | None
    future: asyncio.Future[object]


class _PipelinedConnections:
    """Connections made by the client's own pool (the same server, credentials, TLS and
    timeouts), used directly for the touch and *pipelined*: the touches that callers start in
    one turn of the event loop go out as one write on one connection, and their replies are
    read back in order by the batch, each caller settled with its own. That spares each
    request the pool's per-command bookkeeping (a lock, a readiness probe that reads the
    socket, metrics and release events, the retry wrapper) and most socket writes and reads,
    in the worker and in redis-server alike.

    A batch holds at most ``max_batch`` commands. At most ``max_in_flight`` batches are in
    flight at once, each on a connection of its own; a command that comes meanwhile waits and
    goes in the next batch of the first connection to be done (see
    ``docs/decisions/identity-dpop-and-sessions.md`` for the measurements).

    The replies belong to the batch, not to the callers: a caller that leaves (cancelled, or
    timed out by its breaker) just drops its reply, and the connection stays in step. A
    ``NOSCRIPT`` reply means that ``EVALSHA`` ran nothing: the script is loaded and only those
    commands are sent again (after the rest of their batch, which was in flight with them: no
    order among them was promised). A batch whose connection is lost fails every caller in it, and
    the idle connections are dropped too (after a Redis restart they are all dead); a batch
    that times out (``batch_timeout_s``, or the connection's socket timeout) fails its callers
    and drops its own connection, which may hold unread replies. Nothing is retried.
    """

    def __init__(
        self,
        client: Redis,
        *,
        max_batch: int = 64,
        max_in_flight: int = 1,
        max_idle: int = 32,
        batch_timeout_s: float | None = None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._pool = client.connection_pool
        self._idle: list[AbstractConnection] = []
        self._max_idle = max_idle
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._batch_timeout_s = batch_timeout_s
        self._pending: collections.deque[_Pending] = collections.deque()
        self._senders = 0  # sender tasks running, each with at most one batch in flight
        self._starting = False  # a sender was started and has not taken its first batch yet
        self._tasks: set[asyncio.Task[None]] = set()  # strong references to the senders

    async def evalsha(
        self, script: AsyncScript, keys: list[str], args: list[str | int | float]
    ) -> object:
        return await self.call("EVALSHA", script.sha, len(keys), *keys, *args, script=script)

    async def call(self, *command: _Arg, script: AsyncScript | None = None) -> object:
        """Send ``command`` in the next batch and return its reply (an error reply is raised).
        With ``script``, a ``NOSCRIPT`` reply loads it and sends the command once more."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(command, script, future))
        if not self._starting and self._senders < self._max_in_flight:
            self._start_sender()
        return await future

    def _start_sender(self) -> None:
        # Its first step runs in the next turn of the loop, after this turn's callers queued
        # their commands.
        self._starting = True
        self._senders += 1
        started: list[bool] = []
        task = asyncio.ensure_future(self._send(started))
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if not started:  # cancelled before its first step: its finally never ran
                self._starting = False
                self._senders -= 1

        task.add_done_callback(done)

    async def _send(self, started: list[bool]) -> None:
        started.append(True)
        self._starting = False
        conn: AbstractConnection | None = None
        try:
            while batch := self._next_batch():
                if conn is None:
                    conn = self._take()
                if not await self._exchange(conn, batch):
                    conn = None  # dropped
        except asyncio.CancelledError:
            # Shutting down: the commands not sent yet will not be.
            while self._pending:
                self._fail([self._pending.popleft()], RedisConnectionError("shutting down"))
            raise
        finally:
            # Now, not in a done callback: a caller must not count a sender that is finished.
            self._senders -= 1
            if conn is not None:
                self._give(conn)

    def _next_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        pending = self._pending
        while pending and len(batch) < self._max_batch:
            entry = pending.popleft()
            if not entry.future.done():  # its caller left before it was sent: never send it
                batch.append(entry)
        return batch

    async def _exchange(self, conn: AbstractConnection, batch: list[_Pending]) -> bool:
        """Send ``batch`` on ``conn`` and settle its callers; False if ``conn`` was dropped."""
        try:
            async with asyncio.timeout(self._batch_timeout_s):
                if not conn.is_connected:
                    await conn.connect()  # type: ignore[no-untyped-call]
                again = await self._round_trip(conn, batch, ())
                if again:
                    # Those EVALSHAs ran nothing: load their scripts and send them once more.
                    scripts = {id(e.script): e.script for e in again if e.script is not None}
                    await self._round_trip(conn, again, tuple(scripts.values()))
        except (TimeoutError, RedisTimeoutError) as exc:
            # Slow, not gone: only this connection is out of step (dropping the others under
            # a slow server would add reconnections to the load).
            self._fail(batch, exc)
            await self._drop(conn, everyone=False)
            return False
        except (RedisConnectionError, OSError) as exc:
            # The server went away (a restart, a failover): the idle ones are dead too.
            self._fail(batch, exc)
            await self._drop(conn, everyone=True)
            return False
        except BaseException as exc:
            # A cancellation, another error: this connection may hold unread replies.
            self._fail(batch, exc)
            await self._drop(conn, everyone=False)
            if not isinstance(exc, Exception):
                raise
            return False
        return True

    async def _round_trip(
        self, conn: AbstractConnection, batch: list[_Pending], scripts: tuple[AsyncScript, ...]
    ) -> list[_Pending]:
        """Load ``scripts``, then send the batch's commands, in one write; settle each caller
        with its reply. Returns the entries to send again (NOSCRIPT on the first pass)."""
        commands: list[tuple[_Arg, ...]] = [("SCRIPT", "LOAD", s.script) for s in scripts]
        commands += [entry.command for entry in batch]
        packed = conn.pack_commands(commands)
        writer = getattr(conn, "_writer", None)
        if isinstance(writer, asyncio.StreamWriter):
            # What send_packed_command does, without the task its socket timeout wraps each
            # write in: the batch's timeout bounds the whole exchange.
            writer.writelines(packed)
            await writer.drain()
        else:
            await conn.send_packed_command(packed, check_health=False)
        for _ in scripts:
            # A failed load shows as NOSCRIPT again below, to the callers of that script.
            with contextlib.suppress(ResponseError):
                await conn.read_response()
        again: list[_Pending] = []
        for entry in batch:
            try:
                reply = await conn.read_response()
            except NoScriptError as exc:
                if entry.script is not None and not scripts:
                    if not entry.future.done():
                        again.append(entry)
                    continue
                _settle(entry.future, exc)
            except ResponseError as exc:  # an error reply: the connection is in step
                _settle(entry.future, exc)
            else:
                if not entry.future.done():
                    entry.future.set_result(reply)
        return again

    def _fail(self, batch: list[_Pending], exc: BaseException) -> None:
        # Each caller gets an exception of its own (one raised in several tasks would collect
        # their tracebacks).
        for entry in batch:
            if entry.future.done():
                continue
            error: RedisError
            if isinstance(exc, (TimeoutError, RedisTimeoutError)):
                error = RedisTimeoutError("the session store did not answer in time")
            else:
                error = RedisConnectionError(f"the session store's connection failed: {exc!r}")
            error.__cause__ = exc
            entry.future.set_exception(error)

    def _take(self) -> AbstractConnection:
        while self._idle:
            conn = self._idle.pop()
            reader = getattr(conn, "_reader", None)
            # Closed by the server (a restart, an idle timeout) or holding stray bytes: unusable.
            if reader is None or reader.at_eof() or len(getattr(reader, "_buffer", b"")):
                self._discard(conn)
                continue
            return conn
        made: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        return made

    def _give(self, conn: AbstractConnection) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            self._discard(conn)

    async def _drop(self, conn: AbstractConnection, *, everyone: bool) -> None:
        idle: list[AbstractConnection] = []
        if everyone:
            idle, self._idle = self._idle, []
        for each in (conn, *idle):
            with contextlib.suppress(Exception):
                await each.disconnect(nowait=True)

    def _discard(self, conn: AbstractConnection) -> None:
        task = asyncio.ensure_future(conn.disconnect(nowait=True))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _settle(future: asyncio.Future[object], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def session_key(principal: Principal, sid: object) -> str:
    """A stable, opaque key for the sign-in behind a token (never the token itself)."""
    if isinstance(sid, str) and sid:
        basis = f"sid\0{principal.issuer}\0{sid}"
    elif principal.auth.auth_time is not None:
        basis = f"auth\0{principal.issuer}\0{principal.subject}\0{principal.auth.auth_time}"
    else:
        basis = f"jti\0{principal.issuer}\0{principal.subject}\0{principal.token_id}"
        basis += f"\0{principal.issued_at}"
    return hashlib.sha256(basis.encode()).hexdigest()[:40]


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """Token age, session age, idle timeouts per role, and which roles need MFA."""

    max_token_age_s: float = 3600
    max_session_age_s: float = 12 * 3600
    idle_timeout_s: Mapping[Role, float | None] = field(default_factory=dict)
    default_idle_timeout_s: float | None = 900
    mfa_roles: frozenset[Role] = frozenset({Role.ADMIN, Role.PRIVACY_OFFICER})
    mfa_acr_values: frozenset[str] = frozenset()
    step_up_window_s: float = 300
    skew_s: float = 60

    def idle_timeout(self, principal: Principal) -> float | None:
        """The strictest idle timeout among the principal's roles (None: none applies)."""
        timeouts = [
            self.idle_timeout_s.get(role, self.default_idle_timeout_s) for role in principal.roles
        ]
        if not principal.roles:
            timeouts = [self.default_idle_timeout_s]
        bounded = [t for t in timeouts if t is not None]
        return min(bounded) if bounded else None

    def check(self, principal: Principal, *, now: float) -> None:
        """Token age, session age and MFA rules that need no store. Raises on failure."""
        if now - principal.issued_at > self.max_token_age_s + self.skew_s:
            raise SessionExpired("token-too-old", "the token is older than the maximum token age")
        auth_time = principal.auth.auth_time
        if auth_time is not None and now - auth_time > self.max_session_age_s + self.skew_s:
            raise SessionExpired(
                "session-too-old", "the sign-in is older than the maximum session age"
            )
        if principal.has_role(*self.mfa_roles) and not principal.auth.multi_factor(
            self.mfa_acr_values
        ):
            raise InsufficientAuthentication(
                "mfa-required",
                "this role requires multi-factor authentication",
                acr_values=self._acr_values(),
                max_age=None,
            )

    def _acr_values(self) -> str | None:
        return " ".join(sorted(self.mfa_acr_values)) or None


def require_step_up(principal: Principal, policy: SessionPolicy, *, now: float) -> None:
    """For sensitive operations: MFA within the last ``step_up_window_s`` (RFC 9470)."""
    auth_time = principal.auth.auth_time
    recent = auth_time is not None and now - auth_time <= policy.step_up_window_s + policy.skew_s
    if not (recent and principal.auth.multi_factor(policy.mfa_acr_values)):
        raise InsufficientAuthentication(
            "step-up-required",
            "this operation requires a recent multi-factor authentication",
            acr_values=policy._acr_values(),
            max_age=int(policy.step_up_window_s),
        )
