"""DPoP (RFC 9449): sender-constrained access tokens, so a stolen token alone is useless.

A DPoP-bound access token carries ``cnf.jkt``, the RFC 7638 thumbprint of the client's public
key. With every request the client sends a fresh proof JWT signed by that key, naming the HTTP
method (``htm``), the URL (``htu``), when it was made (``iat``), a unique ``jti``, and the hash
of the access token (``ath``). :class:`DPoPVerifier` checks all of it and remembers each
``jti`` in a :class:`ReplayCache` for as long as the proof could be accepted, so a captured
proof cannot be replayed. The cache is in memory for the embedded shape and in Redis when
several workers serve the same clients (a proof used at one worker is refused at all others).

If Redis is unreachable, every bound token is refused (503): without the shared memory of
``jti``\\s a proof replayed at another worker could not be recognised, so there is no safe
fallback. A circuit breaker keeps a dead Redis from costing each request a connection attempt.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Collection
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from joserfc import jwk, jws
from joserfc.errors import JoseError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from phivault.errors import StoreUnavailable
from phivault.identity.errors import DPoPError, IdentityUnavailable
from phivault.identity.tokens import b64url_decode, check_algorithms
from phivault.resilience import Breaker

__all__ = [
    "DPoPVerifier",
    "MemoryReplayCache",
    "RedisReplayCache",
    "ReplayCache",
    "access_token_hash",
    "normalize_htu",
]

MAX_PROOF_BYTES = 4096
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class ReplayCache(Protocol):
    """Remembers one-time values (DPoP ``jti``\\s) for a while."""

    async def first_use(self, key: str, ttl_s: float) -> bool:
        """Record ``key``; True the first time within ``ttl_s``, False on any later use."""
        ...


class MemoryReplayCache:
    """A replay cache for one process (the embedded shape). Bounded; expired keys are pruned."""

    def __init__(self, *, max_entries: int = 100_000, clock: Any = time.monotonic) -> None:
        self._seen: dict[str, float] = {}
        self._max_entries = max_entries
        self._clock = clock

    async def first_use(self, key: str, ttl_s: float) -> bool:
        now = float(self._clock())
        expires = self._seen.get(key)
        if expires is not None and expires > now:
            return False
        if len(self._seen) >= self._max_entries:
            self._seen = {k: v for k, v in self._seen.items() if v > now}
            if len(self._seen) >= self._max_entries:
                # Full of live entries: refusing is safer than forgetting a jti.
                raise IdentityUnavailable("the DPoP replay cache is full")
        self._seen[key] = now + ttl_s
        return True


class RedisReplayCache:
    """A replay cache shared by every worker: ``SET key 1 NX PX ttl`` is the atomic test.

    Fails closed: Redis errors, an open ``breaker`` and timeouts all raise
    :class:`IdentityUnavailable`. The ``SET`` is never retried: a retry after a lost reply
    would find the key set by the first try and refuse a valid proof as a replay.
    """

    def __init__(self, client: Redis, *, prefix: str, breaker: Breaker | None = None) -> None:
        self._client = client
        self._prefix = prefix
        self._breaker = breaker

    async def first_use(self, key: str, ttl_s: float) -> bool:
        name = f"{self._prefix}:dpop:{key}"
        ttl_ms = max(1, int(ttl_s * 1000))

        async def claim() -> bool:
            try:
                return bool(await self._client.set(name, b"1", nx=True, px=ttl_ms))
            except (RedisError, OSError) as exc:
                raise IdentityUnavailable("the DPoP replay cache is unavailable") from exc

        if self._breaker is None:
            return await claim()
        try:
            return await self._breaker.call(claim)
        except IdentityUnavailable:
            raise
        except StoreUnavailable as exc:  # open breaker or timed out
            raise IdentityUnavailable("the DPoP replay cache is unavailable") from exc


def access_token_hash(access_token: str) -> str:
    """The ``ath`` of a token: base64url(SHA-256(ASCII token)), no padding."""
    digest = hashlib.sha256(access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def normalize_htu(url: str) -> str:
    """Scheme and host lower-cased, default port dropped, no query or fragment (RFC 9449 §4.3)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path or "/", "", ""))


