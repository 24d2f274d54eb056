from __future__ import annotations

import json

import pytest
from redis.asyncio import Redis

from phivault.identity.dpop import (
    DPoPVerifier,
    MemoryReplayCache,
    RedisReplayCache,
    ReplayCache,
    normalize_htu,
)
from phivault.identity.errors import DPoPError, IdentityUnavailable
from phivault.identity.testing import DPoPKey
from phivault.identity.tokens import b64url_decode

NOW = 1_800_000_000.0
URL = "https://api.example.test/fhir/Patient"
TOKEN = "header.payload.signature"


def verifier(cache: ReplayCache | None = None) -> DPoPVerifier:
    return DPoPVerifier(
        cache or MemoryReplayCache(),
        algorithms=["ES256", "Ed25519", "RS256"],
        max_age_s=60,
        skew_s=5,
    )


async def check(
    v: DPoPVerifier, key: DPoPKey, proof: str, *, method: str = "GET", url: str = URL
) -> None:
    await v.verify(proof, method=method, url=url, access_token=TOKEN, expected_jkt=key.jkt, now=NOW)


@pytest.mark.parametrize("alg", ["ES256", "Ed25519"])
async def test_valid_proof(alg: str) -> None:
    key = DPoPKey(alg)
    await check(verifier(), key, key.proof("GET", URL, access_token=TOKEN, iat=NOW))


async def test_replayed_proof_refused() -> None:
    v = verifier()
    key = DPoPKey()
    proof = key.proof("GET", URL, access_token=TOKEN, iat=NOW)
    await check(v, key, proof)
    with pytest.raises(DPoPError) as info:
        await check(v, key, proof)
    assert info.value.reason == "dpop-replay"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"method": "POST"}, "dpop-wrong-method"),
        ({"url": "https://api.example.test/fhir/Observation"}, "dpop-wrong-url"),
        ({"url": "https://other.example.test/fhir/Patient"}, "dpop-wrong-url"),
    ],
)
async def test_proof_for_another_request(kwargs: dict[str, str], reason: str) -> None:
    key = DPoPKey()
    with pytest.raises(DPoPError) as info:
        await check(verifier(), key, key.proof("GET", URL, access_token=TOKEN, iat=NOW), **kwargs)
    assert info.value.reason == reason


async def test_query_and_fragment_do_not_matter() -> None:
    key = DPoPKey()
    proof = key.proof(
        "GET", "https://API.example.test:443/fhir/Patient", access_token=TOKEN, iat=NOW
    )
    await check(verifier(), key, proof, url=URL + "?name=x#frag")


@pytest.mark.parametrize(
    ("proof_kwargs", "reason"),
    [
        ({"iat": NOW - 120}, "dpop-stale"),
        ({"iat": NOW + 60}, "dpop-stale"),
        ({"access_token": "another.token.x"}, "dpop-wrong-token"),
        ({"access_token": None}, "dpop-wrong-token"),
        ({"jti": "short"}, "dpop-malformed"),
        ({"header": {"typ": "JWT"}}, "dpop-malformed"),
    ],
)
async def test_bad_proofs(proof_kwargs: dict[str, object], reason: str) -> None:
    key = DPoPKey()
    args: dict[str, object] = {"access_token": TOKEN, "iat": NOW, **proof_kwargs}
    proof = key.proof("GET", URL, **args)  # type: ignore[arg-type]
    with pytest.raises(DPoPError) as info:
        await check(verifier(), key, proof)
    assert info.value.reason == reason


async def test_stolen_token_with_another_key() -> None:
    victim, thief = DPoPKey(), DPoPKey()
    proof = thief.proof("GET", URL, access_token=TOKEN, iat=NOW)
    with pytest.raises(DPoPError) as info:
        await verifier().verify(
            proof, method="GET", url=URL, access_token=TOKEN, expected_jkt=victim.jkt, now=NOW
        )
    assert info.value.reason == "dpop-wrong-key"


async def test_private_key_in_header_refused() -> None:
    key = DPoPKey()
    proof = key.proof(
        "GET", URL, access_token=TOKEN, iat=NOW, header={"jwk": key.key.as_dict(private=True)}
    )
    with pytest.raises(DPoPError):
        await check(verifier(), key, proof)


async def test_header_jwk_swapped_breaks_signature() -> None:
    key, other = DPoPKey(), DPoPKey()
    proof = key.proof("GET", URL, access_token=TOKEN, iat=NOW, header={"jwk": other.public_jwk()})
    with pytest.raises(DPoPError) as info:
        await verifier().verify(
            proof, method="GET", url=URL, access_token=TOKEN, expected_jkt=other.jkt, now=NOW
        )
    assert info.value.reason == "dpop-bad-signature"


def test_normalize_htu() -> None:
    assert normalize_htu("HTTPS://Example.COM:443/a?b#c") == "https://example.com/a"
    assert normalize_htu("http://example.com:8080/a") == "http://example.com:8080/a"
    assert normalize_htu("http://[::1]:8000/x") == "http://[::1]:8000/x"


async def test_memory_replay_cache_expires_and_bounds() -> None:
    t = [0.0]
    cache = MemoryReplayCache(max_entries=2, clock=lambda: t[0])
    assert await cache.first_use("a", 10)
    assert not await cache.first_use("a", 10)
    assert await cache.first_use("b", 10)
    with pytest.raises(IdentityUnavailable):
        await cache.first_use("c", 10)
    t[0] = 11
    assert await cache.first_use("a", 10)


async def test_redis_replay_cache_is_shared(redis_client: Redis, redis_prefix: str) -> None:
    worker_a = verifier(RedisReplayCache(redis_client, prefix=redis_prefix))
    worker_b = verifier(RedisReplayCache(redis_client, prefix=redis_prefix))
    key = DPoPKey()
    proof = key.proof("GET", URL, access_token=TOKEN, iat=NOW)
    await check(worker_a, key, proof)
    with pytest.raises(DPoPError) as info:
        await check(worker_b, key, proof)
    assert info.value.reason == "dpop-replay"
    ttl = await redis_client.pttl(f"{redis_prefix}:dpop:{key.jkt}:" + _jti(proof))
    assert 0 < ttl <= 70_000


async def test_redis_down_fails_closed(redis_prefix: str) -> None:
    client = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        with pytest.raises(IdentityUnavailable):
            await RedisReplayCache(client, prefix=redis_prefix).first_use("x", 10)
    finally:
        await client.aclose()


def _jti(proof: str) -> str:
    return str(json.loads(b64url_decode(proof.split(".")[1]))["jti"])
