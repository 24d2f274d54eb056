"""Pipelined session touches (``_PipelinedConnections``) against a real redis-server: the
touches started in one turn of the event loop go out as one write on one connection, and each
caller gets its own reply, whatever the others do (leave, find their script flushed, get
refused by their gate), and fails closed when the batch's connection is lost or too slow."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from phivault.identity.errors import IdentityUnavailable
from phivault.identity.sessions import (
    GateRefused,
    MemorySessionStore,
    RedisSessionStore,
    SessionGate,
    SessionState,
    _PipelinedConnections,
)
from phivault.resilience import Breaker
from ports_support import free_port
from redis_support import RedisServer

pytestmark = pytest.mark.integration

IDLE, KEEP = 900.0, 3600.0
# Refuses with the code it is given (0 lets the touch through).
GATE = "local function gate(KEYS, ARGV)\n  return tonumber(ARGV[1])\nend\n"


def store_of(client: Redis, *, breaker: Breaker | None = None) -> RedisSessionStore:
    return RedisSessionStore(client, prefix=f"t{secrets.token_hex(4)}", breaker=breaker)


def touch(store: RedisSessionStore, key: str, now: float) -> Awaitable[SessionState]:
    return store.touch(key, now=now, idle_s=IDLE, keep_s=KEEP)


class RoundTrips:
    """Counts the batches a store's connections send (a spy around the real exchange)."""

    def __init__(self, store: RedisSessionStore) -> None:
        self.batches: list[int] = []
        self.loads = 0
        direct = store._direct
        real: Callable[..., Awaitable[list[object]]] = direct._round_trip

        async def counting(
            conn: object, batch: list[object], scripts: tuple[object, ...]
        ) -> object:
            self.batches.append(len(batch))
            self.loads += bool(scripts)
            return await real(conn, batch, scripts)

        direct._round_trip = counting  # type: ignore[method-assign]


async def test_concurrent_touches_go_in_one_write_each_caller_with_its_own_reply(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url)
    store = store_of(client)
    try:
        await asyncio.gather(*(touch(store, f"s{i}", 1.0) for i in range(128)))
        trips = RoundTrips(store)
        # s0-s63 touched again soon (active), s64-s127 after the idle timeout (ended),
        # s128-s191 never touched before (new): interleaved, so neighbours differ.
        keys = [f"s{i}" for i in range(192)]
        keys = keys[0::3] + keys[1::3] + keys[2::3]
        expected = {
            key: SessionState.ACTIVE
            if int(key[1:]) < 64
            else SessionState.ENDED
            if int(key[1:]) < 128
            else SessionState.NEW
            for key in keys
        }
        nows = {SessionState.ACTIVE: 2.0, SessionState.ENDED: 2000.0, SessionState.NEW: 2.0}
        states = await asyncio.gather(*(touch(store, k, nows[expected[k]]) for k in keys))
        assert states == [expected[k] for k in keys]
        assert trips.batches == [64, 64, 64]  # capped at 64 commands a batch
        assert len(store._direct._idle) == 1  # all on one connection

        echoes = await asyncio.gather(*(store._direct.call("ECHO", str(i)) for i in range(300)))
        assert echoes == [str(i).encode() for i in range(300)]
    finally:
        await client.aclose()


async def test_gates_refuse_or_let_through_each_caller_of_a_batch(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url)
    store = store_of(client)
    try:
        codes = [i % 4 for i in range(40)]  # 0: let through; 1-3: refused with that code
        gates = [SessionGate(GATE, (), (code,)) for code in codes]

        async def gated(i: int) -> SessionState | int:
            try:
                return await store.touch(f"s{i}", now=1.0, idle_s=IDLE, keep_s=KEEP, gate=gates[i])
            except GateRefused as refused:
                return refused.code

        outcomes = await asyncio.gather(*(gated(i) for i in range(40)))
        assert outcomes == [SessionState.NEW if code == 0 else code for code in codes]
        assert [gate.passed for gate in gates] == [code == 0 for code in codes]
        # A refused touch touched nothing.
        again = await asyncio.gather(*(touch(store, f"s{i}", 2.0) for i in range(40)))
        assert again == [SessionState.ACTIVE if code == 0 else SessionState.NEW for code in codes]
    finally:
        await client.aclose()