class DPoPVerifier:
    """Checks DPoP proofs against the request and the access token they accompany."""

    def __init__(
        self,
        replay_cache: ReplayCache,
        *,
        algorithms: Collection[str],
        max_age_s: float,
        skew_s: float,
    ) -> None:
        self._replay = replay_cache
        self._algorithms = check_algorithms(algorithms)
        self._max_age_s = max_age_s
        self._skew_s = skew_s

    async def verify(
        self,
        proof: str,
        *,
        method: str,
        url: str,
        access_token: str,
        expected_jkt: str,
        now: float,
    ) -> None:
        """Verify ``proof`` for this request and token; raise :class:`DPoPError` if it fails."""
        header, key = self._read_proof(proof)
        try:
            verified = jws.deserialize_compact(proof, key, algorithms=[header["alg"]])
            claims = json.loads(verified.payload)
        except (JoseError, ValueError, TypeError) as exc:
            raise DPoPError(
                "dpop-bad-signature", "the DPoP proof's signature does not verify"
            ) from exc
        if not isinstance(claims, dict):
            raise DPoPError("dpop-malformed", "the DPoP proof's payload is not a JSON object")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 8 <= len(jti) <= 256:
            raise DPoPError("dpop-malformed", "the DPoP proof needs a unique jti")
        if claims.get("htm") != method.upper():
            raise DPoPError("dpop-wrong-method", "the DPoP proof is for another HTTP method")
        htu = claims.get("htu")
        if not isinstance(htu, str) or normalize_htu(htu) != normalize_htu(url):
            raise DPoPError("dpop-wrong-url", "the DPoP proof is for another URL")
        iat = claims.get("iat")
        if isinstance(iat, bool) or not isinstance(iat, (int, float)):
            raise DPoPError("dpop-malformed", "the DPoP proof has no iat")
        if iat > now + self._skew_s or iat < now - self._max_age_s - self._skew_s:
            raise DPoPError("dpop-stale", "the DPoP proof is too old or from the future")
        if claims.get("ath") != access_token_hash(access_token):
            raise DPoPError("dpop-wrong-token", "the DPoP proof is for another access token")
        if key.thumbprint() != expected_jkt:
            raise DPoPError("dpop-wrong-key", "the access token is bound to another key")
        # Last: only a proof that is valid in every other way uses up its jti.
        window = self._max_age_s + 2 * self._skew_s
        if not await self._replay.first_use(f"{expected_jkt}:{jti}", window):
            raise DPoPError("dpop-replay", "the DPoP proof was already used")

    def _read_proof(self, proof: str) -> tuple[dict[str, Any], jwk.ECKey | jwk.RSAKey | jwk.OKPKey]:
        if len(proof) > MAX_PROOF_BYTES:
            raise DPoPError("dpop-malformed", "the DPoP proof is too large")
        parts = proof.split(".")
        if len(parts) != 3:
            raise DPoPError("dpop-malformed", "the DPoP proof is not a compact JWS")
        try:
            header = json.loads(b64url_decode(parts[0]))
        except ValueError as exc:
            raise DPoPError("dpop-malformed", "the DPoP proof is not a compact JWS") from exc
        if not isinstance(header, dict) or header.get("typ") != "dpop+jwt":
            raise DPoPError("dpop-malformed", "the DPoP proof's typ must be dpop+jwt")
        if header.get("alg") not in self._algorithms:
            raise DPoPError("dpop-algorithm-refused", "the DPoP proof's algorithm is not allowed")
        public = header.get("jwk")
        if not isinstance(public, dict) or _PRIVATE_MEMBERS.intersection(public):
            raise DPoPError("dpop-malformed", "the DPoP proof must carry a public jwk")
        try:
            key = jwk.import_key(dict(public))
        except (JoseError, ValueError, TypeError) as exc:
            raise DPoPError("dpop-malformed", "the DPoP proof's jwk is not a usable key") from exc
        if not isinstance(key, (jwk.ECKey, jwk.RSAKey, jwk.OKPKey)):
            raise DPoPError("dpop-malformed", "the DPoP proof's jwk is not an asymmetric key")
        return header, key
