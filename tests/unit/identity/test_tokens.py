from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phivault.errors import ConfigurationError
from phivault.identity.errors import IdentityUnavailable, InvalidToken
from phivault.identity.jwks import JwksCache, import_public_jwks
from phivault.identity.testing import FakeIssuer, b64url, forge_hmac_with_public_key, forge_unsigned
from phivault.identity.tokens import TokenValidator, TrustedIssuerKeys, b64url_decode, check_claims

NOW = 1_800_000_000.0
ISSUER = FakeIssuer()


def validator(issuer: FakeIssuer = ISSUER, **kw: Any) -> TokenValidator:
    return TokenValidator(
        [TrustedIssuerKeys(issuer.issuer, issuer.key_source())],
        audience="phivault",
        algorithms=kw.get("algorithms", ["ES256", "Ed25519", "RS256"]),
        skew_s=60,
    )


async def test_valid_token() -> None:
    claims = await validator().validate(ISSUER.token(now=NOW), now=NOW + 5)
    assert claims["sub"] == "user-1"


@pytest.mark.parametrize("alg", ["Ed25519", "RS256"])
async def test_other_algorithms(alg: str) -> None:
    issuer = FakeIssuer(alg=alg)
    claims = await validator(issuer).validate(issuer.token(now=NOW), now=NOW)
    assert claims["iss"] == issuer.issuer


@pytest.mark.parametrize(
    ("overrides", "now", "reason"),
    [
        ({"exp": NOW - 100}, NOW, "expired"),
        ({"nbf": NOW + 600}, NOW, "not-yet-valid"),
        ({"iat": NOW + 600}, NOW, "issued-in-future"),
        ({"aud": "someone-else"}, NOW, "wrong-audience"),
        ({"aud": ["a", "b"]}, NOW, "wrong-audience"),
        ({"exp": None}, NOW, "missing-claim"),
        ({"iat": None}, NOW, "missing-claim"),
        ({"exp": "soon"}, NOW, "bad-claim"),
    ],
)
async def test_claims_refused(overrides: dict[str, Any], now: float, reason: str) -> None:
    with pytest.raises(InvalidToken) as info:
        await validator().validate(ISSUER.token(now=NOW, **overrides), now=now)
    assert info.value.reason == reason


async def test_skew_is_tolerated_and_bounded() -> None:
    token = ISSUER.token(now=NOW, exp=NOW + 10)
    await validator().validate(token, now=NOW + 60)  # within the 60 s skew
    with pytest.raises(InvalidToken):
        await validator().validate(token, now=NOW + 71)


async def test_unknown_issuer() -> None:
    other = FakeIssuer("https://evil.test")
    with pytest.raises(InvalidToken) as info:
        await validator().validate(other.token(now=NOW), now=NOW)
    assert info.value.reason == "wrong-issuer"


async def test_issuer_claim_swapped_to_trusted_but_signed_by_other_key() -> None:
    other = FakeIssuer(ISSUER.issuer)  # same name, different key
    with pytest.raises(InvalidToken) as info:
        await validator().validate(other.token(now=NOW), now=NOW)
    assert info.value.reason == "unknown-kid"
    forged = other.token(now=NOW, header={"kid": ISSUER.kid})
    with pytest.raises(InvalidToken) as info:
        await validator().validate(forged, now=NOW)
    assert info.value.reason == "bad-signature"


async def test_alg_none_refused() -> None:
    with pytest.raises(InvalidToken) as info:
        await validator().validate(forge_unsigned(ISSUER.claims(NOW)), now=NOW)
    assert info.value.reason == "algorithm-refused"


async def test_hmac_with_public_key_refused() -> None:
    token = forge_hmac_with_public_key(ISSUER.claims(NOW), ISSUER.jwks()["keys"][0], ISSUER.kid)
    with pytest.raises(InvalidToken) as info:
        await validator().validate(token, now=NOW)
    assert info.value.reason == "algorithm-refused"


async def test_algorithm_not_in_allow_list() -> None:
    issuer = FakeIssuer(alg="RS256")
    with pytest.raises(InvalidToken):
        await validator(issuer, algorithms=["ES256"]).validate(issuer.token(now=NOW), now=NOW)


def test_symmetric_algorithms_cannot_be_configured() -> None:
    for algorithms in (["HS256"], ["none"], [], ["ES256", "HS512"], ["XX1"]):
        with pytest.raises(ConfigurationError):
            validator(algorithms=algorithms)


async def test_dpop_proof_is_not_an_access_token() -> None:
    token = ISSUER.token(now=NOW, header={"typ": "dpop+jwt"})
    with pytest.raises(InvalidToken) as info:
        await validator().validate(token, now=NOW)
    assert info.value.reason == "wrong-type"


@pytest.mark.parametrize("junk", ["", "a.b", "a.b.c.d", "!!!.###.$$$", "e30.e30.", "x" * 9000])
async def test_malformed(junk: str) -> None:
    with pytest.raises(InvalidToken):
        await validator().validate(junk, now=NOW)


async def test_verified_cache_still_checks_expiry() -> None:
    v = validator()
    token = ISSUER.token(now=NOW, exp=NOW + 100)
    await v.validate(token, now=NOW)
    await v.validate(token, now=NOW + 1)
    with pytest.raises(InvalidToken):
        await v.validate(token, now=NOW + 1000)


TOKEN = ISSUER.token(now=NOW)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
async def test_any_mutation_of_a_signed_token_is_refused(data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(TOKEN) - 1))
    replacement = data.draw(
        st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    )
    mutated = TOKEN[:position] + replacement + TOKEN[position + 1 :]
    if mutated == TOKEN or _same_bytes(mutated, TOKEN):
        return
    with pytest.raises(InvalidToken):
        await validator().validate(mutated, now=NOW)