async def test_scripts_flushed_in_the_middle_of_a_load_are_loaded_again(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url)
    other = Redis.from_url(redis_server.url)
    store = store_of(client)
    trips = RoundTrips(store)
    stop = asyncio.Event()

    async def flush() -> None:
        while not stop.is_set():
            await other.script_flush()
            await asyncio.sleep(0.002)

    flusher = asyncio.ensure_future(flush())
    try:
        for turn in range(30):
            plain = [touch(store, f"p{i}", 1.0 + turn) for i in range(20)]
            gated = [
                store.touch(
                    f"g{i}", now=1.0 + turn, idle_s=IDLE, keep_s=KEEP,
                    gate=SessionGate(GATE, (), (0,)),
                )
                for i in range(20)
            ]  # fmt: skip
            states = await asyncio.gather(*plain, *gated)
            assert set(states) == {SessionState.NEW if turn == 0 else SessionState.ACTIVE}
    finally:
        stop.set()
        await flusher
        await other.aclose()
        await client.aclose()
    assert trips.loads > 0  # some batches did find their scripts flushed


async def test_a_caller_leaving_mid_batch_leaves_the_connection_in_step(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url)
    store = store_of(client)
    direct = store._direct
    try:
        assert await touch(store, "warm", 1.0) is SessionState.NEW
        (conn,) = direct._idle
        # One batch: a BLPOP that blocks the connection, then ten touches behind it.
        blocked = asyncio.ensure_future(direct.call("BLPOP", "list", 5))
        sent = [asyncio.ensure_future(touch(store, f"s{i}", 1.0)) for i in range(10)]
        await asyncio.sleep(0.1)
        # Queued behind that batch (one batch in flight at a time), not sent yet.
        queued = [asyncio.ensure_future(touch(store, f"q{i}", 1.0)) for i in range(5)]
        await asyncio.sleep(0.05)
        for task in (blocked, sent[3], queued[1]):
            task.cancel()
        await client.rpush("list", "x")  # BLPOP's reply: read by the batch, dropped
        done = await asyncio.gather(*sent, *queued, return_exceptions=True)
        assert isinstance(done[3], asyncio.CancelledError)
        assert isinstance(done[10 + 1], asyncio.CancelledError)
        assert [d for i, d in enumerate(done) if i not in (3, 11)] == [SessionState.NEW] * 13
        assert direct._idle == [conn]  # still in step, kept
        assert await client.llen("list") == 0  # the BLPOP ran
        # A touch sent before its caller left ran; one cancelled while queued was never sent.
        assert await touch(store, "s3", 2.0) is SessionState.ACTIVE
        assert await touch(store, "q1", 2.0) is SessionState.NEW
        assert await direct.call("ECHO", "next") == b"next"
    finally:
        await client.aclose()


async def test_a_batch_that_times_out_fails_its_callers_and_drops_its_connection(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url)
    breaker = Breaker("sessions", failure_threshold=100, call_timeout_s=0.3)
    store = store_of(client, breaker=breaker)
    direct = store._direct
    try:
        assert await touch(store, "warm", 1.0) is SessionState.NEW
        blocked = asyncio.ensure_future(direct.call("BLPOP", "list", 2))
        touches = [touch(store, f"s{i}", 1.0) for i in range(10)]
        outcomes = await asyncio.gather(*touches, return_exceptions=True)
        assert all(isinstance(o, IdentityUnavailable) for o in outcomes)
        with pytest.raises(RedisError):  # the batch's own timeout (the breaker's call limit)
            await blocked
        assert direct._idle == []  # it held unread replies: dropped
        await client.rpush("list", "x")
        states = await asyncio.gather(*(touch(store, f"s{i}", 2.0) for i in range(10)))
        assert set(states) <= {SessionState.NEW, SessionState.ACTIVE}
        assert await direct.call("ECHO", "in step") == b"in step"
    finally:
        await client.aclose()


