"""Telling every worker to drop a shredded patient's cached cipher, and knowing that it did.

Why: each worker caches a patient's cipher (``keys.dek_cache_ttl_s``). In the scaled shape a
shred on one worker destroys the wrapped keys in the shared key store, but another worker's
cached cipher would go on opening that patient's elements until it expires. The key ring
therefore announces every shred through a :class:`CacheInvalidation` and reports the shred
done only once every live worker confirmed that it dropped the cipher
(``docs/decisions/keys-keystore-postgres.md`` states the guarantee).

Two implementations of the port:

* :class:`InProcessInvalidation` (embedded shape, and any process that serves no PHI): the
  only cache is the shredding key ring's own, which it evicts itself.
* :class:`~phivault.crypto.invalidation_nats.NatsInvalidation` (scaled shape): a worker
  subscribes to the invalidation subject and holds a *lease* in a JetStream key-value bucket
  (its entry, renewed by compare-and-swap, expires with the bucket's TTL). It serves from its
  cache only while it holds the lease and its NATS connection has stayed up since it took the
  lease: a worker that cannot hear invalidations reads the key store every time (and its cache
  is wiped). The shredder lists the bucket's entries, publishes the invalidation with a reply
  inbox and waits (bounded) for a confirmation from each listed worker. A worker that does not
  confirm has its lease revoked (its entry overwritten): it cannot renew it, so it stops using its
  cache when its current lease ends, at most one lease after the shred, and the shred is
  reported as pending propagation.

Messages carry the tenant and patient ids only (ids the ledger events carry too), never key
material. They are not signed: the subject and the bucket are reserved for the workers' NATS
user by the server's permissions, like the audit stream (the decision record says why).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

__all__ = [
    "CacheInvalidation",
    "CacheListener",
    "DeferredInvalidation",
    "InProcessInvalidation",
    "Propagation",
    "PropagationStatus",
    "UnreachableInvalidation",
]


class PropagationStatus(StrEnum):
    COMPLETE = "complete"  # every live worker confirmed it dropped the cipher
    PENDING = "pending-propagation"  # destroyed in the store; some worker did not confirm


@dataclass(frozen=True)
class Propagation:
    """How far a shred's invalidation got. ``bound_s``: when pending, the longest (seconds
    after this result) an unconfirmed worker may still open elements with a cached cipher."""

    status: PropagationStatus
    confirmed: tuple[str, ...] = ()
    unconfirmed: tuple[str, ...] = ()
    detail: str = ""
    bound_s: float | None = None

    @property
    def complete(self) -> bool:
        return self.status is PropagationStatus.COMPLETE

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "confirmed": list(self.confirmed),
            "unconfirmed": list(self.unconfirmed),
            "detail": self.detail,
            "bound_s": self.bound_s,
        }


class CacheListener(Protocol):
    """What an invalidation drops: the key ring's cached ciphers."""

    def drop_patient(self, tenant: str, patient: str) -> None: ...

    def drop_all(self) -> None: ...


class CacheInvalidation(Protocol):
    """The port: may this process serve from its cipher cache; announce a shred to all."""

    def attach(self, listener: CacheListener) -> None:
        """The cache to drop from (the key ring attaches itself)."""

    async def start(self) -> None:
        """Begin listening (a serving worker), once the listener is attached."""

    def cache_usable(self) -> bool:
        """True if cached ciphers may be used now; a False answer has wiped the cache."""

    async def announce(self, tenant: str, patient: str) -> Propagation:
        """After the shred committed: have every live worker drop the patient's cipher.
        Never raises for a NATS failure: an unconfirmed shred is a pending result."""

    async def aclose(self) -> None: ...


class InProcessInvalidation:
    """One process holds the only cache of the key store (embedded shape; CLI tools)."""

    def __init__(self) -> None:
        self._listener: CacheListener | None = None

    def attach(self, listener: CacheListener) -> None:
        self._listener = listener

    async def start(self) -> None:
        return None

    def cache_usable(self) -> bool:
        return True

    async def announce(self, tenant: str, patient: str) -> Propagation:
        if self._listener is not None:
            self._listener.drop_patient(tenant, patient)
        return Propagation(PropagationStatus.COMPLETE, confirmed=("in-process",))

    async def aclose(self) -> None:
        return None


class UnreachableInvalidation(InProcessInvalidation):
    """A tool that shares the key store but could not reach the others (NATS down): its own
    cache is dropped; every shred is pending until the other workers' caches expire
    (``bound_s``, their cache lifetime) or the shred is announced again."""

    def __init__(self, detail: str, *, bound_s: float | None) -> None:
        super().__init__()
        self._detail = detail
        self._bound_s = bound_s

    async def announce(self, tenant: str, patient: str) -> Propagation:
        await super().announce(tenant, patient)
        return Propagation(PropagationStatus.PENDING, detail=self._detail, bound_s=self._bound_s)


class DeferredInvalidation(InProcessInvalidation):
    """A tool that serves no PHI (the CLI): its own cache is trusted as in-process, and it
    connects to the others (``connect``) only when it has a shred to announce, so rotations
    and holds never wait for NATS."""

    def __init__(self, connect: Callable[[], Awaitable[CacheInvalidation]]) -> None:
        super().__init__()
        self._connect = connect
        self._connected: CacheInvalidation | None = None

    async def announce(self, tenant: str, patient: str) -> Propagation:
        await super().announce(tenant, patient)
        if self._connected is None:
            self._connected = await self._connect()
        return await self._connected.announce(tenant, patient)

    async def aclose(self) -> None:
        if self._connected is not None:
            connected, self._connected = self._connected, None
            await connected.aclose()
