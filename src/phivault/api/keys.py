"""Operator endpoints for key custody: seal status, unseal with shares, seal, shred.

The server starts sealed unless it can unseal itself (an HSM PIN, a cloud KMS, or, for
development only, the dev unseal file). Custodians then present their unseal shares, each on
their own: shares are held in memory until M have arrived, then the key ring is unsealed with
them and they are dropped, whether or not they worked. Every attempt is a ledger event (the key
ring records it). While sealed, ``/readyz`` answers 503, so a load balancer sends no PHI traffic.

Only an ``admin`` who completed MFA within the step-up window may call these; the shares
themselves are the credential that matters. Nothing here echoes a share, in a response, an
error or a log line.

Pending shares live in this process: in the embedded shape that is the one server; in the
scaled shape each worker is unsealed on its own (or by its HSM/KMS).

``POST /shred`` destroys a patient's data keys in the caller's tenant (the server holds the
ledger, so this is how the embedded shape shreds while serving; in the scaled shape its event
goes to the audit stream). It answers 200 once every worker dropped the patient's cached
cipher, and 202 "pending propagation" when the keys are destroyed but some worker did not
confirm in time (the body names them and bounds how long their caches may still serve; posting
again announces again).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Final

from fastapi import APIRouter, Body, Request, Response
from pydantic import BaseModel, Field

from phivault.api.context import SteppedUp
from phivault.api.problems import BadRequest, Conflict, Forbidden, ServiceUnavailable
from phivault.crypto import InvalidShares, KeyRing, KeyUnavailable, RetentionHold, Sealed
from phivault.errors import InvalidInput
from phivault.identity.principal import Principal, Role

__all__ = ["UnsealState", "keys_router", "require_unsealed"]

# Shares presented but not yet used are forgotten after this long.
PENDING_SHARES_TTL_S: Final = 600.0
_MAX_SHARE_CHARS: Final = 512


class UnsealRequest(BaseModel):
    """Unseal shares (sealed keystore) or the token PIN (PKCS#11), one or several at a time."""

    credentials: list[Annotated[str, Field(min_length=1, max_length=_MAX_SHARE_CHARS)]] = Field(
        min_length=1, max_length=16
    )


class ShredRequest(BaseModel):
    """A patient of the caller's tenant, and a reason code (never free text)."""

    patient: str = Field(min_length=1, max_length=64)
    reason: str = Field(default="erasure-request", min_length=1, max_length=64)


class ShredResult(BaseModel):
    status: str  # "complete" or "pending-propagation"
    message: str
    tenant: str
    patient: str
    keys_destroyed: int
    ledger_index: int
    confirmed_workers: int
    unconfirmed_workers: list[str]
    bound_s: float | None  # pending: how long an unconfirmed worker's cache may still serve


class KeyStatus(BaseModel):
    sealed: bool
    provider: str
    needed: int  # credentials that unseal it (M shares, one PIN, none for a KMS)
    presented: int  # credentials presented so far and held until there are enough


class UnsealState:
    """The key ring and the shares presented so far (held only until they are used)."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring
        self._pending: list[str] = []
        self._since = 0.0
        self._lock = asyncio.Lock()

    def status(self) -> KeyStatus:
        self._expire()
        return KeyStatus(
            sealed=self.ring.sealed,
            provider=self.ring.provider_name,
            needed=self.ring.credentials_needed,
            presented=len(self._pending),
        )

    def _expire(self) -> None:
        if self._pending and time.monotonic() - self._since > PENDING_SHARES_TTL_S:
            self._pending.clear()

    async def present(self, credentials: list[str]) -> KeyStatus:
        async with self._lock:
            if not self.ring.sealed:
                return self.status()
            self._expire()
            if not self._pending:
                self._since = time.monotonic()
            self._pending.extend(credential.strip() for credential in credentials)
            if len(self._pending) < self.ring.credentials_needed:
                return self.status()
            presented, self._pending = self._pending, []
            try:
                await self.ring.unseal(presented)
            except (InvalidShares, InvalidInput) as exc:
                # The key ring recorded the failed attempt; say why, never which share said what.
                raise BadRequest("the shares presented do not unseal the keystore") from exc
            except KeyUnavailable as exc:
                raise ServiceUnavailable("the key provider is unavailable") from exc
            return self.status()

    async def seal(self) -> KeyStatus:
        async with self._lock:
            self._pending.clear()
            if not self.ring.sealed:
                await self.ring.seal()
            return self.status()


def _state(request: Request) -> UnsealState:
    state: UnsealState = request.app.state.unseal
    return state


def _operator(principal: Principal) -> None:
    if not principal.has_role(Role.ADMIN):
        raise Forbidden()


async def require_unsealed(state: UnsealState) -> None:
    """A readiness check: not ready while the keystore is sealed."""
    if state.ring.sealed:
        raise Sealed("the keystore is sealed")


def keys_router() -> APIRouter:
    router = APIRouter(tags=["keys"])

    @router.get("/status")
    async def key_status(principal: SteppedUp, request: Request) -> KeyStatus:
        _operator(principal)
        return _state(request).status()

    @router.post("/unseal")
    async def unseal(
        principal: SteppedUp, request: Request, body: Annotated[UnsealRequest, Body()]
    ) -> KeyStatus:
        _operator(principal)
        return await _state(request).present(body.credentials)

    @router.post("/seal")
    async def seal(principal: SteppedUp, request: Request) -> KeyStatus:
        _operator(principal)
        return await _state(request).seal()

    @router.post("/shred")
    async def shred(
        principal: SteppedUp,
        request: Request,
        response: Response,
        body: Annotated[ShredRequest, Body()],
    ) -> ShredResult:
        _operator(principal)
        ring = _state(request).ring
        try:
            outcome = await ring.shred_patient(
                principal.tenant,
                body.patient,
                reason=body.reason,
                # drops the patient's blind-index tokens too (open_service provides it)
                elements=getattr(request.app.state, "sealed_elements", None),
                operator=principal.subject,
            )
        except RetentionHold as exc:
            raise Conflict(str(exc)) from exc
        record, propagation = outcome.record, outcome.propagation
        if outcome.pending:
            response.status_code = 202
            bound = (
                f"; they stop using cached keys within {propagation.bound_s:.0f} s"
                if propagation.bound_s is not None
                else ""
            )
            message = (
                f"pending propagation: the keys are destroyed, but {propagation.detail}{bound}; "
                "post the shred again to retry"
            )
        else:
            message = "shredded: every worker dropped the patient's keys"
        return ShredResult(
            status=propagation.status.value,
            message=message,
            tenant=record.tenant,
            patient=f"Patient/{record.patient}",
            keys_destroyed=len(record.keys_destroyed),
            ledger_index=record.ledger_index,
            confirmed_workers=len(propagation.confirmed),
            unconfirmed_workers=list(propagation.unconfirmed),
            bound_s=propagation.bound_s,
        )

    return router