async def test_a_killed_server_fails_every_caller_of_the_batch(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url, socket_timeout=1, socket_connect_timeout=1)
    store = store_of(client, breaker=Breaker("sessions", failure_threshold=100))
    direct = store._direct
    try:
        assert await touch(store, "warm", 1.0) is SessionState.NEW
        blocked = asyncio.ensure_future(direct.call("BLPOP", "list", 5))
        sent = [asyncio.ensure_future(touch(store, f"s{i}", 1.0)) for i in range(20)]
        await asyncio.sleep(0.1)
        queued = [asyncio.ensure_future(touch(store, f"q{i}", 1.0)) for i in range(5)]
        await asyncio.sleep(0.05)
        redis_server.kill()
        outcomes = await asyncio.gather(*sent, *queued, return_exceptions=True)
        assert all(isinstance(o, IdentityUnavailable) for o in outcomes), outcomes
        with pytest.raises(RedisConnectionError):
            await blocked
        assert direct._idle == []
        redis_server.start()
        await asyncio.sleep(0.1)
        states = await asyncio.gather(*(touch(store, f"s{i}", 2.0) for i in range(20)))
        assert set(states) == {SessionState.NEW}  # a new server: nothing remembered
    finally:
        await client.aclose()


async def test_a_closed_port_fails_every_caller() -> None:
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    store = store_of(client, breaker=Breaker("sessions", failure_threshold=100))
    try:
        outcomes = await asyncio.gather(
            *(touch(store, f"s{i}", 1.0) for i in range(30)), return_exceptions=True
        )
        assert all(isinstance(o, IdentityUnavailable) for o in outcomes), outcomes
        assert store._direct._idle == []
    finally:
        await client.aclose()


def test_batches_of_more_than_one_in_flight_are_allowed() -> None:
    with pytest.raises(ValueError):
        _PipelinedConnections(Redis(), max_in_flight=0)
    with pytest.raises(ValueError):
        _PipelinedConnections(Redis(), max_batch=0)


# One touch: a session (of a few, so that they meet), a time, and a gate's code (None: no gate).
_touches = st.lists(
    st.tuples(
        st.integers(0, 4),
        st.floats(0, 3000, allow_nan=False).map(lambda t: round(t, 3)),
        st.one_of(st.none(), st.sampled_from([0, 0, 1, 7])),
    ),
    min_size=1,
    max_size=150,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(touches=_touches)
def test_concurrent_touches_end_as_sequential_ones_would(
    touches: list[tuple[int, float, int | None]],
) -> None:
    """Started together (in one turn, or over a few), the touches find what the same touches
    one after the other find: each key's touches run in the order they were started (with the
    scripts loaded; see below)."""

    def expected() -> list[SessionState | int]:
        model: MemorySessionStore = MemorySessionStore()
        outcomes: dict[int, SessionState | int] = {}

        async def run() -> None:
            # The order they start in: the ones that wait a turn after the others.
            for i in sorted(range(len(touches)), key=lambda i: (i % 7 == 0, i)):
                key, now, code = touches[i]
                if code:
                    outcomes[i] = code
                else:
                    outcomes[i] = await model.touch(f"k{key}", now=now, idle_s=IDLE, keep_s=KEEP)

        asyncio.run(run())
        return [outcomes[i] for i in range(len(touches))]

    async def concurrent() -> list[SessionState | int]:
        client = Redis.from_url("redis://127.0.0.1:6379/0")
        store = store_of(client)

        async def one(i: int, key: int, now: float, code: int | None) -> SessionState | int:
            if i % 7 == 0:
                await asyncio.sleep(0)  # some start a turn later, while a batch is in flight
            gate = None if code is None else SessionGate(GATE, (), (code,))
            try:
                return await store.touch(f"k{key}", now=now, idle_s=IDLE, keep_s=KEEP, gate=gate)
            except GateRefused as refused:
                return refused.code

        try:
            # Both scripts loaded first: an EVALSHA answered NOSCRIPT is sent again after the
            # rest of its batch, so the first batch's order would depend on which script the
            # server happened to know.
            await one(1, 5, 0.0, None)
            await one(1, 5, 0.0, 0)
            tasks = [asyncio.ensure_future(one(i, *t)) for i, t in enumerate(touches)]
            return list(await asyncio.gather(*tasks))
        finally:
            await client.delete(*(f"{store._prefix}:session:k{k}" for k in range(6)))
            await client.aclose()

    assert asyncio.run(concurrent()) == expected()
