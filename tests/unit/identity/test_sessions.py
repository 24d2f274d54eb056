from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from phivault.identity.errors import InsufficientAuthentication, SessionExpired
from phivault.identity.principal import Role, principal_from_claims
from phivault.identity.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    SessionPolicy,
    SessionState,
    SessionStore,
    require_step_up,
)
from phivault.identity.testing import FakeIssuer

NOW = 1_800_000_000.0
ISSUER = FakeIssuer()
POLICY = SessionPolicy(
    idle_timeout_s={Role.CLINICIAN: 900, Role.SERVICE: None, Role.RESEARCHER: 300},
    mfa_acr_values=frozenset({"urn:mfa"}),
)


def principal(**claims: object):  # type: ignore[no-untyped-def]
    return principal_from_claims(ISSUER.claims(NOW, **claims))


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[SessionStore]:
    if request.param == "memory":
        yield MemorySessionStore()
        return
    client = Redis.from_url("redis://127.0.0.1:6379/0")
    yield RedisSessionStore(client, prefix=redis_prefix)
    await client.aclose()


async def test_idle_timeout_ends_the_session(store: SessionStore) -> None:
    assert await store.touch("s1", now=NOW, idle_s=900, keep_s=3600) is SessionState.NEW
    assert await store.touch("s1", now=NOW + 800, idle_s=900, keep_s=3600) is SessionState.ACTIVE
    assert await store.touch("s1", now=NOW + 1600, idle_s=900, keep_s=3600) is SessionState.ACTIVE
    assert await store.touch("s1", now=NOW + 2501, idle_s=900, keep_s=3600) is SessionState.ENDED
    # Once ended, it stays ended.
    assert await store.touch("s1", now=NOW + 2502, idle_s=900, keep_s=3600) is SessionState.ENDED
    assert await store.touch("s2", now=NOW + 2502, idle_s=900, keep_s=3600) is SessionState.NEW


def test_idle_timeout_is_the_strictest_role() -> None:
    assert POLICY.idle_timeout(principal(roles=["clinician"])) == 900
    assert POLICY.idle_timeout(principal(roles=["clinician", "researcher"])) == 300
    assert POLICY.idle_timeout(principal(roles=["service"])) is None
    assert POLICY.idle_timeout(principal(roles=[])) == 900


def test_token_and_session_age() -> None:
    POLICY.check(principal(), now=NOW + 100)
    with pytest.raises(SessionExpired):
        POLICY.check(principal(), now=NOW + 3600 + 61)
    with pytest.raises(SessionExpired):
        POLICY.check(principal(auth_time=NOW - 13 * 3600), now=NOW)


@pytest.mark.parametrize("role", ["admin", "privacy-officer"])
def test_mfa_required_for_admin_roles(role: str) -> None:
    with pytest.raises(InsufficientAuthentication) as info:
        POLICY.check(principal(roles=[role], amr=["pwd"]), now=NOW)
    assert info.value.error == "insufficient_user_authentication"
    assert info.value.acr_values == "urn:mfa"
    POLICY.check(principal(roles=[role], amr=["pwd", "otp"]), now=NOW)
    POLICY.check(principal(roles=[role], amr=["pwd"], acr="urn:mfa"), now=NOW)


def test_step_up_window() -> None:
    recent = principal(amr=["pwd", "hwk"], auth_time=NOW - 60)
    require_step_up(recent, POLICY, now=NOW)
    stale = principal(amr=["pwd", "hwk"], auth_time=NOW - 3600)
    with pytest.raises(InsufficientAuthentication) as info:
        require_step_up(stale, POLICY, now=NOW)
    assert info.value.max_age == 300
    with pytest.raises(InsufficientAuthentication):
        require_step_up(principal(amr=["pwd"], auth_time=NOW), POLICY, now=NOW)
