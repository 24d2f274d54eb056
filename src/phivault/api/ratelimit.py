"""Rate limits per client address and per principal, shared between workers when scaled.

The limit stage runs *before* authentication, so that a flood of forged tokens costs one
counter increment each, not a signature check. At that point the principal is not proven
yet, so the per-principal limit is keyed by a fingerprint (SHA-256) of the presented
credential rather than by an unverified ``sub`` claim: keying on a claim anyone can write
would let an attacker exhaust a victim's quota with forged tokens naming the victim. Counters
live in the ``limits`` library's storage: memory (embedded) or Redis (scaled). If the storage
is down, requests fail closed with 503.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from phivault.errors import ConfigurationError, StoreUnavailable

__all__ = ["Limited", "RateLimitUnavailable", "RateLimiter", "credential_fingerprint"]


class RateLimitUnavailable(StoreUnavailable):
    """The rate limit counters cannot be reached: fail closed."""


@dataclass(frozen=True, slots=True)
class Limited:
    """A refusal: which limit, and how many seconds until a retry can succeed."""

    limit: str
    retry_after_s: int


def credential_fingerprint(authorization: str) -> str:
    return hashlib.sha256(authorization.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class RateLimiter:
    """Two sliding-window counters (O(1) state per key): per address and per credential."""

    def __init__(self, storage: Storage, *, per_address: str, per_principal: str) -> None:
        try:
            self._address_limit: RateLimitItem = parse(per_address)
            self._principal_limit: RateLimitItem = parse(per_principal)
        except ValueError as exc:
            raise ConfigurationError("a rate limit setting is not a valid limit") from exc
        self._storage = storage
        self._limiter = SlidingWindowCounterRateLimiter(storage)

    @classmethod
    def in_memory(cls, *, per_address: str, per_principal: str) -> RateLimiter:
        return cls(MemoryStorage(), per_address=per_address, per_principal=per_principal)

    @classmethod
    def redis(cls, url: str, *, prefix: str, per_address: str, per_principal: str) -> RateLimiter:
        storage = RedisStorage(
            "async+" + url if not url.startswith("async+") else url,
            wrap_exceptions=True,
            implementation="redispy",
            key_prefix=f"{prefix}:limits",
        )
        return cls(storage, per_address=per_address, per_principal=per_principal)

    async def check(self, *, address: str, credential: str | None) -> Limited | None:
        """Count one request; return a :class:`Limited` if it must be refused."""
        try:
            if not await self._limiter.hit(self._address_limit, "address", address):
                return Limited(
                    "address", await self._retry_after(self._address_limit, "address", address)
                )
            if credential is not None and not await self._limiter.hit(
                self._principal_limit, "principal", credential
            ):
                return Limited(
                    "principal",
                    await self._retry_after(self._principal_limit, "principal", credential),
                )
        except (StorageError, OSError) as exc:
            raise RateLimitUnavailable("the rate limit store is unavailable") from exc
        return None

    async def ping(self) -> bool:
        try:
            return bool(await self._storage.check())
        except (StorageError, OSError):
            return False

    async def _retry_after(self, item: RateLimitItem, *ids: str) -> int:
        stats = await self._limiter.get_window_stats(item, *ids)
        return max(1, math.ceil(stats.reset_time - time.time()))
