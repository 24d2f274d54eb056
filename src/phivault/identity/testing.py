"""Test doubles for identity: an issuer that signs anything, DPoP keys, and forged tokens.

Other parts' tests need real, verifiable tokens without an identity provider: build a
:class:`FakeIssuer`, hand ``issuer.key_source()`` to the validator (or to ``create_app``),
and mint tokens with any claims. The forging helpers (``alg: none``, HMAC keyed with the
public key) exist for the attack tests; nothing in the service imports this module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from joserfc import jwk, jws

from phivault.identity.dpop import access_token_hash
from phivault.identity.jwks import StaticKeySource

__all__ = ["DPoPKey", "FakeIssuer", "b64url", "forge_hmac_with_public_key", "forge_unsigned"]

_CURVES = {"ES256": "P-256", "ES384": "P-384"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_b64(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def _generate(alg: str) -> jwk.ECKey | jwk.OKPKey | jwk.RSAKey:
    params: dict[str, Any] = {"use": "sig", "alg": alg}
    if alg in _CURVES:
        return jwk.ECKey.generate_key(_CURVES[alg], parameters=params, auto_kid=True)  # type: ignore[arg-type]
    if alg == "Ed25519":
        return jwk.OKPKey.generate_key("Ed25519", parameters=params, auto_kid=True)  # type: ignore[arg-type]
    return jwk.RSAKey.generate_key(2048, parameters=params, auto_kid=True)  # type: ignore[arg-type]


class FakeIssuer:
    """An identity provider for tests: one signing key (rotatable), any claims."""

    def __init__(
        self,
        issuer: str = "https://issuer.example.test",
        *,
        audience: str = "phivault",
        alg: str = "ES256",
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.alg = alg
        self.key = _generate(alg)

    @property
    def kid(self) -> str:
        return str(self.key.kid)

    def rotate(self) -> None:
        """Switch to a new signing key (the old one is no longer published)."""
        self.key = _generate(self.alg)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.as_dict(private=False)]}

    def key_source(self) -> StaticKeySource:
        public = jwk.import_key(self.key.as_dict(private=False))
        if not isinstance(public, (jwk.ECKey, jwk.OKPKey, jwk.RSAKey)):
            raise TypeError("not an asymmetric key")
        return StaticKeySource({self.kid: public})

    def claims(self, now: float | None = None, **overrides: Any) -> dict[str, Any]:
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "user-1",
            "iat": issued,
            "nbf": issued,
            "exp": issued + 600,
            "auth_time": issued,
            "jti": secrets.token_urlsafe(12),
            "tenant": "default",
            "roles": ["clinician"],
            "scope": "openid fhirUser user/*.rs",
            "fhirUser": "Practitioner/p1",
            "amr": ["pwd"],
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        claims: dict[str, Any] | None = None,
        *,
        header: dict[str, Any] | None = None,
        now: float | None = None,
        **overrides: Any,
    ) -> str:
        """A signed token: default claims updated with ``overrides`` (None removes a claim)."""
        body = claims if claims is not None else self.claims(now, **overrides)
        head = {"alg": self.alg, "kid": self.kid, "typ": "at+jwt", **(header or {})}
        return jws.serialize_compact(
            head, json.dumps(body).encode(), self.key, algorithms=[head["alg"]]
        )


def forge_unsigned(claims: dict[str, Any]) -> str:
    """``alg: none`` with an empty signature (the oldest JWT attack)."""
    return f"{_json_b64({'alg': 'none', 'typ': 'JWT'})}.{_json_b64(claims)}."


def forge_hmac_with_public_key(claims: dict[str, Any], public_jwk: dict[str, Any], kid: str) -> str:
    """HS256 "signed" with the issuer's public key as the secret (algorithm confusion)."""
    secret = json.dumps(public_jwk, sort_keys=True).encode()
    signing_input = f"{_json_b64({'alg': 'HS256', 'kid': kid, 'typ': 'JWT'})}.{_json_b64(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


class DPoPKey:
    """A client's DPoP key pair; :meth:`proof` makes RFC 9449 proofs."""

    def __init__(self, alg: str = "ES256") -> None:
        self.alg = alg
        self.key = _generate(alg)

    @property
    def jkt(self) -> str:
        return self.key.thumbprint()

    def public_jwk(self) -> dict[str, Any]:
        public = dict(self.key.as_dict(private=False))
        public.pop("kid", None)
        public.pop("use", None)
        public.pop("alg", None)
        return public

    def proof(
        self,
        method: str,
        url: str,
        *,
        access_token: str | None = None,
        iat: float | None = None,
        jti: str | None = None,
        header: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        body: dict[str, Any] = {
            "jti": jti or secrets.token_urlsafe(16),
            "htm": method,
            "htu": url,
            "iat": int(time.time() if iat is None else iat),
        }
        if access_token is not None:
            body["ath"] = access_token_hash(access_token)
        body.update(claims)
        head = {"typ": "dpop+jwt", "alg": self.alg, "jwk": self.public_jwk(), **(header or {})}
        return jws.serialize_compact(
            head, json.dumps(body).encode(), self.key, algorithms=[self.alg]
        )
