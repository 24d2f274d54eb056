"""Redis down, for real: rate limits fall back to the worker, bound tokens are refused.

"Down" is either a closed local port or a real redis-server this test starts on a free port
and kills (then starts again, to see the service return to Redis by itself).
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

import phivault.api.app as app_module
from phivault.api import create_app
from phivault.api.ratelimit import FALLBACK_NAME, Limited, RateLimiter
from phivault.errors import ConfigurationError
from phivault.identity.dpop import RedisReplayCache
from phivault.identity.errors import IdentityUnavailable
from phivault.identity.sessions import (
    GateRefused,
    MemorySessionStore,
    RedisSessionStore,
    SessionGate,
    SessionState,
)
from phivault.identity.testing import DPoPKey, FakeIssuer
from phivault.ledger.testing import InMemoryAuditSink
from phivault.resilience import Breaker, Breakers
from phivault.settings import ApiSettings, Settings, ShapeSettings
from redis_support import RedisServer

pytestmark = pytest.mark.integration
ISSUER = FakeIssuer("https://idp.fallback.test")
LOCAL_REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing answers on for the whole test: bound here and never listened on, so
    a connection is refused at once, and no other test (the suite runs in parallel) can
    start a server on it meanwhile, as it could on a port found free and let go (a
    "Redis" that then answered as something else failed this file once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@pytest.fixture
def prefix() -> str:
    return f"test-fallback-{uuid.uuid4().hex}"


@pytest.fixture
async def local_redis(prefix: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(LOCAL_REDIS)
    try:
        await client.ping()
    except Exception:  # pragma: no cover - the machine has Redis
        pytest.fail(f"Redis is not reachable at {LOCAL_REDIS}")
    yield client
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append(event)

    def info(self, event: str, **fields: Any) -> None:
        self.events.append(event)


def _limiter(url: str, prefix: str, log: Recorder, **kwargs: Any) -> RateLimiter:
    return RateLimiter.redis(
        url,
        prefix=prefix,
        per_address="3/minute",
        per_principal="100/minute",
        log=log,
        **kwargs,
    )


async def test_the_limiter_uses_redis_while_it_is_up(local_redis: Redis, prefix: str) -> None:
    log = Recorder()
    a = _limiter(LOCAL_REDIS, prefix, log)
    b = _limiter(LOCAL_REDIS, prefix, log)  # another worker
    results = [
        await (a if i % 2 else b).check(address="10.0.0.1", credential=None) for i in range(4)
    ]
    assert results[:3] == [None, None, None] and isinstance(results[3], Limited)
    assert [key async for key in local_redis.scan_iter(match=f"{prefix}:limits*")]
    assert not a.falling_back and log.events == []


async def test_with_redis_on_a_closed_port_the_limiter_falls_back_to_the_worker(
    prefix: str, closed_port: int
) -> None:
    log = Recorder()
    registry = CollectorRegistry()
    limiter = _limiter(
        f"redis://127.0.0.1:{closed_port}/0", prefix, log, breakers=Breakers(registry)
    )
    started = time.monotonic()
    results = [await limiter.check(address="10.0.0.2", credential=None) for _ in range(20)]
    assert time.monotonic() - started < 2
    # The worker's own counters still limit: 3 a minute.
    assert results[:3] == [None, None, None]
    assert all(isinstance(result, Limited) for result in results[3:])
    assert limiter.falling_back
    assert log.events == ["fallback.entered"]  # one line, not one per request
    assert registry.get_sample_value("phivault_fallback_active", {"fallback": FALLBACK_NAME}) == 1
    state = registry.get_sample_value("phivault_breaker_state", {"breaker": "redis.ratelimit"})
    assert state == 2  # open: Redis is not even tried per request
    rejected = registry.get_sample_value(
        "phivault_breaker_rejected_total", {"breaker": "redis.ratelimit"}
    )
    assert rejected is not None and rejected >= 15


async def test_the_limiter_returns_to_redis_by_itself(
    redis_server: RedisServer, prefix: str
) -> None:
    log = Recorder()
    limiter = _limiter(redis_server.url, prefix, log, probe_every_s=0.2)
    client = Redis.from_url(redis_server.url)
    try:
        assert await limiter.check(address="10.0.0.3", credential=None) is None
        assert await client.keys(f"{prefix}:limits*")
    finally:
        await client.aclose()
    redis_server.kill()
    for _ in range(10):
        await limiter.check(address="10.0.0.4", credential="c")
    assert limiter.falling_back and log.events == ["fallback.entered"]
    redis_server.start()  # empty: it keeps nothing on disk
    await asyncio.sleep(0.25)  # past the probe interval: the next request tries Redis
    assert await limiter.check(address="10.0.0.5", credential=None) is None
    assert not limiter.falling_back
    assert log.events == ["fallback.entered", "fallback.left"]
    client = Redis.from_url(redis_server.url)
    try:
        assert await client.keys(f"{prefix}:limits*")  # counted in Redis again
    finally:
        await client.aclose()


async def test_the_dpop_replay_cache_fails_closed_and_recovers(
    redis_server: RedisServer, prefix: str
) -> None:
    breaker = Breaker("redis.dpop", failure_threshold=2, reset_timeout_s=0.2, call_timeout_s=1)
    client = Redis.from_url(redis_server.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    cache = RedisReplayCache(client, prefix=prefix, breaker=breaker)
    try:
        assert await cache.first_use("jkt:one", 10) is True
        assert await cache.first_use("jkt:one", 10) is False
        redis_server.kill()
        for _ in range(5):
            with pytest.raises(IdentityUnavailable):
                await cache.first_use("jkt:two", 10)
        assert breaker.state == "open" and breaker.rejected == 3
        redis_server.start()
        await asyncio.sleep(0.25)
        assert await cache.first_use("jkt:two", 10) is True
        assert breaker.state == "closed"
    finally:
        await client.aclose()


# --- through the application ------------------------------------------------------------


@dataclass
class Worker:
    app: FastAPI
    client: httpx.AsyncClient
    logs: io.StringIO

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.logs.getvalue().splitlines() if line.strip()]
        return [line for line in lines if line.get("event") == name]


def _worker(
    redis_url: str,
    prefix: str,
    per_address: str = "3/minute",
    *,
    per_principal: str = "100/minute",
    clock: Callable[[], float] = time.time,
    audit: InMemoryAuditSink | None = None,
) -> Worker:
    settings = Settings(
        shape=ShapeSettings(shared_state="redis"),
        api=ApiSettings(
            redis_url=redis_url,
            redis_key_prefix=prefix,
            rate_limit_per_address=per_address,
            rate_limit_per_principal=per_principal,
        ),
    )
    logs = io.StringIO()
    app = create_app(
        settings,
        audit_sink=audit or InMemoryAuditSink(),
        key_sources={ISSUER.issuer: ISSUER.key_source()},
        log_stream=logs,
        clock=clock,
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
    return Worker(app, client, logs)


def _dpop_headers(url: str = "http://testserver/whoami") -> dict[str, str]:
    key = DPoPKey()
    now = time.time()
    token = ISSUER.token(now=now, cnf={"jkt": key.jkt})
    return {
        "Authorization": f"DPoP {token}",
        "DPoP": key.proof("GET", url, access_token=token, iat=now),
    }


async def test_app_with_redis_on_a_closed_port(prefix: str, closed_port: int) -> None:
    worker = _worker(f"redis://127.0.0.1:{closed_port}/0", prefix)
    async with worker.client as client:
        # A bound token cannot be checked against replays: refused (fail closed).
        refused = await client.get("/whoami", headers=_dpop_headers())
        assert refused.status_code == 503
        assert refused.json()["resourceType"] == "OperationOutcome"
        # Sessions cannot be checked either: an unbound token is refused too (fail closed).
        bearer = {"Authorization": f"Bearer {ISSUER.token(now=time.time())}"}
        assert (await client.get("/whoami", headers=bearer)).status_code == 503
        # Rate limiting did not fail closed: the limiter let the next one through to
        # authentication (401), then the worker's own limit (3 a minute) answers.
        statuses = [(await client.get("/whoami")).status_code for _ in range(4)]
        assert statuses == [401, 429, 429, 429]
        assert len(worker.events("fallback.entered")) == 1
        metrics = (await client.get("/metrics")).text
        assert f'phivault_fallback_active{{fallback="{FALLBACK_NAME}"}} 1.0' in metrics
        assert 'phivault_breaker_state{breaker="redis.dpop"}' in metrics
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503


async def test_app_through_a_redis_outage_and_back(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "REDIS_PROBE_S", 0.2)
    worker = _worker(redis_server.url, prefix, per_address="1000/minute")
    async with worker.client as client:
        assert (await client.get("/whoami", headers=_dpop_headers())).status_code == 200
        redis_server.kill()
        for _ in range(4):
            assert (await client.get("/whoami", headers=_dpop_headers())).status_code == 503
        metrics = (await client.get("/metrics")).text
        assert 'phivault_breaker_state{breaker="redis.dpop"} 2.0' in metrics
        assert len(worker.events("fallback.entered")) == 1
        redis_server.start()
        await asyncio.sleep(0.25)
        assert (await client.get("/whoami", headers=_dpop_headers())).status_code == 200
        assert len(worker.events("fallback.left")) == 1
        assert (await client.get("/readyz")).status_code == 200


async def test_the_session_store_fails_closed_behind_its_breaker(
    prefix: str, closed_port: int
) -> None:
    breaker = Breaker("redis.sessions", failure_threshold=3, reset_timeout_s=3600)
    client = Redis.from_url(f"redis://127.0.0.1:{closed_port}/0", socket_connect_timeout=0.5)
    store = RedisSessionStore(client, prefix=prefix, breaker=breaker)
    try:
        for _ in range(10):
            with pytest.raises(IdentityUnavailable):
                await store.touch("s1", now=1.0, idle_s=900, keep_s=3600)
        assert (breaker.failures, breaker.rejected, breaker.state) == (3, 7, "open")
    finally:
        await client.aclose()


# -- both counters in one round trip ----------------------------------------------------------


async def test_both_counters_cost_one_redis_call_per_request(
    redis_server: RedisServer, prefix: str
) -> None:
    limiter = _limiter(redis_server.url, prefix, Recorder())
    client = Redis.from_url(redis_server.url)

    async def calls() -> dict[str, int]:
        stats = await client.info("commandstats")
        return {name: int(value["calls"]) for name, value in stats.items()}

    try:
        await limiter.check(address="10.0.1.1", credential="c")  # loads the script once
        before = await calls()
        for _ in range(2):  # the address limit is 3 a minute
            assert await limiter.check(address="10.0.1.1", credential="c") is None
        after = await calls()
        # The commands a client sends itself (those run inside a script count too, so only
        # these tell round trips): one script call per request, for both counters.
        sent = {"cmdstat_evalsha", "cmdstat_eval", "cmdstat_script"}
        assert {k: after.get(k, 0) - before.get(k, 0) for k in sent} == {
            "cmdstat_evalsha": 2,
            "cmdstat_eval": 0,
            "cmdstat_script": 0,
        }
    finally:
        await client.aclose()


async def test_the_one_trip_counters_are_the_library_counters(
    local_redis: Redis, prefix: str
) -> None:
    # Same keys and algorithm as the limits library: its limiter (which computes Retry-After,
    # and which workers of an earlier version use) sees every hit, and the reverse.
    limiter = _limiter(LOCAL_REDIS, prefix, Recorder())
    library = SlidingWindowCounterRateLimiter(
        RedisStorage(
            f"async+{LOCAL_REDIS}", implementation="redispy", key_prefix=f"{prefix}:limits"
        )
    )
    per_address = parse("3/minute")
    assert await limiter.check(address="10.0.1.2", credential=None) is None
    assert (await library.get_window_stats(per_address, "address", "10.0.1.2")).remaining == 2
    assert await library.hit(per_address, "address", "10.0.1.2")
    assert await limiter.check(address="10.0.1.2", credential=None) is None
    refused = await limiter.check(address="10.0.1.2", credential=None)
    assert isinstance(refused, Limited) and refused.limit == "address"
    assert 1 <= refused.retry_after_s <= 60


async def test_a_request_refused_by_address_does_not_use_up_its_credential(
    local_redis: Redis, prefix: str
) -> None:
    limiter = RateLimiter.redis(
        LOCAL_REDIS, prefix=prefix, per_address="2/minute", per_principal="3/minute"
    )
    results = [await limiter.check(address="10.0.1.3", credential="k") for _ in range(4)]
    assert results[:2] == [None, None]
    assert [r.limit for r in results[2:] if isinstance(r, Limited)] == ["address", "address"]
    # The credential was counted twice (the allowed requests), not four times.
    assert await limiter.check(address="10.0.1.4", credential="k") is None
    refused = await limiter.check(address="10.0.1.5", credential="k")
    assert isinstance(refused, Limited) and refused.limit == "principal"
    # A refusal by credential still counted the address, as before (an attacker rotating
    # tokens from one address runs into the address limit).
    assert isinstance(await limiter.check(address="10.0.1.5", credential=None), Limited) is False
    assert isinstance(await limiter.check(address="10.0.1.5", credential=None), Limited)


# -- the counters in the session touch's round trip (a credential already authenticated) ------


class _Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


async def _commands(client: Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name: int(value["calls"]) for name, value in stats.items()}


def _failures(audit: InMemoryAuditSink) -> list[str | None]:
    return [e.outcome_reason for e in audit.events if e.subtype == "authentication"]


async def test_a_known_credential_costs_one_redis_call_per_request(
    redis_server: RedisServer, prefix: str
) -> None:
    worker = _worker(redis_server.url, prefix, per_address="1000/minute")
    client = Redis.from_url(redis_server.url)
    bearer = {"Authorization": f"Bearer {ISSUER.token(now=time.time())}"}
    try:
        async with worker.client as http:
            # The first request counts up front (a credential not seen yet), then touches.
            assert (await http.get("/whoami", headers=bearer)).status_code == 200
            assert (await http.get("/whoami", headers=bearer)).status_code == 200  # loads it
            before = await _commands(client)
            for _ in range(3):
                assert (await http.get("/whoami", headers=bearer)).status_code == 200
            after = await _commands(client)
        sent = {"cmdstat_evalsha", "cmdstat_eval", "cmdstat_script"}
        assert {k: after.get(k, 0) - before.get(k, 0) for k in sent} == {
            "cmdstat_evalsha": 3,  # one per request: both counters and the touch
            "cmdstat_eval": 0,
            "cmdstat_script": 0,
        }
        # ... and they are the library's counters, as when counted up front.
        library = SlidingWindowCounterRateLimiter(
            RedisStorage(
                f"async+{redis_server.url}", implementation="redispy", key_prefix=f"{prefix}:limits"
            )
        )
        stats = await library.get_window_stats(parse("1000/minute"), "address", "127.0.0.1")
        assert stats.remaining == 1000 - 5
    finally:
        await client.aclose()


async def test_a_known_credential_over_its_limit_is_refused_without_touching_its_session(
    local_redis: Redis, prefix: str
) -> None:
    clock = _Clock()
    worker = _worker(LOCAL_REDIS, prefix, per_address="1000/minute", per_principal="3/minute",
                     clock=clock)  # fmt: skip
    token = ISSUER.token(now=clock.t, exp=clock.t + 3000, sid=f"s-{uuid.uuid4().hex}")
    bearer = {"Authorization": f"Bearer {token}"}
    async with worker.client as http:
        for _ in range(3):
            assert (await http.get("/whoami", headers=bearer)).status_code == 200
            clock.t += 1
        (session,) = [key async for key in local_redis.scan_iter(match=f"{prefix}:session:*")]
        seen = await local_redis.get(session)
        for _ in range(2):
            clock.t += 1
            refused = await http.get("/whoami", headers=bearer)
            assert refused.status_code == 429
            assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert await local_redis.get(session) == seen  # not touched by a refused request


async def test_a_forged_token_is_counted_before_any_check_or_record(
    local_redis: Redis, prefix: str
) -> None:
    audit = InMemoryAuditSink()
    worker = _worker(LOCAL_REDIS, prefix, per_address="3/minute", audit=audit)
    token = ISSUER.token(now=time.time())
    forged = {"Authorization": f"Bearer {token[:-4]}AAAA"}
    async with worker.client as http:
        statuses = [(await http.get("/whoami", headers=forged)).status_code for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    assert _failures(audit) == ["bad-signature"] * 3  # nothing recorded past the limit


async def test_a_known_credential_that_expired_is_counted_before_its_refusal_is_recorded(
    local_redis: Redis, prefix: str
) -> None:
    clock = _Clock()
    audit = InMemoryAuditSink()
    worker = _worker(LOCAL_REDIS, prefix, per_address="4/minute", clock=clock, audit=audit)
    bearer = {"Authorization": f"Bearer {ISSUER.token(now=clock.t, exp=clock.t + 60)}"}
    async with worker.client as http:
        assert (await http.get("/whoami", headers=bearer)).status_code == 200
        assert (await http.get("/whoami", headers=bearer)).status_code == 200  # deferred
        clock.t += 600
        statuses = [(await http.get("/whoami", headers=bearer)).status_code for _ in range(4)]
    assert statuses == [401, 401, 429, 429]
    assert _failures(audit) == ["expired", "expired"]


async def test_a_known_credential_whose_session_idled_out_is_refused_at_the_next_request(
    local_redis: Redis, prefix: str
) -> None:
    clock = _Clock()
    audit = InMemoryAuditSink()
    worker = _worker(LOCAL_REDIS, prefix, per_address="1000/minute", clock=clock, audit=audit)
    token = ISSUER.token(now=clock.t, exp=clock.t + 3000, sid=f"s-{uuid.uuid4().hex}")
    bearer = {"Authorization": f"Bearer {token}"}
    async with worker.client as http:
        assert (await http.get("/whoami", headers=bearer)).status_code == 200
        clock.t += 600
        assert (await http.get("/whoami", headers=bearer)).status_code == 200  # deferred
        clock.t += 901
        assert (await http.get("/whoami", headers=bearer)).status_code == 401
        clock.t += 1
        assert (await http.get("/whoami", headers=bearer)).status_code == 401  # stays ended
    assert _failures(audit) == ["idle-timeout", "idle-timeout"]


async def test_a_known_credential_through_a_redis_outage_fails_closed_and_recovers(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "REDIS_PROBE_S", 0.2)
    worker = _worker(redis_server.url, prefix, per_address="1000/minute")
    bearer = {"Authorization": f"Bearer {ISSUER.token(now=time.time())}"}
    async with worker.client as http:
        for _ in range(2):
            assert (await http.get("/whoami", headers=bearer)).status_code == 200
        redis_server.kill()
        for _ in range(4):  # sessions cannot be checked: refused, never let in on a guess
            assert (await http.get("/whoami", headers=bearer)).status_code == 503
        metrics = (await http.get("/metrics")).text
        assert 'phivault_breaker_state{breaker="redis.sessions"} 2.0' in metrics
        redis_server.start()
        await asyncio.sleep(0.25)
        assert (await http.get("/whoami", headers=bearer)).status_code == 200
        assert (await http.get("/whoami", headers=bearer)).status_code == 200


async def test_a_session_gate_runs_before_the_touch_and_a_refusal_touches_nothing(
    local_redis: Redis, prefix: str
) -> None:
    store = RedisSessionStore(local_redis, prefix=prefix)
    refuse = "local function gate(KEYS, ARGV) return tonumber(ARGV[1]) end\n"
    closed = SessionGate(refuse, (), (7,))
    with pytest.raises(GateRefused) as refused:
        await store.touch("s1", now=1.0, idle_s=900, keep_s=3600, gate=closed)
    assert refused.value.code == 7 and not closed.passed
    assert await local_redis.get(f"{prefix}:session:s1") is None
    # A gate that lets it through: the touch happens, in the same script, on the gate's keys too.
    counting = (
        "local function gate(KEYS, ARGV) redis.call('INCRBY', KEYS[1], ARGV[1]) return 0 end\n"
    )
    gate = SessionGate(counting, (f"{prefix}:gate",), (2,))
    assert await store.touch("s1", now=1.0, idle_s=900, keep_s=3600, gate=gate) is SessionState.NEW
    assert gate.passed and await local_redis.get(f"{prefix}:gate") == b"2"
    ended = SessionGate(counting, (f"{prefix}:gate",), (1,))
    assert await store.touch("s1", now=2000.0, idle_s=900, keep_s=3600, gate=ended) is (
        SessionState.ENDED
    )
    assert ended.passed  # the gate let it through; the session had idled out


async def test_the_in_memory_session_store_refuses_a_gate_rather_than_skip_it() -> None:
    gate = SessionGate("local function gate(KEYS, ARGV) return 0 end\n", (), ())
    with pytest.raises(ConfigurationError):
        await MemorySessionStore().touch("s1", now=1.0, idle_s=900, keep_s=3600, gate=gate)
