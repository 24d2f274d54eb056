"""Where verification keys come from: a cached, rotating JWKS, or a fixed set (dev provider).

An identity provider rotates keys by publishing the new key in its JWKS before signing with it
and removing the old key later. :class:`JwksCache` follows that: it refreshes the set when its
time-to-live runs out, and also when a token names a ``kid`` it does not know (at most once per
``min_refresh_s``, so that a flood of made-up ``kid``\\s cannot turn into a flood of fetches).
If a refresh fails, the keys already held keep working until ``max_stale_s``; with no usable
keys at all authentication fails closed (:class:`IdentityUnavailable`, 503).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import httpx
from joserfc import jwk
from joserfc.errors import JoseError

from phivault.identity.errors import IdentityUnavailable, InvalidToken

__all__ = ["JwksCache", "KeySource", "StaticKeySource", "VerificationKey", "import_public_jwks"]

VerificationKey = jwk.ECKey | jwk.RSAKey | jwk.OKPKey
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class KeySource(Protocol):
    """Finds the public key that should have signed a token."""

    async def key_for(self, kid: str | None) -> VerificationKey:
        """The key named ``kid`` (or the only key, if ``kid`` is absent). Raises InvalidToken."""
        ...

    def still_trusted(self, kid: str | None) -> bool:
        """Whether a key seen earlier is still in the current set (no I/O)."""
        ...


def import_public_jwks(document: Mapping[str, Any]) -> dict[str, VerificationKey]:
    """Import the public, asymmetric signing keys of a JWKS document, by ``kid``.

    Symmetric (``oct``) keys, keys for encryption only, and entries that carry private members
    are skipped: a resource server never verifies with a shared secret.
    """
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise ValueError("a JWKS document needs a 'keys' list")
    keys: dict[str, VerificationKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") not in ("EC", "RSA", "OKP"):
            continue
        if entry.get("use", "sig") != "sig" or _PRIVATE_MEMBERS.intersection(entry):
            continue
        try:
            key = jwk.import_key(dict(entry))
        except (JoseError, ValueError, TypeError):
            continue
        if not isinstance(key, (jwk.ECKey, jwk.RSAKey, jwk.OKPKey)):
            continue
        kid = entry.get("kid")
        keys[kid if isinstance(kid, str) else key.thumbprint()] = key
    return keys


class StaticKeySource:
    """A fixed set of keys (the embedded dev identity provider, tests)."""

    def __init__(self, keys: Mapping[str, VerificationKey]) -> None:
        self._keys = dict(keys)

    async def key_for(self, kid: str | None) -> VerificationKey:
        return _pick(self._keys, kid)

    def still_trusted(self, kid: str | None) -> bool:
        return (kid in self._keys) if kid is not None else len(self._keys) == 1


class JwksCache:
    """A JWKS fetched over HTTPS (or found by OIDC discovery), cached, refreshed on rotation."""

    def __init__(
        self,
        *,
        issuer: str,
        jwks_url: str | None,
        client: httpx.AsyncClient,
        clock: Callable[[], float],
        ttl_s: float = 300.0,
        min_refresh_s: float = 10.0,
        max_stale_s: float = 3600.0,
    ) -> None:
        self._issuer = issuer
        self._jwks_url = jwks_url
        self._client = client
        self._clock = clock
        self._ttl_s = ttl_s
        self._min_refresh_s = min_refresh_s
        self._max_stale_s = max_stale_s
        self._keys: dict[str, VerificationKey] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def key_for(self, kid: str | None) -> VerificationKey:
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at >= self._ttl_s:
            await self._refresh(forced=False)
        elif not self._has(kid):
            await self._refresh(forced=True)
        if self._fetched_at is None or self._clock() - self._fetched_at > self._max_stale_s:
            raise IdentityUnavailable("no current signing keys for a trusted issuer")
        return _pick(self._keys, kid)

    def still_trusted(self, kid: str | None) -> bool:
        fresh = self._fetched_at is not None and self._clock() - self._fetched_at < self._ttl_s
        return fresh and self._has(kid)

    async def ready(self) -> None:
        """Fetch the key set now if it was never fetched; raise IdentityUnavailable if it fails."""
        await self._refresh(forced=False)
        if self._fetched_at is None:
            raise IdentityUnavailable("the identity provider's keys cannot be fetched")

    def _has(self, kid: str | None) -> bool:
        return (kid in self._keys) if kid is not None else len(self._keys) == 1

    async def _refresh(self, *, forced: bool) -> None:
        async with self._lock:
            now = self._clock()
            # At most one fetch per min_refresh_s, whatever the reason (failures included).
            if self._attempted_at is not None and now - self._attempted_at < self._min_refresh_s:
                return
            # Another task may have refreshed while this one waited for the lock.
            if not forced and self._fetched_at is not None and now - self._fetched_at < self._ttl_s:
                return
            self._attempted_at = now
            try:
                url = self._jwks_url or await self._discover()
                keys = import_public_jwks(await self._get_json(url))
            except IdentityUnavailable:
                return  # keep serving the keys held (until max_stale_s)
            except ValueError:
                return
            self.fetches += 1
            self._keys = keys
            self._fetched_at = self._clock()

    async def _discover(self) -> str:
        doc = await self._get_json(self._issuer.rstrip("/") + "/.well-known/openid-configuration")
        if doc.get("issuer") != self._issuer or not isinstance(doc.get("jwks_uri"), str):
            raise ValueError("discovery document does not match the issuer")
        url: str = doc["jwks_uri"]
        if self._issuer.startswith("https://") and not url.startswith("https://"):
            raise ValueError("an HTTPS issuer must publish its keys over HTTPS")
        self._jwks_url = url
        return url

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            response = await self._client.get(url, timeout=5.0)
            response.raise_for_status()
            doc = json.loads(response.content)
        except (httpx.HTTPError, ValueError) as exc:
            raise IdentityUnavailable("the identity provider cannot be reached") from exc
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return doc


def _pick(keys: Mapping[str, VerificationKey], kid: str | None) -> VerificationKey:
    if kid is None:
        if len(keys) == 1:
            return next(iter(keys.values()))
        raise InvalidToken("missing-kid", "the token names no key and the issuer has several")
    key = keys.get(kid)
    if key is None:
        raise InvalidToken("unknown-kid", "the token names a key the issuer does not publish")
    return key
