from __future__ import annotations

import pytest

from phivault.identity.authenticator import Authenticated, Authenticator
from phivault.identity.dpop import DPoPVerifier, MemoryReplayCache
from phivault.identity.errors import (
    DPoPError,
    InsufficientAuthentication,
    InvalidToken,
    MissingCredentials,
    SessionExpired,
)
from phivault.identity.principal import Role
from phivault.identity.sessions import MemorySessionStore, SessionPolicy
from phivault.identity.testing import DPoPKey, FakeIssuer
from phivault.identity.tokens import TokenValidator, TrustedIssuerKeys

NOW = 1_800_000_000.0
URL = "http://testserver/whoami"
ISSUER = FakeIssuer()


def authenticator() -> Authenticator:
    return Authenticator(
        TokenValidator(
            [TrustedIssuerKeys(ISSUER.issuer, ISSUER.key_source())],
            audience="phivault",
            algorithms=["ES256"],
            skew_s=60,
        ),
        DPoPVerifier(MemoryReplayCache(), algorithms=["ES256"], max_age_s=60, skew_s=5),
        SessionPolicy(idle_timeout_s={Role.CLINICIAN: 900}),
        MemorySessionStore(),
        default_tenant="default",
    )


async def auth(
    a: Authenticator, authorization: str | None, proofs: tuple[str, ...] = (), now: float = NOW
) -> Authenticated:
    return await a.authenticate(
        method="GET", url=URL, authorization=authorization, dpop_proofs=proofs, now=now
    )


async def test_bearer() -> None:
    a = authenticator()
    result = await auth(a, f"Bearer {ISSUER.token(now=NOW)}")
    assert result.principal.subject == "user-1"
    assert result.new_session


async def test_missing_and_malformed_credentials() -> None:
    a = authenticator()
    with pytest.raises(MissingCredentials):
        await auth(a, None)
    with pytest.raises(InvalidToken):
        await auth(a, "Basic dXNlcjpwYXNz")
    with pytest.raises(InvalidToken):
        await auth(a, "Bearer a b c")


async def test_dpop_bound_token() -> None:
    a = authenticator()
    key = DPoPKey()
    token = ISSUER.token(now=NOW, cnf={"jkt": key.jkt})
    proof = key.proof("GET", URL, access_token=token, iat=NOW)
    result = await auth(a, f"DPoP {token}", (proof,))
    assert result.principal.dpop_jkt == key.jkt
    with pytest.raises(DPoPError):  # same proof again
        await auth(a, f"DPoP {token}", (proof,))
    with pytest.raises(DPoPError):  # bound token presented as a bearer token
        await auth(a, f"Bearer {token}")
    with pytest.raises(DPoPError):  # bound token without its proof
        await auth(a, f"DPoP {token}")
    two = (
        key.proof("GET", URL, access_token=token, iat=NOW),
        key.proof("GET", URL, access_token=token, iat=NOW),
    )
    with pytest.raises(DPoPError):
        await auth(a, f"DPoP {token}", two)


async def test_dpop_scheme_with_unbound_token() -> None:
    key = DPoPKey()
    token = ISSUER.token(now=NOW)
    with pytest.raises(InvalidToken):
        await auth(
            authenticator(), f"DPoP {token}", (key.proof("GET", URL, access_token=token, iat=NOW),)
        )


async def test_idle_timeout() -> None:
    a = authenticator()
    token = ISSUER.token(now=NOW, exp=NOW + 3000, sid="session-1")
    await auth(a, f"Bearer {token}", now=NOW)
    await auth(a, f"Bearer {token}", now=NOW + 600)
    with pytest.raises(SessionExpired) as info:
        await auth(a, f"Bearer {token}", now=NOW + 600 + 901)
    assert info.value.reason == "idle-timeout"
    # A new token for the same session does not revive it.
    with pytest.raises(SessionExpired):
        await auth(a, f"Bearer {ISSUER.token(now=NOW + 1502, sid='session-1')}", now=NOW + 1502)


async def test_admin_without_mfa() -> None:
    with pytest.raises(InsufficientAuthentication):
        await auth(authenticator(), f"Bearer {ISSUER.token(now=NOW, roles=['admin'], amr=['pwd'])}")
    await auth(
        authenticator(), f"Bearer {ISSUER.token(now=NOW, roles=['admin'], amr=['pwd', 'mfa'])}"
    )
