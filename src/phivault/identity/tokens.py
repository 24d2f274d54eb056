"""Access token validation: phivault as an OAuth 2 resource server for JWT access tokens.

The order of checks is the point. The header is read first and the algorithm must be on an
allow-list of asymmetric algorithms (``none`` and every HMAC algorithm are refused outright,
so a token "signed" with an identity provider's *public* key as an HMAC secret never reaches a
verifier). The issuer picks the key source; the ``kid`` picks the key; the signature is
verified with that key and exactly the header's algorithm. Only then are the claims read, and
:func:`check_claims` (pure, with ``now`` passed in) applies issuer, audience, expiry,
not-before and issued-at with a bounded clock skew.

A verified token is remembered (by its SHA-256) until it expires, so a busy client does not
pay for a signature check on every request; a remembered token is still re-checked against the
clock and is forgotten as soon as its key leaves the issuer's key set.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError

from phivault.errors import ConfigurationError
from phivault.identity.errors import InvalidToken
from phivault.identity.jwks import KeySource

__all__ = [
    "FORBIDDEN_ALGORITHMS",
    "MAX_TOKEN_BYTES",
    "TokenValidator",
    "TrustedIssuerKeys",
    "b64url_decode",
    "check_algorithms",
    "check_claims",
    "read_header",
]

MAX_TOKEN_BYTES = 8192
FORBIDDEN_ALGORITHMS = frozenset({"none", "HS256", "HS384", "HS512"})
_KNOWN_ASYMMETRIC = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "Ed25519"}
)
_CACHE_SIZE = 10_000


def check_algorithms(algorithms: Collection[str]) -> frozenset[str]:
    """Validate an algorithm allow-list from settings: asymmetric, known, non-empty."""
    allowed = frozenset(algorithms)
    if not allowed:
        raise ConfigurationError("the algorithm allow-list is empty")
    if allowed & FORBIDDEN_ALGORITHMS or not allowed <= _KNOWN_ASYMMETRIC:
        raise ConfigurationError(
            "only asymmetric JWS algorithms may be allowed: " + ", ".join(sorted(_KNOWN_ASYMMETRIC))
        )
    return allowed


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding (RFC 7515 §2)."""
    if "=" in text or not text.isascii():
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def read_header(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (unverified) header and payload of a compact JWS, or InvalidToken("malformed")."""
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken("too-large", "the token is too large")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("malformed", "the token is not a signed compact JWT")
    try:
        header = json.loads(b64url_decode(parts[0]))
        payload = json.loads(b64url_decode(parts[1]))
    except ValueError as exc:
        raise InvalidToken("malformed", "the token is not a signed compact JWT") from exc
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise InvalidToken("malformed", "the token is not a signed compact JWT")
    return header, payload


def check_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    audience: str,
    now: float,
    skew_s: float,
) -> None:
    """Apply the registered claims (RFC 7519 §4.1) at time ``now``. Pure; raises InvalidToken."""
    if claims.get("iss") != issuer:
        raise InvalidToken("wrong-issuer", "the token is from an untrusted issuer")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or audience not in audiences:
        raise InvalidToken("wrong-audience", "the token is not meant for this service")
    exp = _number(claims, "exp", required=True)
    if exp is None or now >= exp + skew_s:
        raise InvalidToken("expired", "the token has expired")
    nbf = _number(claims, "nbf", required=False)
    if nbf is not None and now + skew_s < nbf:
        raise InvalidToken("not-yet-valid", "the token is not valid yet")
    iat = _number(claims, "iat", required=True)
    if iat is None or now + skew_s < iat:
        raise InvalidToken("issued-in-future", "the token claims to be issued in the future")


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise InvalidToken("missing-claim", f"the token has no {name} claim")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidToken("bad-claim", f"the {name} claim is not a number")
    return float(value)


@dataclass(frozen=True, slots=True)
class TrustedIssuerKeys:
    """An issuer phivault trusts and where its keys come from."""

    issuer: str
    keys: KeySource


@dataclass(frozen=True, slots=True)
class _Verified:
    claims: dict[str, Any]
    kid: str | None
    issuer: str


class TokenValidator:
    """Validates JWT access tokens from the trusted issuers; returns their verified claims."""

    def __init__(
        self,
        issuers: Collection[TrustedIssuerKeys],
        *,
        audience: str,
        algorithms: Collection[str],
        skew_s: float,
    ) -> None:
        if not issuers:
            raise ConfigurationError(
                "no trusted token issuer (set PHIVAULT_IDENTITY__ISSUERS or use --dev)"
            )
        self._issuers = {trusted.issuer: trusted for trusted in issuers}
        self._audience = audience
        self._algorithms = check_algorithms(algorithms)
        self._skew_s = skew_s
        self._verified: OrderedDict[bytes, _Verified] = OrderedDict()

    async def validate(self, token: str, *, now: float) -> dict[str, Any]:
        """Verify ``token`` and its claims at ``now``; InvalidToken or IdentityUnavailable."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._verified.get(digest)
        if cached is not None:
            trusted = self._issuers.get(cached.issuer)
            if trusted is not None and trusted.keys.still_trusted(cached.kid):
                check_claims(
                    cached.claims,
                    issuer=cached.issuer,
                    audience=self._audience,
                    now=now,
                    skew_s=self._skew_s,
                )
                return cached.claims
            del self._verified[digest]
        header, unverified = read_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidToken("algorithm-refused", "the token's algorithm is not allowed")
        if header.get("typ") in ("dpop+jwt", "DPoP+JWT") or "jwk" in header or "jku" in header:
            # A DPoP proof, or a token that brings its own key, is never an access token.
            raise InvalidToken("wrong-type", "the token is not an access token")
        if "crit" in header:
            raise InvalidToken("unsupported-header", "the token uses critical extensions")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed", "the token's kid is not a string")
        trusted = self._issuers.get(unverified.get("iss"))  # type: ignore[arg-type]
        if trusted is None:
            raise InvalidToken("wrong-issuer", "the token is from an untrusted issuer")
        key = await trusted.keys.key_for(kid)
        try:
            verified = jws.deserialize_compact(token, key, algorithms=[alg])
        except (JoseError, ValueError, TypeError) as exc:
            raise InvalidToken("bad-signature", "the token's signature does not verify") from exc
        try:
            claims = json.loads(verified.payload)
        except ValueError as exc:
            raise InvalidToken("malformed", "the token's payload is not JSON") from exc
        if not isinstance(claims, dict):
            raise InvalidToken("malformed", "the token's payload is not a JSON object")
        check_claims(
            claims, issuer=trusted.issuer, audience=self._audience, now=now, skew_s=self._skew_s
        )
        self._verified[digest] = _Verified(claims=claims, kid=kid, issuer=trusted.issuer)
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return claims