def _same_bytes(a: str, b: str) -> bool:
    # The last base64url character of a segment may carry unused bits: a change there can
    # decode to the same bytes. Such a token *is* the signed token.
    try:
        return [b64url_decode(x) for x in a.split(".")] == [b64url_decode(x) for x in b.split(".")]
    except ValueError:
        return False


@given(
    st.dictionaries(
        st.sampled_from(["sub", "tenant", "roles", "scope", "admin"]), st.text(max_size=20)
    )
)
async def test_any_payload_change_is_refused(changes: dict[str, str]) -> None:
    header, payload, signature = TOKEN.split(".")
    claims = json.loads(b64url_decode(payload))
    if all(claims.get(k) == v for k, v in changes.items()):
        return
    claims.update(changes)
    tampered = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    with pytest.raises(InvalidToken):
        await validator().validate(tampered, now=NOW)


def test_check_claims_is_pure() -> None:
    claims = ISSUER.claims(NOW)
    check_claims(claims, issuer=ISSUER.issuer, audience="phivault", now=NOW, skew_s=0)
    with pytest.raises(InvalidToken):
        check_claims(claims, issuer=ISSUER.issuer, audience="phivault", now=NOW + 600, skew_s=0)


# --- JWKS: discovery, caching, rotation ---------------------------------------------------


class FakeProvider:
    def __init__(self, issuer: FakeIssuer) -> None:
        self.issuer = issuer
        self.requests: list[str] = []
        self.down = False

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if self.down:
            return httpx.Response(503)
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(
                200, json={"issuer": self.issuer.issuer, "jwks_uri": f"{self.issuer.issuer}/jwks"}
            )
        if request.url.path == "/jwks":
            return httpx.Response(200, json=self.issuer.jwks())
        return httpx.Response(404)


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


async def test_jwks_discovery_cache_and_rotation() -> None:
    idp = FakeIssuer("https://idp.test")
    provider = FakeProvider(idp)
    clock = Clock()
    async with httpx.AsyncClient(transport=httpx.MockTransport(provider.handler)) as client:
        cache = JwksCache(
            issuer=idp.issuer,
            jwks_url=None,
            client=client,
            clock=clock,
            ttl_s=300,
            min_refresh_s=10,
        )
        v = TokenValidator(
            [TrustedIssuerKeys(idp.issuer, cache)],
            audience="phivault",
            algorithms=["ES256"],
            skew_s=60,
        )
        await v.validate(idp.token(now=NOW), now=NOW)
        await v.validate(idp.token(now=NOW), now=NOW)
        assert provider.requests == ["/.well-known/openid-configuration", "/jwks"]
        # Rotation: a token with a new kid makes the cache refetch (after min_refresh_s).
        idp.rotate()
        clock.t += 11
        await v.validate(idp.token(now=clock.t), now=clock.t)
        assert provider.requests.count("/jwks") == 2
        # A flood of unknown kids does not become a flood of fetches.
        for _ in range(5):
            with pytest.raises(InvalidToken):
                await v.validate(idp.token(now=clock.t, header={"kid": "made-up"}), now=clock.t)
        assert provider.requests.count("/jwks") == 2
        # The provider goes down: keys held keep working until they are too stale.
        provider.down = True
        clock.t += 400
        await v.validate(idp.token(now=clock.t), now=clock.t)
        clock.t += 4000
        with pytest.raises(IdentityUnavailable):
            await v.validate(idp.token(now=clock.t), now=clock.t)


async def test_jwks_unreachable_from_the_start_fails_closed() -> None:
    idp = FakeIssuer("https://idp.test")
    provider = FakeProvider(idp)
    provider.down = True
    async with httpx.AsyncClient(transport=httpx.MockTransport(provider.handler)) as client:
        cache = JwksCache(
            issuer=idp.issuer, jwks_url="https://idp.test/jwks", client=client, clock=Clock()
        )
        with pytest.raises(IdentityUnavailable):
            await cache.ready()


async def test_old_key_dropped_from_jwks_invalidates_cached_tokens() -> None:
    idp = FakeIssuer("https://idp.test")
    provider = FakeProvider(idp)
    clock = Clock()
    async with httpx.AsyncClient(transport=httpx.MockTransport(provider.handler)) as client:
        cache = JwksCache(
            issuer=idp.issuer,
            jwks_url="https://idp.test/jwks",
            client=client,
            clock=clock,
            ttl_s=60,
        )
        v = TokenValidator(
            [TrustedIssuerKeys(idp.issuer, cache)],
            audience="phivault",
            algorithms=["ES256"],
            skew_s=60,
        )
        old = idp.token(now=NOW, exp=NOW + 3600)
        await v.validate(old, now=NOW)
        idp.rotate()  # the old key is withdrawn (compromised)
        clock.t += 61
        with pytest.raises(InvalidToken):
            await v.validate(old, now=clock.t)


def test_jwks_import_skips_symmetric_and_private_keys() -> None:
    idp = FakeIssuer()
    doc = {
        "keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**idp.key.as_dict(private=True), "kid": "private"},
            {**idp.key.as_dict(private=False), "kid": "enc", "use": "enc"},
            {**idp.key.as_dict(private=False), "kid": "good"},
        ]
    }
    assert list(import_public_jwks(doc)) == ["good"]


async def test_discovery_downgrade_to_http_is_refused() -> None:
    idp = FakeIssuer("https://idp.test")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(
                200, json={"issuer": idp.issuer, "jwks_uri": "http://idp.test/jwks"}
            )
        return httpx.Response(200, json=idp.jwks())

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        cache = JwksCache(issuer=idp.issuer, jwks_url=None, client=client, clock=Clock())
        with pytest.raises(IdentityUnavailable):
            await cache.ready()
